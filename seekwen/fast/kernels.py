"""Small C++ CPU kernels for y[M, N] = x[M, K] . W[N, K]^T: few rows (M <= 16: decode); fp32 prefill.

Batch-1/batch-8 decode on this CPU is bound by streaming weights. The BLAS in torch 2.13 reaches only
~60% of the read bandwidth for one row and serves 8-row products poorly (~35 GFLOP/s), and PyTorch's
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` stream only ~1.7 / ~0.5 GB/s of weights for a
single row here. So these kernels are written with explicit SIMD intrinsics (the C++ is in `csrc/`) and
compiled once, at first use, with `torch.utils.cpp_extension.load` (`-O3 -mavx2 -mfma -mf16c -fopenmp`,
cached under ~/.cache/torch_extensions):

- `mm(x, w, d, bias)`: any weight format, chosen by w's dtype: fp32, bf16 or fp16 [N, K] (d None;
  widened to fp32 in registers, exactly), int8 [N, K] with fp16 block scales d [N, K / 32] (GGUF's
  Q8_0), uint8 [N, K / 2] packed 4-bit codes with d (GGUF's Q4_0, `linear.pack_q4_0`'s order);
  activations and accumulation fp32;
- `bf16_mm(x, w, bias)`: bf16 weights [N, K] as stored with bf16 activations, llama.cpp's arithmetic for
  BF16 (ggml_vec_dot_bf16): x rounded once per call to bf16 (nearest even, `round_bf16(x)`, as
  x.bfloat16()), products by AVX512-BF16's vdpbf16ps, fp32 accumulation and fp32 output, any number of
  rows (few: register-blocked dots streaming each weight row once; many: a tiled kernel with 16 activation
  rows per vector, csrc/bf16dot.h). Only where `has_bf16_mm()` (an AVX512-BF16 CPU, isa() avx512);
- `f32_mm(x, w, bias)`: fp32 weights [N, K] (the usual nn.Linear layout);
- `f32_gemm(x, w, bias)`: the same product for many rows (prefill; any M is correct), fp32 accumulation,
  W read in place: outer-product tiles of 32 (AVX-512; 16 AVX2) rows of x transposed per call times 12
  (6) weight rows broadcast from W, K and N blocked for L2 (csrc/gemm.h). The BLAS (MKL) in torch is
  slow for these shapes on AMD CPUs: ~2x slower at 32 rows, ~1.3x at 512 (scripts/bench_gemm.py);
- `gemm(x, w, d, bias)`: the same for mm's 16-bit and block formats, the weights widened to fp32 one
  slice (~384 KB of fp32) at a time into a per-thread buffer (no fp32 copy of the whole weight);
- `f32_bmm(x, w)`: per-head products x [H, M, K] . w[H, N, K]^T (MLA's absorbed decode);
- `moe_experts(xs, w13s, w2s, rows, d13s, d2s)`: the routed SwiGLU experts of one MoE layer in any of
  mm's formats, all experts' gate/up products in one threaded pass, SiLU * up, all down products in a
  second pass;
- `mla_decode(q_lat, q_pe, kv, pe, n, scale)`: absorbed-MLA attention of one new token per sequence
  against the cached latents (scores as f32_mm tiles, softmax, values as `f32_mm_kn`: y = x . w for w
  stored [K, N], the probabilities broadcast against the latents' rows);
- `int8_mm(x, q, scale, bias)`: int8 weights [N, K], one fp32 scale per output row;
- `int4_mm(x, packed, scales, zeros, group, bias)`: two 4-bit codes per byte, scale/zero per group of
  `group` input channels (group a multiple of 8), as `linear.Int4Linear` defines them;
- `qmm(x, packed, N, bias)`: GGUF's Q8_0 / Q4_0 with int8 activations, llama.cpp's scheme: each row of x
  quantized once per call to int8 blocks of 32 (`quantize_act(x)` -> (q, d, block sums), ggml's
  quantize_row_q8_0), exact integer dot products per block (AVX512-VNNI / AVX-VNNI `vpdpbusd`, AVX2
  maddubs, or scalar: `qisa()` / `set_qisa`, all bit-identical), y += float(dot) * d_w * d_x per block;
  any number of rows. The weights first go through `qpack(codes, d)`: blocks regrouped so one 512-bit
  vector holds 4 input channels of 16 output rows (layout: csrc/q8dot.h), so each weight load serves up
  to 8 activation rows at once;
- `qmm_grouped(xs, packed, rows, N)`: qmm per group, rows[g] consecutive rows of xs against packed[g], one
  threaded pass over all groups (MLA's absorbed W_UK / W_UV per head, from a GGUF file's k_b / v_b blocks);
- `qmm_experts(xs, p13s, p2s, rows, I)`: `moe_experts` for Q8_0 / Q4_0 experts with int8 activations:
  xs quantized once, every chosen expert's gate/up against its qpack'ed blocks in one threaded pass,
  silu(gate) * up quantized once, every down product in a second pass; each expert's rows equal `qmm`'s.
- `paged_attention(...)` (`csrc/paged.h`, see `paged_kernels`), `rms_norm(x, w, eps)` (see `step_ops`) and
  `DecodeStep` / `StepLinear` (`csrc/step.h`, see `compiled_step`): a whole decode step in one call.

The sources: `csrc/kernels.cpp` (the torch-facing functions and the instruction-set dispatch) compiles
the shared loop templates `csrc/loops.h` twice, once with AVX2 vectors (`vec_avx2.h`) and once with
AVX-512 vectors (`vec_avx512.h`); every format is a small "decoder" there that hands the one loop fp32
lanes of weights; kernels.cpp's header comment describes the loop structure. `csrc/q8dot.h` (qmm) is
compiled three times, with the integer vector traits of `csrc/vec_int.h` for AVX512-VNNI, AVX-VNNI and
AVX2; its scalar twin is in kernels.cpp. `csrc/bf16dot.h` (bf16_mm) is compiled once, with AVX512-BF16
enabled for it alone (`#pragma GCC target`), so the module still builds and loads on other CPUs. Which
instruction set runs
is chosen at run time (AVX-512 where the CPU has it), or forced with SEEKWEN_KERNELS=avx2 (`set_isa`);
`describe()` says which one is active. If no compiler is available (or the CPU lacks AVX2), `get()`
returns None and the layers fall back to `F.linear` / dequantize + `torch.mm` (same results up to
summation order).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "kernels.cpp"]  # it #includes loops.h, gemm.h, vec_avx2.h, vec_avx512.h, paged.h and step.h
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # OpenMP: else at::parallel_for runs serially
LDFLAGS = ["-fopenmp"]
FUNCTIONS = ("f32_mm", "f32_gemm", "mm", "gemm", "f32_bmm", "int8_mm", "int4_mm", "moe_experts", "mla_decode", "isa",
             "set_isa", "qpack", "qmm", "qmm_grouped", "qmm_experts", "quantize_act", "qisa", "set_qisa", "bf16_mm",
             "round_bf16", "has_bf16_mm", "paged_attention", "rms_norm", "StepLinear", "DecodeStep")

MAX_ROWS = 16  # the few-row kernels serve up to this many activation rows (decode); more: f32_gemm (fp32) or BLAS

_module = None
_tried = False
_unavailable = ""  # why get() returned None (set by get())


def _extension_name() -> str:
    """One extension name (and build folder under ~/.cache/torch_extensions) per source folder, so two
    checkouts sharing the cache do not rebuild over each other's build each time they alternate."""
    return "seekwen_kernels_" + hashlib.sha1(str(CSRC.resolve()).encode()).hexdigest()[:8]


