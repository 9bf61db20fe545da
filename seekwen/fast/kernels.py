"""Small C++ CPU kernels for few-row products y[M, N] = x[M, K] . W[N, K]^T (M <= 8: decode).

Batch-1/batch-8 decode on this CPU is bound by streaming weights. The BLAS in torch 2.13 reaches only
~60% of the read bandwidth for one row and serves 8-row products poorly (~35 GFLOP/s), and PyTorch's
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` stream only ~1.7 / ~0.5 GB/s of weights for a
single row here. So these kernels are written with explicit SIMD intrinsics and compiled once with
`torch.utils.cpp_extension.load_inline` (`-O3 -mavx2 -mfma -fopenmp`, cached under ~/.cache/torch_extensions):

- `f32_mm(x, w, bias)`: fp32 weights [N, K] (the usual nn.Linear layout);
- `f32_bmm(x, w)`: per-head products x [H, M, K] . w[H, N, K]^T (MLA's absorbed decode);
- `moe_experts(xs, w13s, w2s, rows)`: the routed SwiGLU experts of one MoE layer (fp32), all experts'
  gate/up products in one threaded pass, SiLU * up, all down products in a second pass;
- `mla_decode(q_lat, q_pe, kv, pe, n, scale)`: absorbed-MLA attention of one new token per sequence
  against the cached latents (scores as f32_mm tiles, softmax, values as `f32_mm_kn`: y = x . w for w
  stored [K, N], the probabilities broadcast against the latents' rows);
- `int8_mm(x, q, scale, bias)`: int8 weights [N, K], one fp32 scale per output row;
- `int4_mm(x, packed, scales, zeros, group, bias)`: two 4-bit codes per byte, scale/zero per group of
  `group` input channels (group a multiple of 8), as `linear.Int4Linear` defines them.

Two instruction sets, one build. The loop code (`_ISA_BODY`) is compiled twice from the same text, in
namespace `avx2` (__m256, 8 lanes) and in namespace `avx512` (__m512, 16 lanes) under
`#pragma GCC target("avx512f,...")`, so the module builds and loads on any AVX2 CPU; which one runs
is chosen at run time (`__builtin_cpu_supports`), or forced with SEEKWEN_KERNELS=avx2 (`set_isa`).
AVX-512 pays at 5-8 activation rows: with 32 vector registers all 8 rows x 3 weight rows (24
accumulators) fit in one pass, and each FMA does 16 lanes, so batch-8 decode stops being FMA-bound.
int4 stays AVX2 (its per-group decode is not what limits it). Clang has no `#pragma GCC target`, so
there only the AVX2 code is built.

Loop structure: output rows are split across threads (at::parallel_for) in tiles of 12 rows; a tile is
walked in blocks of R = 3-4 weight rows, each streamed once, sequentially, one vector at a time, FMA'd
against up to MBMAX activation rows (4 for AVX2, 8 for AVX-512; L1/L2-resident), with one independent
accumulator per (activation row, weight row) pair (they stay in registers, and enough FMA chains are in
flight to hide the FMA latency). The next tile's weights are prefetched while a tile streams. More than
MBMAX activation rows: the tile is run again for the next ones; its weights then come from L1/L2.
K tails use masked loads. If no compiler is available (or the CPU lacks AVX2), `get()` returns None
and the layers fall back to `F.linear` / dequantize + `torch.mm` (same results up to summation order).
"""

from __future__ import annotations

import os
import warnings

import torch

