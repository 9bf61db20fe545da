"""The decoder every family shares: embed -> N x [RMSNorm -> attention -> + ; RMSNorm -> MLP/MoE -> +]
-> RMSNorm -> LM head. Which attention (GQA or MLA), which layers are MoE and which slide is all in
the `ModelConfig`; a family is configuration plus a weight map, never a copy of this file."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .batch import ForwardBatch, KVStore, kept_tokens
from .mla import MLA
from .mlp import MLP
from .moe import MoE
from .mtp import MTPLayer
from .norm import RMSNorm
from .rope import RotaryEmbedding, logn_scale, qwen_ntk_alpha


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, layer) if cfg.mla is not None else Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.mlp_layers and cfg.mlp_layers[layer]:
            self.ffn: nn.Module = MoE(cfg.hidden_size, cfg.moe)
        else:
            self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), batch)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """A causal LM for any supported family. `model(input_ids)` -> logits [B, S, vocab].

    The model computes; the runtime decides: calls over a KV cache come with a `ForwardBatch` built by
    `seekwen.runtime.decoder.Decoder`. `model.generate(...)` is the runtime's `generate`, attached as a
    method by the top-level package (`seekwen/__init__.py`), so this package never imports the runtime."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        # DeepSeek-V3 multi-token prediction (empty unless the config has num_nextn_predict_layers)
        self.mtp = nn.ModuleList(MTPLayer(cfg) for _ in range(cfg.num_mtp_layers))
        self.rope = RotaryEmbedding(cfg.rope)
        self.tokenizer = None  # set by seekwen.load when the checkpoint has one

    def blocks(self) -> list[Block]:
        """Every decoder block: the main model's layers, then the MTP layers' blocks."""
        return [*self.layers, *(m.block for m in self.mtp)]

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def batch(
        self,
        positions: torch.Tensor,
        *,
        kv: KVStore | None = None,
        n_keys: int = 0,
        key_counts: list[int] | None = None,
        new_valid: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        causal: bool = False,
        ntk_alpha: torch.Tensor | None = None,
        rope_bound: int | None = None,
    ) -> ForwardBatch:
        """Describe one forward call: rotary tables and LogN factors for `positions` [B, S] plus what the
        caller (the runtime) knows about the keys. `ntk_alpha` [B]: Qwen v1's per-sequence NTK alpha;
        `rope_bound`: a known bound on the positions, so nothing is read back to the host (CUDA graphs)."""
        rope = self.cfg.rope
        cos, sin = self.rope(positions, alpha=ntk_alpha, bound=rope_bound)
        logn = logn_scale(positions, rope.seq_length) if self.cfg.logn_attn and rope.seq_length else None
        return ForwardBatch(positions, cos, sin, kv=kv, n_keys=n_keys, key_counts=key_counts, new_valid=new_valid,
                            key_valid=key_valid, logn=logn, causal=causal)

    def uncached_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> ForwardBatch:
        """The batch of a call without a KV cache: positions count real tokens (any padding side)."""
        B, S = input_ids.shape
        causal = positions is None and attention_mask is None and S > 1
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(S, device=input_ids.device).expand(B, S)
        alpha = None
        if self.cfg.rope.type == "qwen_dynamic":  # alpha from each sequence's true length (Qwen v1)
            true_len = attention_mask.long().sum(-1) if attention_mask is not None else positions.max(-1).values + 1
            alpha = ntk_alphas(true_len.tolist(), self.cfg.rope.seq_length)
        return self.batch(positions, key_valid=attention_mask, causal=causal, ntk_alpha=alpha)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        batch: ForwardBatch | None = None,
        keep: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, S] -> logits [B, S, vocab]; with `keep` [B] (an index per row), only the logits
        at that index: [B, 1, vocab] (saves the vocab-sized product for every prompt token); with `keep`
        = (rows [n], indices [n]), only those n rows' logits [n, 1, vocab] (none: the head is skipped).
        `return_hidden`: (logits, hidden [B, S, hidden_size]), the final-normed hidden state of every
        token whatever `keep` says (what DeepSeek-V3's multi-token-prediction layer reads).

        attention_mask [B, S] marks real tokens (1) and padding (0); positions then count real tokens,
        so left- and right-padded rows give the same logits as unpadded ones. `batch`: a call over a KV
        cache, described by the runtime (`runtime.decoder.Decoder`); it replaces mask and positions."""
        if batch is None:
            batch = self.uncached_batch(input_ids, attention_mask, positions)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, batch)
        if return_hidden:
            h = self.norm(h)
            return self.logits(kept_tokens(h, keep)), h
        h = kept_tokens(h, keep)
        if h.shape[0] == 0:  # no row wants logits (prefill chunks before a prompt's last): no head product
            return h.new_empty(0, 1, self.cfg.vocab_size)
        return self.logits(self.norm(h))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S] -> embeddings [B, S, hidden] (a tensor-parallel model overrides it)."""
        return self.embed(ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, S, hidden] -> logits [B, S, vocab] (a tensor-parallel model
        overrides it to gather its vocabulary slices)."""
        return self.head(h)


def ntk_alphas(true_lens: list[int], seq_length: int) -> torch.Tensor:
    """Qwen v1's per-sequence NTK alpha [B] (float64) from each sequence's true length."""
    return torch.tensor([qwen_ntk_alpha(int(n), seq_length) for n in true_lens], dtype=torch.float64)
