"""Fast linear layers for inference, swapped in by `seekwen.fast.prepare(model)`.

The plain model uses `nn.Linear` (weight [out, in], `F.linear`), the reference. Batch-1/batch-8 decode
on this kind of CPU is bound by streaming weights, and the BLAS serves few-row products poorly (see
/work/shared/cpu-measurements.md), so up to `kernels.MAX_ROWS` rows on CPU every layer uses an AVX2 or
AVX-512 kernel (`kernels.py`) that streams each [out, in] weight row once; more rows (prefill) use the BLAS.

- `FastLinear`: fp32/bf16 weight [out, in] contiguous; `kernels.f32_mm` (fp32, few rows) or `F.linear`.
- `Int8Linear`: int8 weight [out, in] with one fp32 scale per output channel (symmetric, absmax/127).
- `Int4Linear`: 4-bit weight in groups of `group_size` input channels, asymmetric (scale and zero per
  group and output channel), two codes per byte.
Both are weight-only: activations stay fp32; see `kernels.py` for why not PyTorch's int8/int4 ops.

Every class also has `dequantized()` -> the fp32 [out, in] weight it computes with, the exact reference
the tests compare against. `fuse(linears)` stacks several projections of the same input (q/k/v,
gate/up) into one layer whose output is their concatenation: one product instead of three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # [..., in] -> [M, in]


class FastLinear(nn.Module):
    """y = x W^T + b with W stored [out, in] contiguous (the nn.Linear layout). fp32 on CPU with at most
    `kernels.MAX_ROWS` rows (decode): the SIMD kernel; otherwise (prefill, bf16, no compiler): F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x)  # [M, in]
        k = kernels.get() if self.weight.dtype == torch.float32 and kernels.usable(x2, self.weight) else None
        if k is None:
            return F.linear(x, self.weight, self.bias)
        return k.f32_mm(x2.contiguous(), self.weight, self.bias).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 [out, in], fp32 scales [out]); w ~= q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


KERNEL_MAX_ROWS = kernels.MAX_ROWS  # up to this many rows (decode) use the kernels; more: BLAS


class Int8Linear(nn.Module):
    """Weight-only int8 with per-output-channel scales: y = x @ (q * scale)^T + b, activations fp32.
    Few rows: the SIMD kernel streaming the int8 weight (`kernels.int8_mm`); more rows (prefill):
    dequantize to fp32 and `F.linear` (compute-bound there)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        q, scale = quantize_int8(weight)
        self.q = nn.Parameter(q, requires_grad=False)  # [out, in] int8
        self.scale = nn.Parameter(scale, requires_grad=False)  # [out]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x).float().contiguous()
        k = kernels.get() if kernels.usable(x2, self.q) else None
        if k is not None:
            y = k.int8_mm(x2, self.q, self.scale, self.bias)
        else:
            y = F.linear(x2, self.dequantized(), self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (codes uint8 [out, in] in 0..15, scales [out, G], zeros [out, G]) with
    w ~= (code - 8) * scale + zero per group of `group_size` input channels (asymmetric min/max)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    zero = lo + 8 * scale  # the value code 8 decodes to
    code = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return code.reshape(out_f, in_f), scale, zero


class Int4Linear(nn.Module):
    """Weight-only int4, groups of `group_size` input channels, two codes per byte."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 64):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if self.in_features % group_size or group_size % 2:
            raise ValueError(f"int4: in_features {self.in_features} is not a multiple of group size {group_size}")
        self.group_size = group_size
        code, scale, zero = quantize_int4(weight, group_size)
        packed = code[:, 0::2] | (code[:, 1::2] << 4)  # [out, in/2]
        self.packed = nn.Parameter(packed.contiguous(), requires_grad=False)
        self.scales = nn.Parameter(scale.contiguous(), requires_grad=False)  # [out, G]
        self.zeros = nn.Parameter(zero.contiguous(), requires_grad=False)  # [out, G]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        code = torch.stack((self.packed & 15, self.packed >> 4), dim=-1).reshape(self.out_features, -1)
        g = code.float().view(self.out_features, -1, self.group_size) - 8
        w = g * self.scales[..., None] + self.zeros[..., None]
        return w.reshape(self.out_features, self.in_features)  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x).float().contiguous()
        k = kernels.get() if self.group_size % 8 == 0 and kernels.usable(x2, self.packed) else None
        if k is not None:
            y = k.int4_mm(x2, self.packed, self.scales, self.zeros, self.group_size, self.bias)
        else:
            y = F.linear(x2, self.dequantized(), self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}"


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a FastLinear."""
    return layer.weight


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    return getattr(layer, "bias", None)


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quantize: str | None = None, group_size: int = 64
) -> nn.Module:
    """The fast layer for weight [out, in]: fp32 (as given), int8 or int4."""
    if quantize is None:
        return FastLinear(weight, bias)
    if quantize == "int8":
        return Int8Linear(weight, bias)
    if quantize == "int4":
        if weight.shape[1] % group_size:
            return Int8Linear(weight, bias)  # rows that do not split into groups: keep int8
        return Int4Linear(weight, bias, group_size)
    raise ValueError(f"unknown quantization {quantize!r} (use int8 or int4)")


def fuse(layers: list[nn.Module], quantize: str | None = None, group_size: int = 64) -> nn.Module:
    """One layer computing the concatenated outputs of `layers` (same input)."""
    w = torch.cat([weight_of(layer).detach() for layer in layers], dim=0)  # [sum(out), in]
    b = None
    if any(bias_of(layer) is not None for layer in layers):
        parts = [bias_of(la) if bias_of(la) is not None else w.new_zeros(weight_of(la).shape[0]) for la in layers]
        b = torch.cat([p.detach() for p in parts])
    return make_linear(w, b, quantize, group_size)


def reference_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer computed the plain way from its dequantized weight (the tests' reference)."""
    b = bias_of(layer)
    return F.linear(x.float(), layer.dequantized(), None if b is None else b.float())


def isa_name() -> str:
    """The instruction set the CPU kernels run with ("avx512", "avx2"), or "off" where they are unavailable."""
    k = kernels.get()
    return k.isa() if k is not None else "off"


def describe_linear(layer: nn.Module) -> str:
    """Which implementation a linear layer of the fast path runs, e.g. "fp32 f32_mm[avx512] <= 8 rows, else BLAS"."""
    w = getattr(layer, "weight", None)
    if isinstance(layer, Int8Linear):
        fmt, name = "int8 per-channel", "int8_mm"
    elif isinstance(layer, Int4Linear):
        fmt, name = f"int4 group {layer.group_size}", "int4_mm"
    else:
        fmt, name = str(w.dtype).removeprefix("torch."), "f32_mm"
    on_cpu = next(layer.parameters()).device.type == "cpu"
    if isinstance(layer, FastLinear) and w.dtype != torch.float32 or not on_cpu or kernels.get() is None:
        slow = "F.linear" if isinstance(layer, FastLinear) else "dequantize + F.linear"
        return f"{fmt} {slow}"
    prefill = "BLAS" if isinstance(layer, FastLinear) else "dequantize + BLAS"
    return f"{fmt} {name}[{isa_name()}] <= {kernels.MAX_ROWS} rows, else {prefill}"