def _why_not() -> str:
    """Why the kernels cannot be built or run here ("" if nothing speaks against trying)."""
    if os.environ.get("SEEKWEN_NO_KERNELS"):
        return "disabled (SEEKWEN_NO_KERNELS is set)"
    machine = platform.machine()
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return f"not x86 ({machine})"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"no AVX2 on this CPU (torch's CPU capability: {cap})"
    return ""


def _build():
    """Compile (or load the cached build of) the extension; None, with a warning, where that fails."""
    global _unavailable
    try:
        from torch.utils.cpp_extension import load

        # no fused multiply-adds but the explicit ones: qmm's int8 activations round x * (1 / d) exactly
        # as the tests' torch reference does (an fma contracted into that would move halves)
        return load(_extension_name(), sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS + ["-ffp-contract=off"],
                    extra_ldflags=LDFLAGS, verbose=False)
    except Exception as e:  # no compiler, no headers, no ninja, a compile error: fall back
        cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension compiles with
        if shutil.which(cxx) is None:
            _unavailable = f"no C++ compiler ({cxx} not found)"
        else:
            lines = str(e).strip().splitlines()
            _unavailable = f"build failed ({lines[0][:200] if lines else type(e).__name__})"
        warnings.warn(f"seekwen: CPU kernels unavailable, using F.linear / dequantize + mm ({e})", stacklevel=3)
        return None


def get():
    """The compiled extension (the FUNCTIONS above), or None where it cannot be built. SEEKWEN_NO_KERNELS=1
    disables it (then F.linear / dequantize + torch.mm run); SEEKWEN_KERNELS=avx2 keeps the AVX2 code on an
    AVX-512 CPU (default: AVX-512 where the CPU has it)."""
    global _module, _tried, _unavailable
    if _tried:
        return _module
    _tried = True
    _unavailable = _why_not()
    if _unavailable:
        return None
    _module = _build()
    if _module is None:
        return None
    want = os.environ.get("SEEKWEN_KERNELS", "").lower()
    if want not in ("", "auto"):
        try:
            _module.set_isa(want)
        except RuntimeError:
            warnings.warn(f"seekwen: SEEKWEN_KERNELS={want} unknown or not here, using {_module.isa()}", stacklevel=2)
    return _module


def describe() -> str:
    """Which kernels run on this machine, for reports: "avx512" or "avx2" (the instruction set in use), or
    "unavailable: <why>" (disabled, not x86, no AVX2, no compiler, build failed), in which case the layers
    use F.linear / dequantize + torch.mm. Builds the kernels on first use, as get() does."""
    k = get()
    return k.isa() if k is not None else f"unavailable: {_unavailable}"


def isas() -> list[str]:
    """The instruction sets the kernels can run with on this machine (for tests and benchmarks)."""
    k = get()
    if k is None:
        return []
    current, out = k.isa(), []
    for name in ("avx2", "avx512"):
        try:
            k.set_isa(name)
            out.append(name)
        except RuntimeError:
            pass
    k.set_isa(current)
    return out


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernels serve x [M, K] against weight w: CPU, fp32 activations, M <= MAX_ROWS."""
    return x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32 and 0 < x.shape[0] <= MAX_ROWS
