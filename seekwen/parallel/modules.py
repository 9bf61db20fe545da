"""The parallel model: the reference modules built with local shapes, plus the collectives.

Nothing under `seekwen/model/` changes. `ParallelTransformer` is a `Transformer` built from the rank's
local config (`plan.local_config`: local heads and intermediate sizes), so every attention, MLA, MLP and
expert module is the ordinary one computing on its shard, and the fast path (`fast.prepare`) swaps its
siblings in exactly as for one process. Three sibling classes add the communication:

- `ParallelTransformer`: vocabulary-parallel embedding (each rank looks up the ids in its vocabulary
  range, zeros elsewhere, one all-reduce) and LM head (local logits, all-gathered, so `model(ids)`
  returns the whole [B, S, vocab] on every rank); `sync_tokens` broadcasts rank 0's sampled tokens;
- `ParallelBlock`: one all-reduce after attention (the partial sums of the local heads through their
  `wo` columns) and one after a dense MLP (partial sums over the local intermediate slice);
- `ParallelMoE`: router replicated; the routed experts this rank owns (a range of indices under ep,
  an intermediate slice of every expert under tp); the shared expert's partial sum joins the routed
  one, so the whole MoE block costs one all-reduce;
- `ParallelMTPLayer`: DeepSeek-V3's multi-token-prediction layer: its block a `ParallelBlock`, its own
  embedding and head vocabulary-parallel like the main model's, `eh_proj` and the norms replicated.

A row-parallel bias (`wo.bias`) is held by tp-rank 0 only (zeros elsewhere, see `loading.py`), so the
all-reduce adds it once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..model.batch import ForwardBatch
from ..model.moe import Experts, MoE
from ..model.mtp import MTPLayer
from ..model.transformer import Block, Transformer
from .comm import Comm
from .plan import ParallelPlan, local_config


class ParallelBlock(Block):
    """A `Block` whose attention and dense-MLP outputs are summed over the tp ranks (MoE blocks reduce
    inside `ParallelMoE`). Adopts the reference block's children, so parameter names stay the same."""

    def __init__(self, ref: Block, plan: ParallelPlan, comm: Comm):
        nn.Module.__init__(self)
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = ref.attn_norm, ref.attn, ref.ffn_norm, ref.ffn
        self.reduce = comm.all_reduce if plan.tp > 1 else None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), batch)  # [B, S, d] partial sum over this rank's heads
        x = x + (a if self.reduce is None else self.reduce(a))
        f = self.ffn(self.ffn_norm(x))
        if self.reduce is not None and not isinstance(self.ffn, ParallelMoE):
            f = self.reduce(f)
        return x + f


class ParallelMoE(MoE):
    """`MoE` over this rank's experts. The router is whole (same choices on every rank); under ep the rank
    runs only the (token, expert) pairs whose expert it owns; its output is a partial sum, completed by
    one all-reduce together with the shared expert's (itself partial under tp; whole at tp = 1, then
    added after the reduction)."""

    def __init__(self, ref: MoE, n_local: int, inter: int, plan: ParallelPlan, comm: Comm):
        nn.Module.__init__(self)
        self.gate, self.shared, self.shared_gate = ref.gate, ref.shared, ref.shared_gate
        E, dim = ref.experts.w1.shape[0], ref.experts.w1.shape[2]
        self.n_experts, self.n_local = E, n_local
        self.expert_start = plan.ep_rank * n_local  # experts [start, start + n_local) live here
        self.experts = ref.experts if n_local == E and inter == ref.experts.w1.shape[1] else \
            Experts(n_local, dim, inter)
        self.comm = comm if plan.routed_split else None
        self.shared_split = plan.tp > 1

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, d], weights/indices [N, k] (global expert ids) -> this rank's part of the routed sum [N, d]."""
        if self.n_local == self.n_experts:
            return self.experts(x, weights, indices)
        local = indices - self.expert_start
        token, slot = ((local >= 0) & (local < self.n_local)).nonzero(as_tuple=True)  # pairs owned here
        out = torch.zeros_like(x)
        if token.numel():  # each owned pair as a one-expert "token": any experts module runs them as is
            y = self.experts(x[token], weights[token, slot][:, None], local[token, slot][:, None])
            out.index_add_(0, token, y)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x)
        y = self.routed(x, weights, indices)
        s = None
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
        if s is not None and (self.shared_split or self.comm is None):
            y, s = y + s, None  # partial + partial: one reduction for both
        if self.comm is not None:
            y = self.comm.all_reduce(y)
        if s is not None:  # a whole shared expert (tp = 1) joins after the routed sum is complete
            y = y + s
        return y.view(shape)


def vocab_lookup(embed: nn.Module, ids: torch.Tensor, start: int, n: int, comm: Comm) -> torch.Tensor:
    """ids [B, S] -> [B, S, d] from an embedding holding rows [start, start + n) of the vocabulary (an
    nn.Embedding, or the fast path's TiedEmbedding): ids elsewhere look up zeros, one all-reduce completes
    the sum."""
    local = ids - start
    elsewhere = (local < 0) | (local >= n)
    h = embed(local.masked_fill(elsewhere, 0)).masked_fill(elsewhere[..., None], 0.0)
    return comm.all_reduce(h)


