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
from .attention import AttnContext, sdpa
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        m = cfg.mla
        assert m is not None
        self.layer = layer
        self.n_heads = cfg.num_heads
        self.q_lora_rank, self.kv_lora_rank = m.q_lora_rank, m.kv_lora_rank
        self.nope, self.rope, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.interleaved = cfg.rope.interleaved
        self.window = cfg.sliding_window[layer] if cfg.sliding_window else None  # only by override
        self.scale = cfg.softmax_scale or (self.nope + self.rope) ** -0.5
        # "auto": absorbed when few new tokens meet many cached ones (decode), naive otherwise
        self.mode = "auto"
        d, H = cfg.hidden_size, cfg.num_heads
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
        # fast path (fast.prepare): the query projection (wq or wq_a) and wkv_a in one product, and
        # W_UK [H, d_nope, r] / W_UV^T [H, r, d_v] kept contiguous for absorbed decode
        self.wq_kv_a: nn.Module | None = None
        self.w_uk: torch.Tensor | None = None
        self.w_uv: torch.Tensor | None = None
        self.w_uk_t: torch.Tensor | None = None  # W_UK^T [H, r, d_nope] and W_UV [H, d_v, r]: the kernels' layout
        self.w_uv_t: torch.Tensor | None = None

    def use_absorbed(self, n_new: int, cached: bool) -> bool:
        if self.mode != "auto":
            return self.mode == "absorb"
        return cached and n_new < (self.nope + self.v_dim) // 2

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, S, _ = x.shape
        H = self.n_heads
        q, kv_a = self.project(x)
        q = q.view(B, S, H, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_norm(kv)  # [B, S, r]: the latent c_kv
        q_pe = apply_rope(q_pe, ctx.cos, ctx.sin, self.interleaved)
        k_pe = apply_rope(k_pe[:, :, None, :], ctx.cos, ctx.sin, self.interleaved)[:, :, 0]  # [B, S, dr]
        if ctx.logn is not None:  # Qwen-style LogN past the training length (by config override)
            s = ctx.logn[:, :, None, None].to(q_nope.dtype)
            q_nope, q_pe = q_nope * s, q_pe * s
        if ctx.cache is not None:
            stored = ctx.cache.write(self.layer, ctx.positions, used=ctx.n_keys or None, kv=kv, pe=k_pe)
            if not ctx.causal:  # (causal: the cached entries are exactly the new ones, already in hand)
                kv, k_pe = stored["kv"], stored["pe"]  # [B, T, r], [B, T, dr]
        if self.use_absorbed(S, ctx.cache is not None):
            counts = ctx.key_counts if self.window is None else None
            out = self.absorbed(q_nope, q_pe, kv, k_pe, ctx.mask(self.window, kv.shape[1]), counts)
        else:
            mask = None if ctx.causal_ok(self.window, S) else ctx.mask(self.window, kv.shape[1])
            out = self.naive(q_nope, q_pe, kv, k_pe, mask)
        return self.wo(out.reshape(B, S, H * self.v_dim))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> (q [B, S, H*(nope+rope)], wkv_a output [B, S, r + rope])."""
        if self.wq_kv_a is None:
            q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
            return q, self.wkv_a(x)
        q_dim = self.q_lora_rank or self.n_heads * (self.nope + self.rope)
        q, kv_a = self.wq_kv_a(x).split([q_dim, self.kv_lora_rank + self.rope], dim=-1)
        if self.q_lora_rank is not None:
            q = self.wq_b(self.q_norm(q))
        return q, kv_a

    def naive(self, q_nope, q_pe, kv, k_pe, mask) -> torch.Tensor:
        B, T, _ = kv.shape
        H = self.n_heads
        kv = self.wkv_b(kv).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, T, H, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        return sdpa(q, k, v, mask, self.scale)

    def absorbed(self, q_nope, q_pe, kv, k_pe, mask, counts: list[int] | None = None) -> torch.Tensor:
        if self.w_uk is not None:
            return self.absorbed_heads_first(q_nope, q_pe, kv, k_pe, mask, counts)
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, d_nope, r], [H, d_v, r]
        q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)  # query moved into latent space
        scores = torch.einsum("bshr,btr->bhst", q_lat, kv) + torch.einsum("bshd,btd->bhst", q_pe, k_pe)
        scores = (scores * self.scale).masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
        o_lat = torch.einsum("bhst,btr->bshr", probs, kv)  # attention output, still latent
        return torch.einsum("bshr,hdr->bshd", o_lat, w_uv)

    def absorbed_heads_first(self, q_nope, q_pe, kv, k_pe, mask, counts: list[int] | None = None) -> torch.Tensor:
        """`absorbed` with the per-head products laid out [H, B*S, .] against contiguous W_UK [H, d_nope, r]
        and W_UV^T [H, r, d_v] (set by fast.prepare): that form runs as fast matrix-vector products
        on CPU, where the [B, S, H, .] einsum falls back to a slow batched kernel. One new token per row
        with `counts` (keys each row sees) on CPU: the attention itself is one kernel call
        (`kernels.mla_decode`), so decode stays close to flat as the cache grows."""
        from ..fast import kernels

        B, S, H, _ = q_nope.shape
        T = kv.shape[1]
        q_h = q_nope.permute(2, 0, 1, 3).reshape(H, B * S, self.nope)
        use_k = self.w_uk_t is not None and kernels.usable(q_h[0], self.w_uk_t)
        k = kernels.get() if use_k else None  # few rows (decode): per-head AVX2 products
        if k is not None:
            q_lat = k.f32_bmm(q_h.contiguous(), self.w_uk_t)  # [H, B*S, r]
        else:
            q_lat = torch.einsum("hsd,hdr->hsr", q_h, self.w_uk)
        q_lat = q_lat.view(H, B, S, -1).transpose(0, 1).reshape(B, H * S, -1)  # [B, H*S, r]
        q_pe = q_pe.transpose(1, 2).reshape(B, H * S, self.rope)
        one_token = S == 1 and counts is not None and kv.dtype == torch.float32 and self.kv_lora_rank % 16 == 0
        if k is not None and one_token:
            o_lat = k.mla_decode(q_lat.contiguous(), q_pe.contiguous(), kv, k_pe, counts, self.scale)  # [B, H, r]
        else:
            # heads and queries share one batch row per sequence, so each product is a plain bmm against the
            # cached [B, T, .] latents (a transposed view, never copied or expanded per head)
            scores = torch.bmm(q_lat, kv.transpose(1, 2)) + torch.bmm(q_pe, k_pe.transpose(1, 2))  # [B, H*S, T]
            scores = (scores.view(B, H, S, T) * self.scale).masked_fill(~mask, float("-inf"))
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
            o_lat = torch.bmm(probs.view(B, H * S, T), kv)  # [B, H*S, r]
        o_h = o_lat.view(B, H, S, -1).transpose(0, 1).reshape(H, B * S, self.kv_lora_rank)
        if k is not None:
            out = k.f32_bmm(o_h.contiguous(), self.w_uv_t)  # [H, B*S, d_v]
        else:
            out = torch.einsum("hsr,hrd->hsd", o_h, self.w_uv)
        return out.view(H, B, S, self.v_dim).permute(1, 2, 0, 3)  # [B, S, H, d_v]