# Shared by both instruction sets: the weight decoders, the register-blocked dot products, tiles and
# threading. `V` (the namespace's vector traits) supplies the vector type and its operations.
_ISA_BODY = r"""
// Weight decoders: V::L consecutive weights of one row -> fp32 lanes; `tail` reads only r < V::L of them.
struct F32W {
  using T = float;
  static inline V::vec load(const float* p) { return V::load(p); }
  static inline V::vec tail(const float* p, int64_t r) { return V::tail(p, r); }
};
struct I8W {
  using T = int8_t;
  static inline V::vec load(const int8_t* p) { return V::load_i8(p); }
  static inline V::vec tail(const int8_t* p, int64_t r) { return V::tail_i8(p, r); }
};

constexpr int64_t TILE = 12;  // output rows per tile: blocks of 3 or 4 rows (V::rows)

// out[m * ldo + r] = sum_k x[m, k] * w[r, k] for m < MB, r < R: MB x R accumulators in registers.
// While streaming, the same positions `dist` weights further on (the next tile's rows) are prefetched,
// once per 64-byte line.
template <class W, int MB, int R>
static inline void dots(const float* x, const typename W::T* w, int64_t K, int64_t dist, float* out, int64_t ldo) {
  constexpr int64_t line = 64 / sizeof(typename W::T);  // weights per cache line
  V::vec acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = V::zero();
  int64_t k = 0;
  for (; k + V::L <= K; k += V::L) {
    if (k % line == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + r * K + k + dist), _MM_HINT_T0);
    V::vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = W::load(w + r * K + k);  // R sequential weight streams
    for (int m = 0; m < MB; ++m) {
      const V::vec xv = V::load(x + m * K + k);  // activations: L1/L2-resident
      for (int r = 0; r < R; ++r) acc[m][r] = V::fma(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {  // K % V::L tail
    const int64_t rem = K - k;
    for (int m = 0; m < MB; ++m) {
      const V::vec xv = V::tail(x + m * K + k, rem);
      for (int r = 0; r < R; ++r) acc[m][r] = V::fma(xv, W::tail(w + r * K + k, rem), acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = V::sum(acc[m][r]);
}

// mb (runtime, 1..V::MBMAX) activation rows against one tile (TILE rows, in blocks of V::rows(MB)),
// or against one weight row (the N % TILE tail); out[m * TILE + r].
template <class W, int MB = 1>
static inline void tile_rows(int64_t mb, const float* x, const typename W::T* w, int64_t K, float* out) {
  if (mb == MB) {
    constexpr int R = V::rows(MB);
    static_assert(TILE % R == 0, "R divides TILE");
    for (int64_t r = 0; r < TILE; r += R) dots<W, MB, R>(x, w + r * K, K, TILE * K, out + r, TILE);
  } else if constexpr (MB < V::MBMAX) {
    tile_rows<W, MB + 1>(mb, x, w, K, out);
  }
}
template <class W, int MB = 1>
static inline void one_row(int64_t mb, const float* x, const typename W::T* w, int64_t K, float* out) {
  if (mb == MB) dots<W, MB, 1>(x, w, K, K, out, TILE);
  else if constexpr (MB < V::MBMAX) one_row<W, MB + 1>(mb, x, w, K, out);
}

// One kernel over [N, K] weights of decoder W.
template <class W>
struct DenseTiles {
  const typename W::T* w;
  int64_t K;
  void tile(int64_t mb, const float* x, int64_t n, float* out) const { tile_rows<W>(mb, x, w + n * K, K, out); }
  void row(int64_t mb, const float* x, int64_t n, float* out) const { one_row<W>(mb, x, w + n * K, K, out); }
};

// y[m, n] = dot * scale[n] + bias[n] (scale, bias optional) for the output tiles [t0, t1) of TILE rows.
template <class Tiles>
static void run_tiles(const Tiles& t, const float* x, int64_t M, int64_t K, int64_t N, const float* scale,
                      const float* bias, float* y, int64_t t0, int64_t t1) {
  float out[V::MBMAX * TILE];
  for (int64_t n = t0 * TILE; n < std::min(t1 * TILE, N); n += TILE) {
    const int64_t nr = std::min(TILE, N - n);
    for (int64_t m0 = 0; m0 < M; m0 += V::MBMAX) {  // M > MBMAX: the tile's weights are re-read from L1/L2
      const int64_t mb = std::min<int64_t>(V::MBMAX, M - m0);
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

// Entry points on raw pointers (shapes checked by the callers outside the namespace).
static void f32_mm(const float* x, const float* w, int64_t M, int64_t K, int64_t N, const float* bias, float* y) {
  run(DenseTiles<F32W>{w, K}, x, M, K, N, nullptr, bias, y);
}

static void int8_mm(const float* x, const int8_t* q, const float* s, int64_t M, int64_t K, int64_t N,
                    const float* bias, float* y) {
  run(DenseTiles<I8W>{q, K}, x, M, K, N, s, bias, y);
}

// Grouped products (MoE experts): for each group g, y[g's rows] = x[g's rows] . w[g]^T, rows[g] rows each
// (consecutive), every w[g] [N, K]. One thread team over all (group, output tile) pairs, each thread a
// contiguous range of them: the experts' weights stream back to back with no fork/join per expert.
static void grouped_mm(const float* x, const float* const* w, const int64_t* rows, int64_t G, int64_t K, int64_t N,
                       float* y) {
  std::vector<int64_t> r0(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) r0[g + 1] = r0[g] + rows[g];
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, G * tiles, 1, [&](int64_t a, int64_t b) {
    while (a < b) {  // [a, b) may start and end inside a group
      const int64_t g = a / tiles, t0 = a % tiles, t1 = std::min(tiles, t0 + (b - a));
      run_tiles(DenseTiles<F32W>{w[g], K}, x + r0[g] * K, rows[g], K, N, nullptr, nullptr, y + r0[g] * N, t0, t1);
      a += t1 - t0;
    }
  });
}

// y[h] = x[h] . w[h]^T for x [H, M, K], w [H, N, K]; heads split across threads
static void f32_bmm(const float* x, const float* w, int64_t H, int64_t M, int64_t K, int64_t N, float* y) {
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      run_tiles(DenseTiles<F32W>{w + h * N * K, K}, x + h * M * K, M, K, N, nullptr, nullptr, y + h * M * N, 0, tiles);
  });
}

// y[m, n0 + j] = sum_k x[m, k] w[k, n0 + j] for a block of C vectors of columns, w stored [K, N] (rows
// contiguous, stride ldw): MB x C accumulators, w's rows streamed in order, x[m, k] broadcast.
template <int MB, int C>
static inline void kn_block(const float* x, int64_t K, const float* w, int64_t ldw, float* y, int64_t ldy) {
  V::vec acc[MB][C];
  for (int m = 0; m < MB; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    V::vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = V::load(w + k * ldw + c * V::L);
    for (int m = 0; m < MB; ++m) {
      const V::vec xb = V::set1(x[m * K + k]);
      for (int c = 0; c < C; ++c) acc[m][c] = V::fma(xb, wv[c], acc[m][c]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int c = 0; c < C; ++c) V::store(y + m * ldy + c * V::L, acc[m][c]);
}
template <int MB = 1>
static inline void kn_rows(int64_t mb, const float* x, int64_t K, const float* w, int64_t ldw, float* y, int64_t ldy,
                           int64_t cols) {
  if (mb == MB) {
    if (cols == V::KN_COLS) kn_block<MB, V::KN_COLS>(x, K, w, ldw, y, ldy);
    else for (int64_t c = 0; c < cols; ++c) kn_block<MB, 1>(x, K, w + c * V::L, ldw, y + c * V::L, ldy);
  } else if constexpr (MB < V::MBMAX) {
    kn_rows<MB + 1>(mb, x, K, w, ldw, y, ldy, cols);
  }
}

// y[M, N] = x[M, K] . w[K, N] with w stored [K, N] (stride ldw), N % V::L == 0: the "values" product of
// attention (probabilities [M, T] times cached vectors [T, N]). Column blocks split across threads, so
// each thread streams its own columns of every row of w.
static void f32_mm_kn(const float* x, const float* w, int64_t M, int64_t K, int64_t N, int64_t ldw, float* y) {
  const int64_t vecs = N / V::L, blocks = (vecs + V::KN_COLS - 1) / V::KN_COLS;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * V::KN_COLS, cols = std::min<int64_t>(V::KN_COLS, vecs - c0);
      for (int64_t m0 = 0; m0 < M; m0 += V::MBMAX)
        kn_rows(std::min<int64_t>(V::MBMAX, M - m0), x + m0 * K, K, w + c0 * V::L, ldw, y + m0 * N + c0 * V::L, N,
                cols);
    }
  });
}
"""