def parallel_ffn(block: Block, plan: ParallelPlan, comm: Comm, n_routed: int) -> ParallelBlock:
    """`block` as a `ParallelBlock`, its MoE (if any) as a `ParallelMoE` over this rank's experts."""
    if isinstance(block.ffn, MoE):
        inter = block.ffn.experts.w1.shape[1]  # the local config's (the block is built from it)
        block.ffn = ParallelMoE(block.ffn, n_routed // plan.ep, inter, plan, comm)
    return ParallelBlock(block, plan, comm)


class ParallelMTPLayer(MTPLayer):
    """An `MTPLayer` holding one rank's shard: the block split as the main model's layers, the embedding and
    head by vocabulary rows (lookup all-reduced, logits all-gathered), eh_proj and the norms whole."""

    def __init__(self, ref: MTPLayer, plan: ParallelPlan, comm: Comm, vocab_local: int, n_routed: int):
        nn.Module.__init__(self)
        self.cfg, self.enorm, self.hnorm, self.eh_proj, self.norm = ref.cfg, ref.enorm, ref.hnorm, ref.eh_proj, ref.norm
        self.block = parallel_ffn(ref.block, plan, comm, n_routed)
        self.embed, self.head = ref.embed, ref.head
        self.tp, self.comm, self.vocab_local, self.vocab_start = plan.tp, comm, vocab_local, plan.tp_rank * vocab_local
        if plan.tp > 1:
            d = ref.eh_proj.out_features
            self.embed = nn.Embedding(vocab_local, d)
            self.head = nn.Linear(d, vocab_local, bias=False)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return self.embed(ids)
        return vocab_lookup(self.embed, ids, self.vocab_start, self.vocab_local, self.comm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)  # [B, S, vocab / tp]
        return logits if self.tp == 1 else self.comm.all_gather_last(logits)


class ParallelTransformer(Transformer):
    """A `Transformer` holding one rank's shard (see the module docstring). `cfg` is the rank's local
    config (global vocabulary size); `full_cfg` the checkpoint's."""

    def __init__(self, full_cfg: ModelConfig, plan: ParallelPlan, comm: Comm):
        cfg = local_config(full_cfg, plan)
        super().__init__(cfg)
        self.full_cfg, self.parallel, self.comm = full_cfg, plan, comm
        V, d = cfg.vocab_size, cfg.hidden_size
        self.vocab_local = V // plan.tp
        self.vocab_start = plan.tp_rank * self.vocab_local  # ids [start, start + vocab_local) live here
        if plan.tp > 1:
            self.embed = nn.Embedding(self.vocab_local, d)
            self.head = nn.Linear(d, self.vocab_local, bias=False)
            if cfg.tie_word_embeddings:
                self.head.weight = self.embed.weight
        n_routed = full_cfg.moe.n_routed_experts if full_cfg.moe is not None else 0
        self.layers = nn.ModuleList(parallel_ffn(ref, plan, comm, n_routed) for ref in self.layers)
        self.mtp = nn.ModuleList(ParallelMTPLayer(ref, plan, comm, self.vocab_local, n_routed) for ref in self.mtp)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S] -> [B, S, d]: each rank looks up its vocabulary range, one all-reduce completes it."""
        if self.parallel.tp == 1:
            return self.embed(ids)
        return vocab_lookup(self.embed, ids, self.vocab_start, self.vocab_local, self.comm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, S, d] -> the whole logits [B, S, vocab] on every rank: each rank's vocabulary slice, gathered."""
        logits = self.head(h)  # [B, S, vocab / tp]
        return logits if self.parallel.tp == 1 else self.comm.all_gather_last(logits)

    def sync_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens every rank decodes next: rank 0's (sampled there), broadcast. The runtime calls this
        after each sampling step (`Decoder.agree`), so all ranks follow one plan."""
        return self.comm.broadcast(tokens, src=0)

    def describe_parallel(self) -> str:
        """One line for the implementation plan."""
        p = self.parallel
        ex = f"routed experts {self.layers_experts()}" if self.full_cfg.is_moe else "no routed experts"
        return f"{p.describe()} ({self.comm.backend}); heads {self.cfg.num_heads}/{self.full_cfg.num_heads} " \
               f"per rank, vocabulary {self.vocab_local}/{self.cfg.vocab_size}, {ex}"

    def layers_experts(self) -> str:
        for layer in self.layers:
            if isinstance(layer.ffn, ParallelMoE):
                f = layer.ffn
                if f.n_local < f.n_experts:
                    return f"{f.expert_start}..{f.expert_start + f.n_local - 1} of {f.n_experts} here"
                return f"all {f.n_experts}, intermediate split {self.parallel.expert_tp} ways"
        return "none"
