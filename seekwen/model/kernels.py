"""Small C++ CPU kernels for few-row products y[M, N] = x[M, K] . W[N, K]^T (M <= 8: decode).

Batch-1/batch-8 decode on this CPU is bound by streaming weights. The BLAS in torch 2.13 reaches only
~60% of the read bandwidth for one row and serves 8-row products poorly (~35 GFLOP/s), and PyTorch's
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` stream only ~1.7 / ~0.5 GB/s of weights for a
single row here. So these kernels are written with explicit AVX2/FMA intrinsics and compiled once with
`torch.utils.cpp_extension.load_inline` (`-O3 -mavx2 -mfma -fopenmp`, cached under ~/.cache/torch_extensions):

- `f32_mm(x, w, bias)`: fp32 weights [N, K] (the usual nn.Linear layout);
- `int8_mm(x, q, scale, bias)`: int8 weights [N, K], one fp32 scale per output row;
- `int4_mm(x, packed, scales, zeros, group, bias)`: two 4-bit codes per byte, scale/zero per group of
  `group` input channels (group a multiple of 8), as `linear.Int4Linear` defines them.

Loop structure (the same for all three): output rows are split across threads (at::parallel_for) in
tiles of 12 rows; a tile is walked in blocks of R = 2-4 weight rows, each streamed once, sequentially,
8 weights (one __m256) at a time, FMA'd against up to 4 activation rows (L1/L2-resident), with one
independent accumulator per (activation row, weight row) pair (at most 12: they stay in registers,
and enough FMA chains are in flight to hide the FMA latency). The next tile's weights are prefetched
while a tile streams. More than 4 activation rows (M = 5..8): the tile is run again for the next 4;
its weights (12 rows) then come from L1/L2, not RAM.
K % 8 tails use masked loads. If no compiler is available (or the CPU lacks AVX2), `get()` returns None
and the layers fall back to `F.linear` / dequantize + `torch.mm` (same results up to summation order).
"""

from __future__ import annotations

import os
import warnings

import torch

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline __m256i tail_mask(int64_t r) {  // lanes < r set
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Weight decoders: 8 consecutive weights of one row -> fp32 lanes; `tail` reads only r < 8 of them.
struct F32W {
  using T = float;
  static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __m256 tail(const float* p, int64_t r) { return _mm256_maskload_ps(p, tail_mask(r)); }
};
struct I8W {
  using T = int8_t;
  static inline __m256 load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }
  static inline __m256 tail(const int8_t* p, int64_t r) {
    int8_t b[8] = {0};
    std::memcpy(b, p, r);
    return load(b);
  }
};

constexpr int64_t TILE = 12;  // output rows per tile: 3 x 4 or 4 x 3 register blocks

// out[m * ldo + r] = sum_k x[m, k] * w[r, k] for m < MB, r < R: MB x R accumulators in registers.
// While streaming, the same positions `dist` weights further on (the next tile's rows) are prefetched,
// once per 64-byte line.
template <class W, int MB, int R>
static inline void dots(const float* x, const typename W::T* w, int64_t K, int64_t dist, float* out, int64_t ldo) {
  constexpr int64_t line = 64 / sizeof(typename W::T);  // weights per cache line
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (k % line == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + r * K + k + dist), _MM_HINT_T0);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = W::load(w + r * K + k);  // R sequential weight streams
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);  // activations: L1/L2-resident
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {  // K % 8 tail
    const int64_t rem = K - k;
    const __m256i mask = tail_mask(rem);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_maskload_ps(x + m * K + k, mask);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, W::tail(w + r * K + k, rem), acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = hsum(acc[m][r]);
}

// Blocks of R rows covering one tile: out[m * TILE + r], r < TILE.
template <class W, int MB, int R>
static inline void tile_blocks(const float* x, const typename W::T* w, int64_t K, float* out) {
  static_assert(TILE % R == 0, "R divides TILE");
  for (int64_t r = 0; r < TILE; r += R) dots<W, MB, R>(x, w + r * K, K, TILE * K, out + r, TILE);
}