_AVX2_TRAITS = r"""
static inline __m256i tail_mask(int64_t r) {  // lanes < r set
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct V {
  using vec = __m256;
  static constexpr int64_t L = 8;
  static constexpr int MBMAX = 4;  // activation rows per pass: MB x R <= 12 accumulators of 16 registers
  static constexpr int KN_COLS = 2;  // f32_mm_kn: MBMAX x 2 accumulators + 2 loads + 1 broadcast
  static constexpr int rows(int mb) { return mb <= 2 ? 4 : 3; }
  static inline vec zero() { return _mm256_setzero_ps(); }
  static inline vec set1(float a) { return _mm256_set1_ps(a); }
  static inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float sum(vec v) { return hsum(v); }
  static inline vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline vec tail(const float* p, int64_t r) { return _mm256_maskload_ps(p, tail_mask(r)); }
  static inline vec load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }
  static inline vec tail_i8(const int8_t* p, int64_t r) {
    int8_t b[8] = {0};
    std::memcpy(b, p, r);
    return load_i8(b);
  }
};
"""

_AVX512_TRAITS = r"""
struct V {
  using vec = __m512;
  static constexpr int64_t L = 16;
  static constexpr int MBMAX = 8;  // all decode rows in one pass: 8 x 3 accumulators + 3 weights + x of 32
  static constexpr int KN_COLS = 3;  // f32_mm_kn: 8 x 3 accumulators + 3 loads + 1 broadcast
  static constexpr int rows(int mb) { return mb <= 6 ? 4 : 3; }
  static inline __mmask16 mask(int64_t r) { return (__mmask16)((1u << r) - 1); }
  static inline vec zero() { return _mm512_setzero_ps(); }
  static inline vec set1(float a) { return _mm512_set1_ps(a); }
  static inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float sum(vec v) { return _mm512_reduce_add_ps(v); }
  static inline vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline vec tail(const float* p, int64_t r) { return _mm512_maskz_loadu_ps(mask(r), p); }
  static inline vec load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }
  static inline vec tail_i8(const int8_t* p, int64_t r) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask(r), p)));
  }
};
"""

