"""Small C++ CPU kernels for weight-only int8/int4 matrix-vector products (few rows: decode).

PyTorch 2.13 ships `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`, but on this AVX2 CPU they
stream only ~1.7 GB/s (int8) and ~0.5 GB/s (int4) of weights for a single row, slower than fp32; so
these kernels (plain loops, vectorised by the compiler with -O3 -mavx2 -mfma) are compiled once with
`torch.utils.cpp_extension.load_inline` (cached under ~/.cache/torch_extensions). Each output row's
weights are decoded once into an fp32 buffer in L1 and dotted with every input row; output rows are
split across threads with at::parallel_for. If no compiler is available, `get()` returns None and
the layers fall back to dequantize + `torch.mm` (same results up to summation order).
"""

from __future__ import annotations

import os
import warnings

import torch

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

// y[M, N] = x[M, K] . (q[N, K] * s[N])^T : int8 weights, fp32 activations and accumulation
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(K);
    float* wf = buf.data();
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = qp + n * K;
      for (int64_t k = 0; k < K; ++k) wf[k] = (float)w[k];
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += xr[k] * wf[k];
        yp[m * N + n] = acc * sp[n];
      }
    }
  });
  return y;
}

// y[M, N] = x[M, K] . W^T, W[n, k] = (code - 8) * scale[n, g] + zero[n, g], g = k / group;
// codes packed two per byte: p[n, j] = code[n, 2j] | code[n, 2j+1] << 4
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor p, torch::Tensor scale, torch::Tensor zero, int64_t group) {
  const int64_t M = x.size(0), K = x.size(1), N = p.size(0), G = K / group;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(K);
    float* wf = buf.data();
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = pp + n * (K / 2);
      for (int64_t g = 0; g < G; ++g) {
        const float sc = sp[n * G + g], ze = zp[n * G + g] - 8.f * sp[n * G + g];
        const uint8_t* wg = w + g * group / 2;
        float* fg = wf + g * group;
        for (int64_t j = 0; j < group / 2; ++j) {
          fg[2 * j] = (float)(wg[j] & 15) * sc + ze;
          fg[2 * j + 1] = (float)(wg[j] >> 4) * sc + ze;
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += xr[k] * wf[k];
        yp[m * N + n] = acc;
      }
    }
  });
  return y;
}
"""

_module = None
_tried = False


def get():
    """The compiled extension (int8_mm, int4_mm), or None where it cannot be built.
    SEEKWEN_NO_KERNELS=1 disables it (then the dequantize + torch.mm fallback runs)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("SEEKWEN_NO_KERNELS") or not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline(
            "seekwen_qkernels",
            cpp_sources=_SRC,
            functions=["int8_mm", "int4_mm"],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-ffast-math"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no headers: fall back
        warnings.warn(f"seekwen: int8/int4 CPU kernels unavailable, using dequantize + mm ({e})", stacklevel=2)
        _module = None
    return _module