// One kernel over [N, K] weights of decoder W: `tile` computes mb (<= 4) activation rows against
// TILE weight rows, `row` against one (the N % TILE tail), into out[m * TILE + r].
template <class W>
struct DenseTiles {
  const typename W::T* w;
  int64_t K;
  void tile(int64_t mb, const float* x, int64_t n, float* out) const {
    const typename W::T* wn = w + n * K;
    switch (mb) {  // MB x R <= 12 accumulators: enough independent FMA chains, no spills
      case 1: tile_blocks<W, 1, 4>(x, wn, K, out); break;
      case 2: tile_blocks<W, 2, 4>(x, wn, K, out); break;
      case 3: tile_blocks<W, 3, 3>(x, wn, K, out); break;
      default: tile_blocks<W, 4, 3>(x, wn, K, out); break;
    }
  }
  void row(int64_t mb, const float* x, int64_t n, float* out) const {
    const typename W::T* wn = w + n * K;
    switch (mb) {
      case 1: dots<W, 1, 1>(x, wn, K, K, out, TILE); break;
      case 2: dots<W, 2, 1>(x, wn, K, K, out, TILE); break;
      case 3: dots<W, 3, 1>(x, wn, K, K, out, TILE); break;
      default: dots<W, 4, 1>(x, wn, K, K, out, TILE); break;
    }
  }
};

// y[m, n] = dot * scale[n] + bias[n] (scale, bias optional) for the output tiles [t0, t1) of TILE rows.
template <class Tiles>
static void run_tiles(const Tiles& t, const float* x, int64_t M, int64_t K, int64_t N, const float* scale,
                      const float* bias, float* y, int64_t t0, int64_t t1) {
  float out[4 * TILE];
  for (int64_t n = t0 * TILE; n < std::min(t1 * TILE, N); n += TILE) {
    const int64_t nr = std::min(TILE, N - n);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {  // M > 4: the tile's weights are re-read from L1/L2
      const int64_t mb = std::min<int64_t>(4, M - m0);
      const float* xm = x + m0 * K;
      if (nr == TILE) t.tile(mb, xm, n, out);
      else for (int64_t r = 0; r < nr; ++r) t.row(mb, xm, n + r, out + r);
      for (int64_t m = 0; m < mb; ++m)
        for (int64_t r = 0; r < nr; ++r) {
          float v = out[m * TILE + r];
          if (scale) v *= scale[n + r];
          if (bias) v += bias[n + r];
          y[(m0 + m) * N + n + r] = v;
        }
    }
  }
}

// All output tiles, split across threads.
template <class Tiles>
static void run(const Tiles& t, const float* x, int64_t M, int64_t K, int64_t N, const float* scale,
                const float* bias, float* y) {
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) { run_tiles(t, x, M, K, N, scale, bias, y, t0, t1); });
}

static void check(const torch::Tensor& x, const torch::Tensor& w, int64_t k_per_row) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "kernels: 2-d contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.size(1) == w.size(1) * k_per_row, "kernels: fp32 x [M, K]");
}

static const float* opt_ptr(const c10::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// y[M, N] = x[M, K] . w[N, K]^T (+ bias): fp32 weights
torch::Tensor f32_mm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check(x, w, 1);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  DenseTiles<F32W> t{w.data_ptr<float>(), K};
  run(t, x.data_ptr<float>(), M, K, N, nullptr, opt_ptr(bias), y.data_ptr<float>());
  return y;
}

// y[h] = x[h] . w[h]^T for x [H, M, K], w [H, N, K] (per-head products, e.g. MLA's absorbed decode);
// heads split across threads
torch::Tensor f32_bmm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && x.is_contiguous() && w.is_contiguous(), "f32_bmm: 3-d contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "f32_bmm: fp32");
  TORCH_CHECK(x.size(0) == w.size(0) && x.size(2) == w.size(2), "f32_bmm: x [H, M, K], w [H, N, K]");
  const int64_t H = x.size(0), M = x.size(1), K = x.size(2), N = w.size(1);
  auto y = torch::empty({H, M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      DenseTiles<F32W> t{wp + h * N * K, K};
      run_tiles(t, xp + h * M * K, M, K, N, nullptr, nullptr, yp + h * M * N, 0, tiles);
    }
  });
  return y;
}

// y[M, N] = x[M, K] . (q[N, K] * s[N])^T (+ bias): int8 weights, fp32 activations and accumulation
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s, c10::optional<torch::Tensor> bias) {
  check(x, q, 1);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  DenseTiles<I8W> t{q.data_ptr<int8_t>(), K};
  run(t, x.data_ptr<float>(), M, K, N, s.data_ptr<float>(), opt_ptr(bias), y.data_ptr<float>());
  return y;
}