# int4 (AVX2 only, inside namespace avx2: uses its hsum, TILE, run).
_INT4 = r"""
// W[n, k] = (code - 8) * scale[n, g] + zero[n, g], g = k / group; codes two per byte,
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

static void int4_mm(const float* x, const uint8_t* p, const float* sc, const float* ze, int64_t group, int64_t M,
                    int64_t K, int64_t N, const float* bias, float* y) {
  run(Int4Tiles{p, sc, ze, K, group}, x, M, K, N, nullptr, bias, y);
}
"""

# Torch-facing functions: checks, output allocation, and the choice of instruction set.
_BINDINGS = r"""
#ifdef SEEKWEN_AVX512
static bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
static bool use_avx512 = cpu_has_avx512();
#else
static bool cpu_has_avx512() { return false; }
static bool use_avx512 = false;
#endif

// "avx512" or "avx2": the instruction set the kernels run with now.
std::string isa() { return use_avx512 ? "avx512" : "avx2"; }

// Force an instruction set ("avx2", or "avx512" where the CPU and compiler have it); returns isa().
std::string set_isa(std::string name) {
  TORCH_CHECK(name == "avx2" || name == "avx512", "set_isa: avx2 or avx512");
  TORCH_CHECK(name == "avx2" || cpu_has_avx512(), "set_isa: avx512 not available on this CPU / build");
  use_avx512 = name == "avx512";
  return isa();
}

#ifdef SEEKWEN_AVX512
#define SEEKWEN_DISPATCH(fn, ...) (use_avx512 ? avx512::fn(__VA_ARGS__) : avx2::fn(__VA_ARGS__))
#else
#define SEEKWEN_DISPATCH(fn, ...) avx2::fn(__VA_ARGS__)
#endif

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
  TORCH_CHECK(w.scalar_type() == torch::kFloat, "f32_mm: fp32 weights");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  SEEKWEN_DISPATCH(f32_mm, x.data_ptr<float>(), w.data_ptr<float>(), M, K, N, opt_ptr(bias), y.data_ptr<float>());
  return y;
}

// y[h] = x[h] . w[h]^T for x [H, M, K], w [H, N, K] (per-head products, e.g. MLA's absorbed decode)
torch::Tensor f32_bmm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && x.is_contiguous() && w.is_contiguous(), "f32_bmm: 3-d contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "f32_bmm: fp32");
  TORCH_CHECK(x.size(0) == w.size(0) && x.size(2) == w.size(2), "f32_bmm: x [H, M, K], w [H, N, K]");
  const int64_t H = x.size(0), M = x.size(1), K = x.size(2), N = w.size(1);
  auto y = torch::empty({H, M, N}, x.options());
  SEEKWEN_DISPATCH(f32_bmm, x.data_ptr<float>(), w.data_ptr<float>(), H, M, K, N, y.data_ptr<float>());
  return y;
}

// y[M, N] = x[M, K] . (q[N, K] * s[N])^T (+ bias): int8 weights, fp32 activations and accumulation
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s, c10::optional<torch::Tensor> bias) {
  check(x, q, 1);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  SEEKWEN_DISPATCH(int8_mm, x.data_ptr<float>(), q.data_ptr<int8_t>(), s.data_ptr<float>(), M, K, N, opt_ptr(bias),
                   y.data_ptr<float>());
  return y;
}

// Routed SwiGLU experts of one MoE layer, fp32: xs [R, D] holds the rows routed to each expert, grouped
// (rows[g] rows for expert g, in order); w13[g] [2I, D] = gate and up stacked, w2[g] [D, I]. Returns
// ys [R, D], ys = w2 . (silu(gate) * up) per row, unweighted. Two grouped products (all experts at once)
// instead of two kernel calls and three small torch ops per expert.
torch::Tensor moe_experts(torch::Tensor xs, std::vector<torch::Tensor> w13, std::vector<torch::Tensor> w2,
                          std::vector<int64_t> rows) {
  const int64_t G = rows.size();
  TORCH_CHECK(G > 0 && (int64_t)w13.size() == G && (int64_t)w2.size() == G, "moe_experts: one w13, w2 per group");
  TORCH_CHECK(xs.dim() == 2 && xs.is_contiguous() && xs.scalar_type() == torch::kFloat, "moe_experts: fp32 xs");
  const int64_t D = xs.size(1), I = w13[0].size(0) / 2;
  std::vector<const float*> p13(G), p2(G);
  int64_t R = 0;
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(w13[g].sizes() == w13[0].sizes() && w13[g].size(1) == D && w2[g].size(0) == D && w2[g].size(1) == I,
                "moe_experts: w13 [2I, D], w2 [D, I]");
    TORCH_CHECK(w13[g].is_contiguous() && w2[g].is_contiguous() && w13[g].scalar_type() == torch::kFloat &&
                w2[g].scalar_type() == torch::kFloat, "moe_experts: contiguous fp32 weights");
    TORCH_CHECK(rows[g] > 0, "moe_experts: empty group");
    p13[g] = w13[g].data_ptr<float>();
    p2[g] = w2[g].data_ptr<float>();
    R += rows[g];
  }
  TORCH_CHECK(R == xs.size(0), "moe_experts: rows must add up to xs's rows");
  auto h = torch::empty({R, 2 * I}, xs.options());
  SEEKWEN_DISPATCH(grouped_mm, xs.data_ptr<float>(), p13.data(), rows.data(), G, D, 2 * I, h.data_ptr<float>());
  auto act = torch::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I);  // [R, I], contiguous
  auto ys = torch::empty({R, D}, xs.options());
  SEEKWEN_DISPATCH(grouped_mm, act.data_ptr<float>(), p2.data(), rows.data(), G, I, D, ys.data_ptr<float>());
  return ys;
}

// Absorbed-MLA decode, one query position per sequence: q_lat [B, Q, r] (the queries moved into latent
// space, Q = heads), q_pe [B, Q, dr], the cached latents kv [B, T, r] and rotated keys pe [B, T, dr] (views
// of the cache: rows contiguous, sequences strided), n[b] keys visible to sequence b (slots 0..n-1).
// Returns the latent outputs [B, Q, r] = softmax(scale * (q_lat . kv^T + q_pe . pe^T)) . kv. The scores
// are f32_mm tiles with the cached tokens as the "weight rows"; the values product streams the latents
// again with the probabilities broadcast (f32_mm_kn). Nothing is expanded per head, and no [B, Q, T]
// intermediate is materialised beyond one sequence's scores.
torch::Tensor mla_decode(torch::Tensor q_lat, torch::Tensor q_pe, torch::Tensor kv, torch::Tensor pe,
                         std::vector<int64_t> n, double scale) {
  TORCH_CHECK(q_lat.dim() == 3 && q_pe.dim() == 3 && kv.dim() == 3 && pe.dim() == 3, "mla_decode: 3-d tensors");
  TORCH_CHECK(q_lat.is_contiguous() && q_pe.is_contiguous(), "mla_decode: contiguous queries");
  for (const auto* t : {&q_lat, &q_pe, &kv, &pe})
    TORCH_CHECK(t->scalar_type() == torch::kFloat, "mla_decode: fp32");
  const int64_t B = q_lat.size(0), Q = q_lat.size(1), r = q_lat.size(2), dr = q_pe.size(2);
  TORCH_CHECK(kv.size(0) == B && pe.size(0) == B && kv.size(2) == r && pe.size(2) == dr && q_pe.size(1) == Q,
              "mla_decode: shapes");
  TORCH_CHECK(kv.stride(2) == 1 && kv.stride(1) == r && pe.stride(2) == 1 && pe.stride(1) == dr,
              "mla_decode: cache rows must be contiguous");
  TORCH_CHECK(r % 16 == 0 && (int64_t)n.size() == B, "mla_decode: r % 16 == 0, one key count per sequence");
  auto out = torch::empty({B, Q, r}, q_lat.options());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = n[b];
    TORCH_CHECK(T >= 1 && T <= kv.size(1), "mla_decode: key count out of range");
    const float* kvb = kv.data_ptr<float>() + b * kv.stride(0);
    const float* peb = pe.data_ptr<float>() + b * pe.stride(0);
    auto s = torch::empty({Q, T}, q_lat.options()), s_pe = torch::empty({Q, T}, q_lat.options());
    SEEKWEN_DISPATCH(f32_mm, q_lat.data_ptr<float>() + b * Q * r, kvb, Q, r, T, nullptr, s.data_ptr<float>());
    SEEKWEN_DISPATCH(f32_mm, q_pe.data_ptr<float>() + b * Q * dr, peb, Q, dr, T, nullptr, s_pe.data_ptr<float>());
    auto p = torch::softmax(s.add_(s_pe).mul_(scale), 1);  // [Q, T], contiguous
    SEEKWEN_DISPATCH(f32_mm_kn, p.data_ptr<float>(), kvb, Q, T, r, r, out.data_ptr<float>() + b * Q * r);
  }
  return out;
}

torch::Tensor int4_mm(torch::Tensor x, torch::Tensor p, torch::Tensor scale, torch::Tensor zero, int64_t group,
                      c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(group % 8 == 0, "int4_mm: group must be a multiple of 8");
  check(x, p, 2);
  const int64_t M = x.size(0), K = x.size(1), N = p.size(0);
  auto y = torch::empty({M, N}, x.options());
  avx2::int4_mm(x.data_ptr<float>(), p.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(), group,
                M, K, N, opt_ptr(bias), y.data_ptr<float>());
  return y;
}
"""


