"""Causal self-attention: MHA/GQA with optional QKV bias (Qwen), per-head q/k RMSNorm (Qwen3),
sliding windows (Qwen2 layers), LogN query scaling (Qwen v1); and the masks every attention shares.

Attention scores are [B, H, S, T]: that S x T matrix is why naive attention costs O(S^2) memory and
time. PyTorch's scaled_dot_product_attention computes it in tiles where a fused kernel exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .batch import ForwardBatch
from .norm import RMSNorm
from .rope import apply_rope


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
        self.setup(cfg, layer)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.wq = nn.Linear(d, self.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def setup(self, cfg: ModelConfig, layer: int) -> None:
        """The layer's shape and settings (no weights): shared with the fast path's sibling class."""
        self.cfg, self.layer = cfg, layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rope_dim, self.interleaved = cfg.rope.dim, cfg.rope.interleaved
        self.window = cfg.sliding_window[layer] if cfg.sliding_window else None
        self.scale = cfg.softmax_scale or self.head_dim**-0.5

    def rotate(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self.rope_dim == x.shape[-1]:
            return apply_rope(x, batch.cos, batch.sin, self.interleaved)
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim :]  # partial rotary (Qwen v1 rotary_pct)
        return torch.cat((apply_rope(rot, batch.cos, batch.sin, self.interleaved), rest), dim=-1)

    def project(self, x: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> rotated q [B, S, H, hd], rotated k [B, S, Hkv, hd], v [B, S, Hkv, hd]."""
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        return self.rotate(q, batch), self.rotate(k, batch), v

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.project(x, batch)
        if batch.logn is not None:
            q = q * batch.logn[:, :, None, None].to(q.dtype)
        kv = batch.kv
        if kv is not None and kv.is_ring(self.layer):  # sliding window: ring-buffer cache
            k, v, key_pos = kv.write_ring(self.layer, batch.positions, k, v, batch.new_valid)
            mask = batch.key_mask(self.window, key_pos)
        else:
            if kv is not None:
                stored = kv.write(self.layer, batch.positions, batch.n_keys, k=k, v=v)
                if not batch.causal:  # (causal: the keys are exactly the new ones, already in hand)
                    k, v = stored["k"], stored["v"]
            mask = None if batch.causal_ok(self.window, S) else batch.mask(self.window, k.shape[1])
        out = sdpa(q, k, v, mask, self.scale)
        return self.wo(out.reshape(B, S, -1))