// int4: W[n, k] = (code - 8) * scale[n, g] + zero[n, g], g = k / group; codes two per byte,
// p[n, j] = code[n, 2j] | code[n, 2j + 1] << 4. Decoded in registers, 8 codes (4 bytes) at a time.
static inline __m256 int4_codes(const uint8_t* p) {
  int32_t b;
  std::memcpy(&b, p, 4);
  const __m128i v = _mm_cvtsi32_si128(b), lo4 = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(v, lo4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), lo4);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));  // codes k..k+7 in order
}

template <int MB, int R>
static inline void dots4(const float* x, const uint8_t* p, const float* sc, const float* ze, int64_t K,
                         int64_t group, float* out, int64_t ldo) {
  const int64_t G = K / group;
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 s[R], z[R];  // w = code * s + z, z = zero - 8 * scale
    for (int r = 0; r < R; ++r) {
      s[r] = _mm256_set1_ps(sc[r * G + g]);
      z[r] = _mm256_set1_ps(ze[r * G + g] - 8.f * sc[r * G + g]);
    }
    for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm256_fmadd_ps(int4_codes(p + r * (K / 2) + k / 2), s[r], z[r]);
      for (int m = 0; m < MB; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = hsum(acc[m][r]);
}

struct Int4Tiles {
  const uint8_t* p;
  const float *sc, *ze;
  int64_t K, group;
  template <int MB, int R>
  void at(const float* x, int64_t n, float* out) const {
    const int64_t G = K / group;
    dots4<MB, R>(x, p + n * (K / 2), sc + n * G, ze + n * G, K, group, out, TILE);
  }
  template <int MB>
  void blocks(const float* x, int64_t n, float* out) const {
    for (int64_t r = 0; r < TILE; r += 2) at<MB, 2>(x, n + r, out + r);
  }
  void tile(int64_t mb, const float* x, int64_t n, float* out) const {
    switch (mb) {  // R = 2: the per-group scale/zero broadcasts also need registers
      case 1: blocks<1>(x, n, out); break;
      case 2: blocks<2>(x, n, out); break;
      case 3: blocks<3>(x, n, out); break;
      default: blocks<4>(x, n, out); break;
    }
  }
  void row(int64_t mb, const float* x, int64_t n, float* out) const {
    switch (mb) {
      case 1: at<1, 1>(x, n, out); break;
      case 2: at<2, 1>(x, n, out); break;
      case 3: at<3, 1>(x, n, out); break;
      default: at<4, 1>(x, n, out); break;
    }
  }
};

torch::Tensor int4_mm(torch::Tensor x, torch::Tensor p, torch::Tensor scale, torch::Tensor zero, int64_t group,
                      c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(group % 8 == 0, "int4_mm: group must be a multiple of 8");
  check(x, p, 2);
  const int64_t M = x.size(0), K = x.size(1), N = p.size(0);
  auto y = torch::empty({M, N}, x.options());
  Int4Tiles t{p.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(), K, group};
  run(t, x.data_ptr<float>(), M, K, N, nullptr, opt_ptr(bias), y.data_ptr<float>());
  return y;
}
"""

MAX_ROWS = 8  # the kernels serve up to this many activation rows (decode); more: BLAS

_module = None
_tried = False


def get():
    """The compiled extension (f32_mm, f32_bmm, int8_mm, int4_mm), or None where it cannot be built.
    SEEKWEN_NO_KERNELS=1 disables it (then F.linear / dequantize + torch.mm run)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    cap = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("SEEKWEN_NO_KERNELS") or cap not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline(
            "seekwen_kernels_avx2",
            cpp_sources=_SRC,
            functions=["f32_mm", "f32_bmm", "int8_mm", "int4_mm"],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],  # OpenMP: else at::parallel_for runs serially
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no headers: fall back
        warnings.warn(f"seekwen: AVX2 CPU kernels unavailable, using F.linear / dequantize + mm ({e})", stacklevel=2)
        _module = None
    return _module


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernels serve x [M, K] against weight w: CPU, fp32 activations, M <= MAX_ROWS."""
    return x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32 and 0 < x.shape[0] <= MAX_ROWS