def _source() -> str:
    """The extension's C++: common headers, the loop body once per instruction set, the bindings."""
    avx512 = (
        "#if defined(__GNUC__) && !defined(__clang__)\n#define SEEKWEN_AVX512 1\n"
        '#pragma GCC push_options\n#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")\n'
        f"namespace avx512 {{\n{_AVX512_TRAITS}{_ISA_BODY}}}  // namespace avx512\n"
        "#pragma GCC pop_options\n#endif\n"
    )
    return (
        "#include <torch/extension.h>\n#include <ATen/Parallel.h>\n#include <immintrin.h>\n"
        "#include <algorithm>\n#include <cstring>\n#include <string>\n#include <vector>\n"
        f"namespace avx2 {{\n{_AVX2_TRAITS}{_ISA_BODY}{_INT4}}}  // namespace avx2\n{avx512}{_BINDINGS}"
    )


MAX_ROWS = 8  # the kernels serve up to this many activation rows (decode); more: BLAS

_module = None
_tried = False


def get():
    """The compiled extension (f32_mm, f32_bmm, int8_mm, int4_mm, moe_experts, isa, set_isa), or None where it cannot be
    built. SEEKWEN_NO_KERNELS=1 disables it (then F.linear / dequantize + torch.mm run); SEEKWEN_KERNELS=avx2
    keeps the AVX2 code on an AVX-512 CPU (default: AVX-512 where the CPU has it)."""
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
            "seekwen_kernels_x86",
            cpp_sources=_source(),
            functions=["f32_mm", "f32_bmm", "int8_mm", "int4_mm", "moe_experts", "mla_decode", "isa", "set_isa"],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],  # OpenMP: else at::parallel_for runs serially
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no headers: fall back
        warnings.warn(f"seekwen: CPU kernels unavailable, using F.linear / dequantize + mm ({e})", stacklevel=2)
        _module = None
        return None
    want = os.environ.get("SEEKWEN_KERNELS", "").lower()
    if want not in ("", "auto"):
        try:
            _module.set_isa(want)
        except RuntimeError:
            warnings.warn(f"seekwen: SEEKWEN_KERNELS={want} unknown or not here, using {_module.isa()}", stacklevel=2)
    return _module


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
