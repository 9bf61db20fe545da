"""`prepare(model)`: turn a loaded model into its inference fast path, in place.

The plain modules stay the reference; this swaps in equivalent pieces:
- every `nn.Linear` -> `FastLinear` (AVX2 kernel for decode, `F.linear` for prefill), or int8 / int4 layers;
- q/k/v (GQA) and gate/up (MLP, shared experts) fused into one product each; for MLA the query
  projection (wq or wq_a) and wkv_a fused, and W_UK / W_UV kept contiguous for absorbed decode;
- stacked MoE experts -> `GroupedExperts`: per expert one fused gate/up product and one down product
  over just the tokens routed to it, weights read in place (no per-token loop, no weight copies);
- a tied LM head -> one [vocab, hidden] matrix, which the embedding lookup reads rows of (no 2nd copy);
- RMSNorm -> `FastRMSNorm` (one fused `F.rms_norm` for fp32).
The router (`Gate`) stays as it is: tiny, and its fp32 numerics matter for which experts are chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import Attention
from ..model.mla import MLA
from ..model.mlp import MLP
from ..model.moe import Experts, MoE, dispatch, dispatch_sorted
from ..model.norm import RMSNorm
from . import kernels
from .linear import FastLinear, fuse, make_linear

QUANTIZE = (None, "int8", "int4")


class GroupedExperts(nn.Module):
    """E SwiGLU experts, each a fused gate/up layer w13 [dim -> 2*inter] and a down layer w2.

    Tokens are grouped by expert with one argsort; each expert that received tokens runs one
    product over exactly those tokens. With few tokens (decode) that is at most N*k experts, each
    read once, in place. fp32 on CPU with at most `kernels.MAX_ROWS` tokens: all chosen experts run in
    one C++ call (`kernels.moe_experts`: two threaded passes over their weights, no per-expert ops)."""

    def __init__(self, experts: Experts, quantize: str | None = None, group_size: int = 64):
        super().__init__()
        E = experts.w1.shape[0]
        self.n_experts = E
        self.w13 = nn.ModuleList(
            make_linear(torch.cat((experts.w1[e], experts.w3[e]), 0).detach(), None, quantize, group_size)
            for e in range(E)
        )
        self.w2 = nn.ModuleList(make_linear(experts.w2[e].detach(), None, quantize, group_size) for e in range(E))
        self.fused = quantize is None and experts.w1.dtype == torch.float32  # moe_experts' case

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13[e](h).chunk(2, dim=-1)
        return self.w2[e](F.silu(gate) * up)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, dim], weights/indices [N, k] -> sum_k weights * expert_k(x) [N, dim]."""
        N, k = indices.shape
        kern = kernels.get() if self.fused and kernels.usable(x, self.w13[0].weight) else None
        if kern is not None:
            return self._fused_forward(kern, x, weights, indices)
        if N == 1:  # decode, one token: k experts, no grouping needed
            out = torch.zeros_like(x)
            for j, e in enumerate(indices[0].tolist()):
                out.add_(self.expert(e, x) * weights[0, j].to(x.dtype))
            return out
        return dispatch(x, weights, indices, self.n_experts, self.expert)

    def _fused_forward(self, kern, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`dispatch`'s grouping, with the experts themselves in one C++ call over the chosen experts'
        weights (read in place)."""

        def run(xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
            active = [e for e, n in enumerate(counts) if n]
            return kern.moe_experts(
                xs.contiguous(),
                [self.w13[e].weight for e in active],
                [self.w2[e].weight for e in active],
                [counts[e] for e in active],
            )

        return dispatch_sorted(x, weights, indices, self.n_experts, run)


class FastRMSNorm(RMSNorm):
    """RMSNorm as one fused op (`F.rms_norm`). For fp32 it is the reference's math exactly. On CUDA it is
    used for every dtype (one kernel instead of ~7 per norm, which matters when a decode step is a few
    hundred tiny kernels): it normalises in fp32 and rounds once, where the reference (HF) rounds the
    normalised value to bf16 before scaling; the difference is within one bf16 rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 or x.is_cuda) and self.weight.dtype == x.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return super().forward(x)


