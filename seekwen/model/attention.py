"""Causal self-attention: MHA/GQA with optional QKV bias (Qwen), per-head q/k RMSNorm (Qwen3),
sliding windows (Qwen2 layers), LogN query scaling (Qwen v1); and the masks every attention shares.

Attention scores are [B, H, S, T]: that S x T matrix is why naive attention costs O(S^2) memory and
time. PyTorch's scaled_dot_product_attention computes it in tiles where a fused kernel exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..runtime.cache import KVCache
from .norm import RMSNorm
from .rope import apply_rope


@dataclass
class AttnContext:
    """What every layer of one forward call shares: positions, rotary tables, cache and masks."""

    positions: torch.Tensor  # [B, S] absolute position of each new token
    cos: torch.Tensor  # [B, S, rope_dim/2]
    sin: torch.Tensor
    cache: KVCache | None = None
    key_valid: torch.Tensor | None = None  # [B, S] real (non-pad) tokens, for cache-less calls
    logn: torch.Tensor | None = None  # [B, S] Qwen v1 LogN query multiplier
    masks: dict = field(default_factory=dict)
    n_keys: int = 0  # with a cache: slots [0, n_keys) hold every key this call can see (max position + 1)
    key_counts: list[int] | None = None  # cached one-token call: keys each row sees (its position + 1)
    new_valid: torch.Tensor | None = None  # [B, S] real new tokens (right padding) in a cached call
    # every row's new tokens sit at positions 0..S-1 and are all the keys there are (a prompt with no
    # cache before it; right padding allowed, pads come last): the mask is plain causal, so attention
    # can run as a causal kernel (flash / memory-efficient) without building an S x T mask
    causal: bool = False

    def causal_ok(self, window: int | None, n_new: int) -> bool:
        return self.causal and (window is None or window >= n_new)

    def key_mask(self, window: int, key_pos: torch.Tensor) -> torch.Tensor:
        """Boolean [B, 1, S, T] for keys at explicit positions key_pos [B, T] (-1: empty slot); used by
        the ring-buffer cache of sliding-window layers, whose slots are not positions."""
        key = ("ring", window, key_pos.shape[1])
        if key not in self.masks:
            q = self.positions[:, :, None]  # [B, S, 1]
            k = key_pos[:, None, :]  # [B, 1, T]
            allowed = (k >= 0) & (k <= q) & (q - k < window)
            allowed = allowed | ~allowed.any(-1, keepdim=True)
            self.masks[key] = allowed[:, None]
        return self.masks[key]

    def mask(self, window: int | None, n_keys: int) -> torch.Tensor:
        """Boolean [B, 1, S, T]: may query (b, s) attend to key slot t?"""
        key = (window, n_keys)
        if key not in self.masks:
            q = self.positions[:, :, None]  # [B, S, 1]
            if self.cache is None:
                k = self.positions[:, None, :]  # keys are the new tokens themselves
            else:
                k = torch.arange(n_keys, device=q.device)[None, None, :]  # slot = position
            allowed = k <= q
            if window is not None:
                allowed = allowed & (q - k < window)
            if self.cache is None and self.key_valid is not None:
                allowed = allowed & self.key_valid[:, None, :].bool()
            # a row with nothing to attend to (a pad query) attends everywhere: finite, and ignored
            allowed = allowed | ~allowed.any(-1, keepdim=True)
            self.masks[key] = allowed[:, None]
        return self.masks[key]


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q [B, S, H, d], k [B, T, Hkv, d], v [B, T, Hkv, dv] -> [B, S, H, dv]. mask None: causal, T == S."""
    H, Hkv = q.shape[2], k.shape[2]
    if mask is None:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hkv != H)
        return out.transpose(1, 2)
    if Hkv != H and q.shape[1] <= GQA_FOLD_MAX_S:
        return sdpa_grouped(q, k, v, mask, scale)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Hkv != H:  # grouped-query attention: each KV head serves H/Hkv query heads
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


GQA_FOLD_MAX_S = 16  # up to this many queries (decode), fold query groups instead of repeating K/V


def sdpa_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """GQA without copying K/V per query head: the G = H/Hkv query heads sharing KV head j become G*S
    queries of one head j. Same math as repeat_interleave (head h uses KV head h // G)."""
    B, S, H, d = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    T = k.shape[1]
    qg = q.view(B, S, Hkv, G, d).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * S, d)  # rows (g, s)
    # plain math: for a handful of queries PyTorch's fused CPU kernel costs more than the product itself
    scores = (torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale).view(B, Hkv, G, S, T)
    scores = torch.where(mask[:, :, None], scores, float("-inf")).view(B, Hkv, G * S, T)  # mask [B, 1, S, T]
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs, v.transpose(1, 2))  # [B, Hkv, G*S, dv]
    return out.view(B, Hkv, G, S, -1).permute(0, 3, 1, 2, 4).reshape(B, S, H, -1)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with rotary positions."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rope_dim, self.interleaved = cfg.rope.dim, cfg.rope.interleaved
        self.window = cfg.sliding_window[layer] if cfg.sliding_window else None
        self.scale = cfg.softmax_scale or self.head_dim**-0.5
        d, hd = cfg.hidden_size, cfg.head_dim
        self.wq = nn.Linear(d, self.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * hd, d, bias=cfg.o_bias)
        self.wqkv: nn.Module | None = None  # fast path: q, k, v in one product (set by fast.prepare)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def rotate(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if self.rope_dim == x.shape[-1]:
            return apply_rope(x, ctx.cos, ctx.sin, self.interleaved)
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim :]  # partial rotary (Qwen v1 rotary_pct)
        return torch.cat((apply_rope(rot, ctx.cos, ctx.sin, self.interleaved), rest), dim=-1)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, S, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None and self.q_norm is None:  # fused: q and k are adjacent, rotated in one pass
            qk, v = self.wqkv(x).split([(H + Hkv) * hd, Hkv * hd], dim=-1)
            q, k = self.rotate(qk.view(B, S, H + Hkv, hd), ctx).split([H, Hkv], dim=2)
        else:
            if self.wqkv is not None:
                q, k, v = self.wqkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
            else:
                q, k, v = self.wq(x), self.wk(x), self.wv(x)
            q, k = q.view(B, S, H, hd), k.view(B, S, Hkv, hd)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotate(q, ctx), self.rotate(k, ctx)
        v = v.view(B, S, Hkv, hd)
        if ctx.logn is not None:
            q = q * ctx.logn[:, :, None, None].to(q.dtype)
        if ctx.cache is not None and ctx.cache.is_ring(self.layer):  # sliding window: ring-buffer cache
            k, v, key_pos = ctx.cache.write_ring(self.layer, ctx.positions, k, v, ctx.new_valid)
            mask = ctx.key_mask(self.window, key_pos)
        else:
            if ctx.cache is not None:
                kv = ctx.cache.write(self.layer, ctx.positions, used=ctx.n_keys or None, k=k, v=v)
                if not ctx.causal:  # (causal: the keys are exactly the new ones, already in hand)
                    k, v = kv["k"], kv["v"]
            mask = None if ctx.causal_ok(self.window, S) else ctx.mask(self.window, k.shape[1])
        out = sdpa(q, k, v, mask, self.scale)
        return self.wo(out.reshape(B, S, -1))
