"""Rotary position embeddings and every context-extension rule the families use.

RoPE rotates each pair of query/key dimensions by the angle `position * inv_freq[i]`, so the dot
product q_m . k_n depends only on m - n. Pair i has frequency theta^(-2i/d): pair 0 turns once per
~6 tokens (the *fast*, high-frequency end), the last pair once per tens of thousands of tokens (the
*slow*, low-frequency end). Scaling methods change `inv_freq` (and sometimes the attention scale):

- linear ("position interpolation"): every frequency / factor.
- dynamic NTK (HF): base *= (factor * L / max_pos - (factor - 1)) ** (d / (d - 2)) once L > max_pos.
- YaRN: keep fast pairs (more than `beta_fast` turns in the original context), interpolate slow pairs
  (fewer than `beta_slow` turns), ramp in between; cos/sin scaled by an attention factor.
- llama3 and longrope, as transformers defines them.
- Qwen v1 dynamic NTK: base *= alpha ** (d / (d - 2)), alpha = max(2^ceil(log2(L/seq_length) + 1) - 1, 1),
  fixed at prefill and kept while decoding; and LogN: queries at position i > seq_length are
  multiplied by log_{seq_length}(i).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RopeConfig


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(r: RopeConfig, dim: int) -> tuple[float, float]:
    """Pair indices where YaRN's ramp starts/ends: pair i makes L * inv_freq_i / 2pi turns in L tokens."""
    L = r.original_max_position_embeddings or r.max_position_embeddings

    def pair_for(turns: float) -> float:
        return dim * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = pair_for(r.beta_fast), pair_for(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def compute_inv_freq(r: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq [dim/2] (fp32) and the factor cos/sin are multiplied by, for a sequence of `seq_len`."""
    dim, theta = r.dim, r.theta
    if r.type in ("default", "qwen_dynamic"):
        return default_inv_freq(theta, dim), 1.0
    if r.type == "linear":
        return default_inv_freq(theta, dim) / r.factor, 1.0
    if r.type == "dynamic":
        L = max(seq_len or 0, r.max_position_embeddings)
        base = theta * ((r.factor * L / r.max_position_embeddings) - (r.factor - 1)) ** (dim / (dim - 2))
        return default_inv_freq(base, dim), 1.0
    if r.type == "yarn":
        factor = r.factor
        attn = r.attention_factor
        if attn is None:
            if r.mscale and r.mscale_all_dim:
                attn = yarn_get_mscale(factor, r.mscale) / yarn_get_mscale(factor, r.mscale_all_dim)
            else:
                attn = yarn_get_mscale(factor)
        pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        low, high = yarn_correction_range(r, dim)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 for fast pairs (kept as trained), 0 for slow pairs (interpolated)
        return interpolation * (1 - keep) + extrapolation * keep, float(attn)
    if r.type == "llama3":
        inv = default_inv_freq(theta, dim)
        old = r.original_max_position_embeddings
        low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / r.factor, inv)
        smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if r.type == "longrope":
        old = r.original_max_position_embeddings
        factor = r.factor if r.factor else r.max_position_embeddings / old
        attn = r.attention_factor
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        ext = torch.tensor(r.long_factor if seq_len and seq_len > old else r.short_factor, dtype=torch.float32)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (ext * theta**shape), float(attn)
    raise ValueError(f"unknown rope type {r.type!r}")


def qwen_ntk_alpha(true_len: int, seq_length: int) -> float:
    """Qwen v1's dynamic-NTK alpha for a sequence of `true_len` tokens."""
    context_value = math.log(true_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Qwen v1 LogN: multiplier for the query at 0-based `positions` (1-based i = p + 1)."""
    i = (positions + 1).double()
    scale = torch.where(i > seq_length, torch.log(i) / math.log(seq_length), torch.ones_like(i))
    return scale.float()


class RotaryEmbedding(nn.Module):
    """Gives cos/sin [B, S, dim/2] for positions [B, S]. For static rules (default, linear, YaRN,
    llama3) it keeps a table that grows on demand past `max_position_embeddings`, doubling, so a model
    runs at any length; length-dependent rules (dynamic NTK, longrope, Qwen v1 NTK) compute per call."""

    def __init__(self, rope: RopeConfig):
        super().__init__()
        self.cfg = rope
        inv_freq, self.attention_factor = compute_inv_freq(rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)

    @property
    def static(self) -> bool:
        return self.cfg.type in ("default", "linear", "yarn", "llama3")

    def _grow(self, n: int) -> None:
        size = max(self.cfg.max_position_embeddings, 1)
        while size < n:
            size *= 2
        t = torch.arange(size, device=self.inv_freq.device, dtype=torch.int64).float()
        freqs = torch.outer(t, self.inv_freq.float())
        self.cos_table = freqs.cos() * self.attention_factor
        self.sin_table = freqs.sin() * self.attention_factor

    def forward(
        self,
        positions: torch.Tensor,
        seq_len: int | None = None,
        alpha: torch.Tensor | None = None,
        bound: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] -> (cos, sin) [B, S, dim/2] in fp32. `seq_len` drives length-dependent rules
        (default: max position + 1); `alpha` [B] is Qwen v1's per-sequence NTK alpha. `bound`: a known
        upper bound on the positions (a static cache's length), so the table is sized without reading
        the positions back to the host (what CUDA-graph capture needs)."""
        if self.static:
            if bound is not None:
                need = bound
            else:
                need = int(positions.max()) + 1 if positions.numel() else 1
            if self.cos_table.shape[0] < need:
                self._grow(need)
            return self.cos_table[positions], self.sin_table[positions]
        if seq_len is None:
            seq_len = int(positions.max()) + 1 if positions.numel() else 1
        if self.cfg.type == "qwen_dynamic" and alpha is not None:
            d = self.cfg.dim
            base = self.cfg.theta * alpha.double().to(positions.device) ** (d / (d - 2))  # [B]
            expo = torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d
            inv_freq = 1.0 / (base[:, None].float() ** expo)  # [B, d/2]
            freqs = positions[..., None].float() * inv_freq[:, None, :]
            return freqs.cos(), freqs.sin()
        inv_freq, attn = compute_inv_freq(self.cfg, seq_len)
        freqs = positions[..., None].float() * inv_freq.to(positions.device)
        return freqs.cos() * attn, freqs.sin() * attn


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [B, S, H, d] by cos/sin [B, S, d/2]. Rotate-half pairs (i, i + d/2), or interleaved
    pairs (2i, 2i+1). Interleaved output is laid out de-interleaved ([rotated evens, rotated odds]);
    q and k get the same layout, so every dot product is unchanged."""
    dtype = x.dtype
    cos, sin = cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """`apply_rope` as one product: the rotation of each position as a [d, d] matrix R, so that
    apply_rope(x, cos, sin) == x @ R for x [B, S, H, d] and R [B, S, d, d] (broadcast over the heads).
    Pair i = (a, b) (rotate-half: (i, i + d/2); interleaved: (2i, 2i+1)) goes to output columns i and
    i + d/2: out_i = x_a cos - x_b sin, out_{i+d/2} = x_b cos + x_a sin. For a few tokens (decode) one
    small matmul replaces the dozen elementwise ops of apply_rope; the products are the same up to
    rounding (every other entry of R is an exact zero). cos/sin [B, S, d/2] -> R [B, S, d, d]."""
    B, S, half = cos.shape
    i = torch.arange(half, device=cos.device)
    a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
    R = cos.new_zeros(B, S, 2 * half, 2 * half)
    R[:, :, a, i] = cos
    R[:, :, b, i] = -sin
    R[:, :, b, i + half] = cos
    R[:, :, a, i + half] = sin
    return R
