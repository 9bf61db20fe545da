"""Multi-head Latent Attention (DeepSeek-V2/V3/R1).

Keys and values are compressed into one small latent per token, c_kv = RMSNorm(W_DKV x) of
`kv_lora_rank` numbers, plus one rotated key k_pe of `qk_rope_head_dim` shared by all heads. Only
(c_kv, k_pe) are cached. Per head h, W_UK[h] and W_UV[h] (the rows of `wkv_b`) decompress them:

    k_h = [W_UK[h] c_kv ; k_pe]      v_h = W_UV[h] c_kv

Two equal ways to attend:
- naive:    decompress K and V for every cached token, then ordinary attention;
- absorbed: fold W_UK into the query (q_nope^T W_UK[h] c = (W_UK[h]^T q_nope)^T c) and W_UV into the
            output, so attention runs directly against the cached latents. Decode then reads
            (kv_lora_rank + qk_rope_head_dim) numbers per cached token and nothing is re-expanded.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import sdpa
from .batch import ForwardBatch
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.setup(cfg, layer)
        m, d, H = cfg.mla, cfg.hidden_size, cfg.num_heads
        bias = cfg.qkv_bias
        if m.q_lora_rank is None:
            self.wq = nn.Linear(d, H * (self.nope + self.rope), bias=False)
        else:
            self.wq_a = nn.Linear(d, m.q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(m.q_lora_rank, 1e-6)  # the latent norms use 1e-6 in every reference
            self.wq_b = nn.Linear(m.q_lora_rank, H * (self.nope + self.rope), bias=False)
        self.wkv_a = nn.Linear(d, m.kv_lora_rank + self.rope, bias=bias)
        self.kv_norm = RMSNorm(m.kv_lora_rank, 1e-6)
        self.wkv_b = nn.Linear(m.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, d, bias=cfg.o_bias)

    def setup(self, cfg: ModelConfig, layer: int) -> None:
        """The layer's shape and settings (no weights): shared with the fast path's sibling class."""
        m = cfg.mla
        assert m is not None
        self.cfg, self.layer = cfg, layer
        self.n_heads = cfg.num_heads
        self.q_lora_rank, self.kv_lora_rank = m.q_lora_rank, m.kv_lora_rank
        self.nope, self.rope, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.interleaved = cfg.rope.interleaved
        self.window = cfg.sliding_window[layer] if cfg.sliding_window else None  # only by override
        self.scale = cfg.softmax_scale or (self.nope + self.rope) ** -0.5
        # "auto": absorbed when few new tokens meet many cached ones (decode), naive otherwise
        self.mode = "auto"

    def use_absorbed(self, n_new: int, cached: bool) -> bool:
        if self.mode != "auto":
            return self.mode == "absorb"
        return cached and n_new < (self.nope + self.v_dim) // 2

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        B, S, _ = x.shape
        H = self.n_heads
        q, kv_a = self.project(x)
        q = q.view(B, S, H, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_norm(kv)  # [B, S, r]: the latent c_kv
        q_pe = apply_rope(q_pe, batch.cos, batch.sin, self.interleaved)
        k_pe = apply_rope(k_pe[:, :, None, :], batch.cos, batch.sin, self.interleaved)[:, :, 0]  # [B, S, dr]
        if batch.logn is not None:  # Qwen-style LogN past the training length (by config override)
            s = batch.logn[:, :, None, None].to(q_nope.dtype)
            q_nope, q_pe = q_nope * s, q_pe * s
        if batch.kv is not None:
            stored = batch.kv.write(self.layer, batch.positions, batch.n_keys, kv=kv, pe=k_pe)
            if not batch.causal:  # (causal: the cached entries are exactly the new ones, already in hand)
                kv, k_pe = stored["kv"], stored["pe"]  # [B, T, r], [B, T, dr]
        if self.use_absorbed(S, batch.kv is not None):
            counts = batch.key_counts if self.window is None else None
            out = self.absorbed(q_nope, q_pe, kv, k_pe, batch.mask(self.window, kv.shape[1]), counts)
        else:
            mask = None if batch.causal_ok(self.window, S) else batch.mask(self.window, kv.shape[1])
            out = self.naive(q_nope, q_pe, kv, k_pe, mask)
        return self.wo(out.reshape(B, S, H * self.v_dim))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> (q [B, S, H*(nope+rope)], wkv_a output [B, S, r + rope])."""
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        return q, self.wkv_a(x)

    def naive(self, q_nope, q_pe, kv, k_pe, mask) -> torch.Tensor:
        B, T, _ = kv.shape
        H = self.n_heads
        kv = self.wkv_b(kv).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, T, H, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        return sdpa(q, k, v, mask, self.scale)

    def absorbed(self, q_nope, q_pe, kv, k_pe, mask, counts: list[int] | None = None) -> torch.Tensor:
        """Attention against the cached latents (q_nope [B, S, H, d_nope], kv [B, T, r]) -> [B, S, H, d_v].
        `counts` (keys each row sees, one new token per row) lets a fast implementation skip the mask."""
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, d_nope, r], [H, d_v, r]
        q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)  # query moved into latent space
        scores = torch.einsum("bshr,btr->bhst", q_lat, kv) + torch.einsum("bshd,btd->bhst", q_pe, k_pe)
        scores = (scores * self.scale).masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
        o_lat = torch.einsum("bhst,btr->bshr", probs, kv)  # attention output, still latent
        return torch.einsum("bshr,hdr->bshd", o_lat, w_uv)
