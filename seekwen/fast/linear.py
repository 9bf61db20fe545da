"""Fast linear layers for inference, swapped in by `seekwen.fast.prepare(model)`.

The plain model uses `nn.Linear` (weight [out, in], `F.linear`), the reference. Batch-1/batch-8 decode
on this kind of CPU is bound by streaming weights, and the BLAS serves few-row products poorly (see
/work/shared/cpu-measurements.md), so up to `kernels.MAX_ROWS` rows on CPU every layer uses an AVX2 or
AVX-512 kernel (`kernels.py`) that streams each [out, in] weight row once; more rows (prefill) run our
GEMM, faster than the BLAS here (`kernels.f32_gemm` for fp32 from GEMM_ROWS rows; `kernels.gemm`, which
decodes the weight slice by slice, for bf16 / fp16 and the block formats' exact path above CHUNKED_ROWS),
int8 / int4 the BLAS on the dequantized weight (Q8_0 / Q4_0 with int8 activations run `kernels.qmm` for
any number of rows, faster than BLAS even at 512). One class per weight format (`make_linear(w, b, fmt)`):

- `FastLinear`: fp32 weight [out, in] as loaded; `kernels.f32_mm` (< GEMM_ROWS rows), `kernels.f32_gemm`.
- `Half16Linear`: bf16 or fp16 weight [out, in] (`--quantize bf16|f16`), widened to fp32 in registers;
  bf16 on a CPU with AVX512-BF16 by default against bf16-rounded activations (`kernels.bf16_mm`).
- `Q8_0Linear`, `Q4_0Linear`: GGUF's block formats, 32 input channels per block with one fp16 scale d:
  w = q * d with q int8 (Q8_0) or q in -8..7 stored as 4-bit codes q + 8 (Q4_0). `from_float` quantizes
  exactly as ggml does; `from_blocks(q, d)` takes GGUF's blocks (the GGUF loader's entry point).
  in % 32 != 0: `make_linear` keeps that layer in bf16.
- `Int8Linear`: int8 weight [out, in] with one fp32 scale per output channel (symmetric, absmax/127).
- `Int4Linear`: 4-bit weight in groups of `group_size` input channels, asymmetric (scale and zero per
  group and output channel), two codes per byte.
All are weight-only with fp32 activations, except that Q8_0 / Q4_0 on the kernel path quantize the
activations to int8 blocks by default, and bf16 weights (on CPUs with AVX512-BF16) round them to bf16, as
llama.cpp does for these types (`ACTIVATIONS`, `block_activations`);
see `kernels.py` for why not PyTorch's int8/int4 ops.

Every class also has `dequantized()` -> the fp32 [out, in] weight it computes with, the exact reference
the tests compare against. `fuse(linears)` stacks several projections of the same input (q/k/v,
gate/up) into one layer whose output is their concatenation: one product instead of three.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # [..., in] -> [M, in]


# FastLinear: from this many rows f32_gemm; fewer, f32_mm (any row count, 8 rows a pass with AVX-512). The
# GEMM's tiles hold 16 or 32 rows, so at 17-19 rows it computes up to 15 padding rows: there f32_mm was
# 4-29% faster, from 20 rows on they were even, and from 24 the GEMM pulled ahead (scripts/bench_gemm.py
# --few, one thread, Zen 4)
GEMM_ROWS = 20


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


# FastLinear on an Intel CPU: from this many rows the BLAS (F.linear: MKL, tuned for Intel's cores) instead of
# f32_gemm. Measured on a 2-core Sapphire-Rapids-class guest (scripts/bench_gemm.py --threads 2, 0.5B shapes):
# MKL 1.3-1.5x f32_gemm from 128 rows, even or behind below (f32_gemm 1.45-1.53x on the wide gate/up at
# 32-64 rows). On the AMD Zen 4 host MKL was 2x slower at 32 rows and 1.1-1.6x at 512: f32_gemm at every size.
BLAS_ROWS = 128 if _intel_cpu() else None


class FastLinear(nn.Module):
    """y = x W^T + b with W stored [out, in] contiguous (the nn.Linear layout). fp32 on CPU: fewer than
    GEMM_ROWS rows (decode) the few-row SIMD kernel `kernels.f32_mm`, more (prefill; on an Intel CPU up to
    BLAS_ROWS rows, beyond them MKL's `F.linear`) the GEMM
    `kernels.f32_gemm` (faster than the BLAS on this CPU: ~1.5-3x at 32 rows, ~1.1-1.6x at 512);
    otherwise (bf16, GPU, no compiler): F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x)  # [M, in]
        k = kernels.get() if self.weight.dtype == torch.float32 and kernels.usable(x2[: kernels.MAX_ROWS],
                                                                                 self.weight) else None
        if k is None:
            return F.linear(x, self.weight, self.bias)
        M = x2.shape[0]
        if BLAS_ROWS is not None and M >= BLAS_ROWS:
            return F.linear(x, self.weight, self.bias)
        mm = k.f32_mm if M < GEMM_ROWS else k.f32_gemm  # [M, out]
        return mm(x2.contiguous(), self.weight, self.bias).view(*x.shape[:-1], self.out_features)

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