class TiedEmbedding(nn.Module):
    """Embedding lookup from the tied LM head's weight [vocab, hidden]: ids -> rows."""

    def __init__(self, head: FastLinear):
        super().__init__()
        self.head = [head]  # not a submodule: the head owns the weight

    @property
    def weight(self) -> torch.Tensor:
        return self.head[0].weight  # [vocab, hidden]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _fast(layer: nn.Module, quantize: str | None, group_size: int) -> nn.Module:
    return make_linear(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), quantize, group_size)


def _prepare_attention(a: Attention, quantize: str | None, group_size: int) -> None:
    a.wqkv = fuse([a.wq, a.wk, a.wv], quantize, group_size)
    a.wq = a.wk = a.wv = None
    a.wo = _fast(a.wo, quantize, group_size)


def _prepare_mla(a: MLA, quantize: str | None, group_size: int) -> None:
    w = a.wkv_b.weight.detach().view(a.n_heads, a.nope + a.v_dim, a.kv_lora_rank)
    a.w_uk = w[:, : a.nope].contiguous()  # [H, d_nope, r]
    a.w_uv = w[:, a.nope :].transpose(1, 2).contiguous()  # W_UV^T [H, r, d_v]
    # few-row decode on CPU: the per-head kernel's layout
    if w.dtype == torch.float32 and w.device.type == "cpu" and kernels.get() is not None:
        a.w_uk_t = a.w_uk.transpose(1, 2).contiguous()  # [H, r, d_nope]
        a.w_uv_t = w[:, a.nope :].contiguous()  # [H, d_v, r]
    first = a.wq if a.q_lora_rank is None else a.wq_a
    a.wq_kv_a = fuse([first, a.wkv_a], quantize, group_size)
    if a.q_lora_rank is None:
        a.wq = None
    else:
        a.wq_a = None
        a.wq_b = _fast(a.wq_b, quantize, group_size)
    a.wkv_a = None
    a.wkv_b = FastLinear(a.wkv_b.weight.detach())  # prefill (naive) path; kept fp32: it is small
    a.wo = _fast(a.wo, quantize, group_size)


def _prepare_mlp(m: MLP, quantize: str | None, group_size: int) -> None:
    m.w13 = fuse([m.w1, m.w3], quantize, group_size)
    m.w1 = m.w3 = None
    m.w2 = _fast(m.w2, quantize, group_size)


@torch.no_grad()
def prepare(model: nn.Module, quantize: str | None = None, group_size: int = 64) -> nn.Module:
    """Swap in the fast path (see module docstring). quantize: None (fp32/bf16 as loaded), "int8"
    (per-output-channel) or "int4" (groups of `group_size` input channels). Idempotent."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r} (use int8 or int4)")
    if getattr(model, "prepared", None) is not None:
        return model
    for block in model.layers:
        attn = block.attn
        if isinstance(attn, MLA):
            _prepare_mla(attn, quantize, group_size)
        else:
            _prepare_attention(attn, quantize, group_size)
        ffn = block.ffn
        if isinstance(ffn, MLP):
            _prepare_mlp(ffn, quantize, group_size)
        elif isinstance(ffn, MoE):
            if ffn.experts.w1.device.type == "cpu" or quantize:
                ffn.experts = GroupedExperts(ffn.experts, quantize, group_size)
            # else (GPU, unquantized): the stacked experts stay; they run as grouped matmuls (moe.dispatch_grouped)
            if ffn.shared is not None:
                _prepare_mlp(ffn.shared, quantize, group_size)
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = FastRMSNorm  # same parameters, fused forward
    tied = model.cfg.tie_word_embeddings
    model.head = _fast(model.head, quantize, group_size)
    if tied and quantize is None:
        model.embed = TiedEmbedding(model.head)
    model.prepared = quantize or "fp"
    return model