def chunked_mm(k, x: torch.Tensor, w: torch.Tensor, d: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """`kernels.mm` over x [M, in] (M up to CHUNKED_ROWS) in calls of at most MAX_ROWS rows: a few
    prefill rows read the stored weight in place instead of a widened fp32 copy."""
    return torch.cat([k.mm(x[i : i + kernels.MAX_ROWS], w, d, bias) for i in range(0, x.shape[0], kernels.MAX_ROWS)])


class Half16Linear(nn.Module):
    """16-bit weights (bf16 or fp16) [out, in], y = x W^T + b with fp32 accumulation. bf16 weights on a CPU
    with AVX512-BF16 and ACTIVATIONS "q8" (the default, llama.cpp's arithmetic for BF16): x rounded to bf16
    once per call, products by vdpbf16ps, fp32 output (`kernels.bf16_mm`), any number of rows. Otherwise
    (fp16 weights, "fp32" activations, no AVX512-BF16) the exact path, fp32 activations: up to
    CHUNKED_ROWS rows on CPU the SIMD kernel widens each weight to fp32 in registers (`kernels.mm`, 16 rows
    a call; bf16 by a shift, fp16 by F16C); more: the GEMM (`kernels.gemm`), which widens the weight one
    slice at a time into a small fp32 buffer; no kernels: `F.linear` on the widened weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"Half16Linear: weight must be bf16 or fp16, got {weight.dtype}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @property
    def fmt(self) -> str:
        return "bf16" if self.weight.dtype == torch.bfloat16 else "f16"

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()  # [out, in]

    def bf16_activations(self, k=None) -> bool:
        """Whether this layer rounds its activations to bf16 (`kernels.bf16_mm`) on CPU: bf16 weights, the
        kernels built (k, default kernels.get()) with AVX512-BF16 usable, ACTIVATIONS not "fp32"."""
        k = kernels.get() if k is None else k
        return (self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu" and ACTIVATIONS != "fp32"
                and k is not None and k.has_bf16_mm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x).float().contiguous()  # [M, in]
        M = x2.shape[0]
        k = kernels.get() if kernels.usable(x2[: kernels.MAX_ROWS], self.weight) else None
        if k is not None and self.bf16_activations(k):  # bf16 x bf16 -> fp32 (vdpbf16ps), any number of rows
            y = k.bf16_mm(x2, self.weight, self.bias)
        elif k is None:  # no kernels: BLAS on the widened weight
            y = F.linear(x2, self.dequantized(), self.bias)
        elif M > CHUNKED_ROWS:  # many rows (prefill): the GEMM, widening the weight slice by slice
            y = k.gemm(x2, self.weight, None, self.bias)
        else:  # up to CHUNKED_ROWS: the kernel over 16-row chunks, no fp32 copy of the weight per call
            y = chunked_mm(k, x2, self.weight, None, self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.fmt}"


QK = 32  # weights per block of the GGUF block formats (Q8_0, Q4_0): one fp16 scale d each


def _fp16(d: torch.Tensor) -> torch.Tensor:
    """Block scales as GGUF stores them: fp16 (a float32 scale is rounded to the nearest fp16)."""
    return d.detach().float().to(torch.float16).contiguous()


def _check_blocks(name: str, q: torch.Tensor, d: torch.Tensor) -> None:
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"{name}: q must be int8 [N, K], got {q.dtype} {tuple(q.shape)}")
    N, K = q.shape
    if K % QK:
        raise ValueError(f"{name}: K = {K} is not a multiple of the block size {QK}")
    if tuple(d.shape) != (N, K // QK):
        raise ValueError(f"{name}: d must be [N, K // {QK}] = [{N}, {K // QK}], got {tuple(d.shape)}")


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), which ggml uses; torch.round rounds halves to even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _blocks_of(w: torch.Tensor, name: str) -> torch.Tensor:
    """w [N, K] -> fp32 [N, K // 32, 32]."""
    if w.dim() != 2 or w.shape[1] % QK:
        raise ValueError(f"{name}: weight [N, K] needs K % {QK} == 0, got {tuple(w.shape)}")
    return w.detach().float().reshape(w.shape[0], -1, QK)


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's Q8_0 (quantize_row_q8_0_ref): per block of 32, d = amax / 127, q = roundf(x * (1 / d)).
    w [N, K] -> (q int8 [N, K], d fp16 [N, K // 32])."""
    b = _blocks_of(w, "Q8_0")  # [N, K/32, 32]
    d = b.abs().amax(dim=-1) / 127.0  # [N, K/32], fp32
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = _round_half_away(b * inv[..., None]).to(torch.int8)
    return q.reshape(w.shape), _fp16(d)


def quantize_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's Q4_0 (quantize_row_q4_0_ref): per block of 32, the (first) element of largest |x| with its
    sign, d = max / -8, q = min(15, trunc(x * (1 / d) + 8.5)) - 8, d stored as fp16.
    w [N, K] -> (q int8 [N, K] in -8..7, d fp16 [N, K // 32])."""
    b = _blocks_of(w, "Q4_0")  # [N, K/32, 32]
    mx = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # [N, K/32], signed
    d = mx / -8.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(b * inv[..., None] + 8.5), max=15) - 8  # x * inv + 8.5 >= 0.5: trunc = floor
    return q.to(torch.int8).reshape(w.shape), _fp16(d)


def pack_q4_0(q: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] in -8..7 -> uint8 [N, K // 2] in GGUF's block order: byte j of a block of 32 holds
    q[j] + 8 in its low nibble and q[j + 16] + 8 in its high nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(q.shape[0], -1, 2, QK // 2)  # [N, K/32, halves, 16]
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


def unpack_q4_0(p: torch.Tensor) -> torch.Tensor:
    """pack_q4_0's inverse: uint8 [N, K // 2] -> int8 [N, K] in -8..7."""
    b = p.reshape(p.shape[0], -1, QK // 2)  # [N, K/32, 16]
    u = torch.stack((b & 15, b >> 4), dim=2)  # [N, K/32, 2, 16]
    return (u.to(torch.int8) - 8).reshape(p.shape[0], -1)


# 16-bit and block formats, exact (fp32-activation) path: up to this many rows run the few-row kernel in
# chunks of kernels.MAX_ROWS (each chunk streams the weight once); more, the GEMM (kernels.gemm, the
# weight decoded slice by slice), which is faster there (scripts/bench_gemm.py --formats)
CHUNKED_ROWS = 64

# How the block formats (Q8_0, Q4_0) and bf16 weights treat activations on the kernel path (CPU, fp32,
# kernels built), llama.cpp's arithmetic for these types or the exact one:
# - "q8" (the default): rounded activations, as llama.cpp does.
#   Q8_0 / Q4_0: each activation row is quantized once per call to int8 blocks of 32 with one fp32 scale
#   each (ggml's quantize_row_q8_0), then integer dot products against the weight blocks (`kernels.qmm`,
#   AVX512-VNNI / AVX-VNNI), any number of rows. Results differ from dequantize-then-run by the
#   activations' rounding: per output at most sum_b d_x[b] / 2 * sum_(k in b) |w[k]| (see
#   `q8_error_bound`), about the size of Q8_0's own weight error.
#   bf16 weights (`Half16Linear`, CPUs with AVX512-BF16 only; elsewhere the exact path): each activation
#   row is rounded once per call to bf16 (nearest even), products by vdpbf16ps, fp32 accumulation and
#   output (`kernels.bf16_mm`), any number of rows. Differs from the exact result by at most
#   sum_k |x - bf16(x)| |w| (`bf16_error_bound`; |x - bf16(x)| <= 2^-9 |x|). fp16 weights: always exact;
# - "fp32": the exact path: fp32 activations against the weights decoded in registers (`kernels.mm`, up
#   to CHUNKED_ROWS rows), else `kernels.gemm` (the blocks decoded to fp32 slice by slice); equal to
#   dequantize-then-run up to summation order.
# SEEKWEN_BLOCK_ACTIVATIONS=fp32 picks the exact one for a process, `block_activations("fp32")` for a block
# (both for the block formats and bf16 weights).
ACTIVATIONS = os.environ.get("SEEKWEN_BLOCK_ACTIVATIONS", "q8")
_ACTIVATION_MODES = ("q8", "fp32")


@contextlib.contextmanager
def block_activations(mode: str):
    """Run the block formats and bf16 weights with "q8" (rounded activations: int8 blocks for Q8_0 / Q4_0,
    kernels.qmm; bf16 for bf16 weights, kernels.bf16_mm) or "fp32" (exact) activations inside the
    with-block; see ACTIVATIONS."""
    global ACTIVATIONS
    if mode not in _ACTIVATION_MODES:
        raise ValueError(f"block activations: one of {_ACTIVATION_MODES}, got {mode!r}")
    before, ACTIVATIONS = ACTIVATIONS, mode
    try:
        yield
    finally:
        ACTIVATIONS = before


def q8_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N] bound on |x w^T - xq w^T| from quantizing x [M, K] to int8 blocks of 32 (the "q8" activations):
    each activation moves by at most half its block's step d_x = amax / 127, so output n moves by at most
    sum_b d_x[b] / 2 * sum_(k in b) |w[n, k]|. w: the (dequantized) weight [N, K]."""
    M, K = x.shape
    dx = x.float().reshape(M, -1, QK).abs().amax(-1) / 127.0  # [M, K/32]
    wabs = w.float().abs().reshape(w.shape[0], -1, QK).sum(-1)  # [N, K/32]
    return (dx / 2) @ wabs.T


def bf16_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N] bound on |x w^T - bf16(x) w^T| from rounding x [M, K] to bf16 (bf16 weights' default
    activations): sum_k |x[m, k] - bf16(x[m, k])| |w[n, k]|. w: the weight [N, K]."""
    x = x.float()
    return ((x - x.bfloat16().float()).abs().double() @ w.double().abs().T).float()


class _BlockLinear(nn.Module):
    """Shared by the GGUF block formats: codes (`self.codes`), fp16 block scales d [out, in // 32], bias.
    On CPU with the kernels: "q8" activations (ACTIVATIONS, the default): `kernels.qmm` against the blocks
    repacked once, at first use, in groups of 16 rows (`kernels.qpack`; kept beside the codes), any number
    of rows; "fp32": up to CHUNKED_ROWS rows `kernels.mm` decodes each block to fp32 in registers (d applied
    per block) against the fp32 activations, more (prefill) the GEMM `kernels.gemm` (decoding one slice of
    the weight at a time into a small fp32 buffer); no kernels: F.linear with the dequantized weight."""

    fmt = ""

    def _setup(self, codes: torch.Tensor, d: torch.Tensor, in_features: int, bias: torch.Tensor | None) -> None:
        self.in_features, self.out_features = in_features, codes.shape[0]
        self.codes = nn.Parameter(codes.contiguous(), requires_grad=False)
        self.d = nn.Parameter(_fp16(d), requires_grad=False)  # [out, in // 32] fp16
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._qpacked: tuple[int, torch.Tensor] | None = None  # (id of the codes, kernels.qpack's groups)
        self._codes_shape = tuple(self.codes.shape)
        self.keep_codes = False  # set once the codes are read directly (the exact path, moe_experts)

    def int_codes(self) -> torch.Tensor:  # int8 [out, in]
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        return dequantize_q(self.int_codes(), self.d)  # [out, in]

    def packed(self, k) -> torch.Tensor:
        """The blocks as `kernels.qmm` reads them (`kernels.qpack`, uint8 [ceil(out / 16), in / 32, bytes]),
        built at first use and again if the codes were replaced. Then the packed copy is the only one: the
        codes' storage is released (`stored_codes` rebuilds it from the packed blocks when something reads
        the codes themselves), so a layer holds its weights once."""
        if self._qpacked is None or self._qpacked[0] != id(self.codes):
            self._qpacked = (id(self.codes), k.qpack(self.stored_codes(), self.d))
            if not self.keep_codes:
                self.codes.data = self.codes.data.new_empty(0)
        return self._qpacked[1]

    def stored_codes(self, keep: bool = False) -> torch.Tensor:
        """The codes as stored (`self.codes`), rebuilt from the packed blocks if `packed` released them;
        `keep`: the caller reads them on every call, so they stay from now on."""
        if self.codes.numel() == 0 and self._qpacked is not None:
            self.codes.data = unpack_qpacked(self._qpacked[1], self._codes_shape, self.fmt)
        self.keep_codes = self.keep_codes or keep
        return self.codes

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.stored_codes()  # a state dict holds the codes themselves
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x).float().contiguous()  # [M, in]
        M = x2.shape[0]
        k = kernels.get() if kernels.usable(x2[: kernels.MAX_ROWS], self.d) else None
        if k is not None and ACTIVATIONS == "q8":  # int8 activations, integer dots: any number of rows
            y = k.qmm(x2, self.packed(k), self.out_features, self.bias)
        elif k is None:  # no kernels: BLAS on the dequantized weight
            y = F.linear(x2, self.dequantized(), self.bias)
        elif M > CHUNKED_ROWS:  # exact path, many rows (long prefill): the GEMM, decoding slice by slice
            y = k.gemm(x2, self.stored_codes(keep=True), self.d, self.bias)
        else:  # exact path up to CHUNKED_ROWS: the kernel over 16-row chunks, no fp32 copy of the weight
            y = chunked_mm(k, x2, self.stored_codes(keep=True), self.d, self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.fmt} (blocks of {QK}, fp16 scales)"


class Q8_0Linear(_BlockLinear):
    """GGUF's Q8_0: w = q * d per block of 32 input channels, q int8 [out, in], d fp16 [out, in // 32]."""

    fmt = "q8_0"

    def __init__(self, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        _check_blocks("Q8_0", q, d)
        self._setup(q, d, q.shape[1], bias)

    @classmethod
    def from_blocks(cls, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None) -> Q8_0Linear:
        """q int8 [N, K], d [N, K // 32] (any float dtype; kept as fp16, as GGUF stores it):
        weight = (q.view(N, K // 32, 32) * d[..., None]).reshape(N, K)."""
        return cls(q, d, bias)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> Q8_0Linear:
        return cls(*quantize_q8_0(w), bias)

    def int_codes(self) -> torch.Tensor:
        return self.stored_codes()


class Q4_0Linear(_BlockLinear):
    """GGUF's Q4_0: w = q * d per block of 32 input channels, q in -8..7 stored as nibbles q + 8 in GGUF's
    block order (`pack_q4_0`, uint8 [out, in // 2]), d fp16 [out, in // 32]."""

    fmt = "q4_0"

    def __init__(self, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        _check_blocks("Q4_0", q, d)
        if q.numel() and (q.min() < -8 or q.max() > 7):
            raise ValueError("Q4_0: q must be in -8..7")
        self._setup(pack_q4_0(q), d, q.shape[1], bias)

    @classmethod
    def from_blocks(cls, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None) -> Q4_0Linear:
        """q int8 [N, K] in -8..7, d [N, K // 32] (kept as fp16, as GGUF stores it):
        weight = (q.view(N, K // 32, 32) * d[..., None]).reshape(N, K)."""
        return cls(q, d, bias)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> Q4_0Linear:
        return cls(*quantize_q4_0(w), bias)

    def int_codes(self) -> torch.Tensor:
        return unpack_q4_0(self.stored_codes())


def unpack_qpacked(p: torch.Tensor, shape: tuple[int, int], fmt: str) -> torch.Tensor:
    """`kernels.qpack`'s groups p [G, K / 32, bytes] -> the codes as `Q8_0Linear` / `Q4_0Linear` store them
    (int8 [N, K] / GGUF nibbles uint8 [N, K / 2]); the layout is csrc/q8dot.h's: per group of 16 rows and
    block of 32 inputs, chunks of 64 bytes whose byte 4r + i is row r's code of input 4j + i (Q8_0: q + 128)
    or, Q4_0, inputs 8j + i (low nibble) and 8j + 4 + i (high), codes q + 8."""
    G, nb = p.shape[:2]
    if fmt == "q8_0":
        b = p[:, :, :512].reshape(G, nb, 8, 16, 4).permute(0, 3, 1, 2, 4)  # [G, r, nb, j, i]
        return (b.reshape(G * 16, nb * QK)[: shape[0]].to(torch.int16) - 128).to(torch.int8).contiguous()
    b = p[:, :, :256].reshape(G, nb, 4, 16, 4)  # [G, nb, j, r, i]
    codes = torch.stack((b & 15, b >> 4), dim=3).permute(0, 4, 1, 2, 3, 5)  # [G, r, nb, j, half, i]
    q = codes.reshape(G * 16, nb * QK)[: shape[0]].to(torch.int8) - 8
    return pack_q4_0(q)


def dequantize_q(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q8_0 / Q4_0 integer codes q [N, K] and block scales d [N, K // 32] -> the fp32 weight [N, K]."""
    N, K = q.shape
    return (q.float().view(N, K // QK, QK) * d.float()[..., None]).reshape(N, K)


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a FastLinear. A lean GGUF load leaves a layer that runs its
    file's form unfilled (`weight_unloaded`, seekwen.gguf.loader.load_tensors): its weight is then
    dequantized from the blocks (or 16-bit weight) it carries, `gguf_blocks`."""
    if not getattr(layer, "weight_unloaded", False):
        return layer.weight
    _, q, d = layer.gguf_blocks  # F16 / BF16 as stored (d None), or Q8_0 / Q4_0 codes and scales
    return q.float() if d is None else dequantize_q(q, d)


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    return getattr(layer, "bias", None)


QUANTIZE = (None, "bf16", "f16", "q8_0", "q4_0", "int8", "int4")  # the weight formats make_linear knows


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quantize: str | None = None, group_size: int = 64
) -> nn.Module:
    """The fast layer for weight [out, in]: as given (None), bf16 / f16 weights, GGUF's Q8_0 / Q4_0 blocks,
    or the per-channel int8 / group-asymmetric int4. Rules for shapes a format cannot hold: q8_0 / q4_0
    with in % 32 != 0 keep that layer in bf16; int4 with in % group_size != 0 keeps it int8."""
    if quantize is None:
        return FastLinear(weight, bias)
    if quantize in ("bf16", "f16"):
        return Half16Linear(weight.detach().to(torch.bfloat16 if quantize == "bf16" else torch.float16), bias)
    if quantize in ("q8_0", "q4_0"):
        if weight.shape[1] % QK:
            return Half16Linear(weight.detach().to(torch.bfloat16), bias)
        return (Q8_0Linear if quantize == "q8_0" else Q4_0Linear).from_float(weight, bias)
    if quantize == "int8":
        return Int8Linear(weight, bias)
    if quantize == "int4":
        if weight.shape[1] % group_size:
            return Int8Linear(weight, bias)  # rows that do not split into groups: keep int8
        return Int4Linear(weight, bias, group_size)
    raise ValueError(f"unknown quantization {quantize!r} (use one of {', '.join(q for q in QUANTIZE if q)})")


def block_linear(kind: str, q: torch.Tensor, d: torch.Tensor | None, bias: torch.Tensor | None = None) -> nn.Module:
    """The kernel layer of a GGUF weight as stored: kind "Q8_0" / "Q4_0", q int8 [N, K], d [N, K // 32];
    or "F16" / "BF16", q the 16-bit weight [N, K], d None."""
    if kind in ("F16", "BF16"):
        return Half16Linear(q, bias)
    cls = {"Q8_0": Q8_0Linear, "Q4_0": Q4_0Linear}[kind]
    return cls.from_blocks(q, d, bias)


def fuse(layers: list[nn.Module], quantize: str | None = None, group_size: int = 64) -> nn.Module:
    """One layer computing the concatenated outputs of `layers` (same input). Layers that carry GGUF
    weights of one kind (`gguf_blocks`, see seekwen.gguf.quant / loader.keep_half) fuse as stored: rows
    of blocks (or of 16-bit weights) stacked."""
    blocks = [getattr(layer, "gguf_blocks", None) for layer in layers]
    if quantize is None and all(blocks) and len({b[0] for b in blocks}) == 1:
        b = None
        if any(bias_of(layer) is not None for layer in layers):
            b = torch.cat([bias_of(la).detach() if bias_of(la) is not None else torch.zeros(q.shape[0])
                           for la, (_, q, _) in zip(layers, blocks, strict=True)])
        d = None if blocks[0][2] is None else torch.cat([d for _, _, d in blocks])
        return block_linear(blocks[0][0], torch.cat([q for _, q, _ in blocks]), d, b)
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


KERNEL_FORMATS = ("float32", "bf16", "f16", "q8_0", "q4_0")  # weight_format()s that kernels.mm / moe_experts take


def kernel_operands(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, block scales or None) as `kernels.mm` / `moe_experts` take them, for the layers whose format
    they serve (fp32, bf16, f16, q8_0, q4_0); None for the others (int8 per-channel, int4 groups)."""
    if isinstance(layer, _BlockLinear):
        return layer.stored_codes(keep=True), layer.d
    if isinstance(layer, (FastLinear, Half16Linear)) and layer.weight.dtype in (torch.float32, torch.bfloat16,
                                                                                  torch.float16):
        return layer.weight, None
    return None


def weight_format(layer: nn.Module) -> str:
    """The weight format of a fast linear layer: fp32, bf16, f16, q8_0, q4_0, "int8 per-channel", "int4 group G"."""
    if isinstance(layer, (Half16Linear, _BlockLinear)):
        return layer.fmt
    if isinstance(layer, Int8Linear):
        return "int8 per-channel"
    if isinstance(layer, Int4Linear):
        return f"int4 group {layer.group_size}"
    return str(layer.weight.dtype).removeprefix("torch.")


def describe_linear(layer: nn.Module) -> str:
    """Which implementation a linear layer of the fast path runs, e.g. "fp32 f32_mm[avx512] < 20 rows, else
    f32_gemm[avx512]"."""
    fmt = weight_format(layer)
    plain = isinstance(layer, FastLinear)
    on_cpu = next(layer.parameters()).device.type == "cpu"
    if plain and layer.weight.dtype != torch.float32 or not on_cpu or kernels.get() is None:
        return f"{fmt} {'F.linear' if plain else 'dequantize + F.linear'}"
    if isinstance(layer, _BlockLinear) and ACTIVATIONS == "q8":
        return f"{fmt} qmm[{kernels.get().qisa()}] int8 activations, any rows"
    if isinstance(layer, Half16Linear) and layer.bf16_activations():
        return f"{fmt} bf16_mm[avx512bf16] bf16 x bf16 -> fp32 (vdpbf16ps), any rows"
    isa = isa_name()
    if plain:
        blas = "" if BLAS_ROWS is None else f" < {BLAS_ROWS} rows, else F.linear (MKL: an Intel CPU)"
        return f"{fmt} f32_mm[{isa}] < {GEMM_ROWS} rows, else f32_gemm[{isa}]{blas}"
    if isinstance(layer, (Half16Linear, _BlockLinear)):
        return f"{fmt} mm[{isa}] <= {CHUNKED_ROWS} rows ({kernels.MAX_ROWS} a call), else gemm[{isa}]"
    name = "int8_mm" if isinstance(layer, Int8Linear) else "int4_mm"
    return f"{fmt} {name}[{isa}] <= {kernels.MAX_ROWS} rows, else dequantize + BLAS"
