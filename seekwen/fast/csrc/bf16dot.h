// bf16 weights with bf16 activations (llama.cpp's arithmetic for BF16 files, ggml_vec_dot_bf16):
// y[M, N] = bf16(x)[M, K] . W[N, K]^T (+ bias), W bf16 in its stored [out, in] layout. Each activation row
// is rounded once per call to bf16 (round to nearest even, as torch's x.bfloat16(); NaN -> 0x7FC0), the
// products are AVX512-BF16's vdpbf16ps (32 bf16 x bf16 products a instruction, two per fp32 lane, summed
// in fp32), accumulation and output fp32 (not rounded to bf16).
//
// Textually included by kernels.cpp once, inside namespace b512 under
// `#pragma GCC target("avx512f,...,avx512bf16")`; no include guard, no #includes of its own. Two loops:
// - few rows (M <= FEW_ROWS, decode): loops.h's register blocking (`bdots`: MB activation rows x R weight
//   rows of accumulators, 32 bf16 of a row per vector along K, each weight row streamed once, the next
//   tile prefetched, one horizontal sum per output at the end), tiles of BT rows split across threads;
// - many rows (prefill): the activations are repacked so that one vector holds one input pair (k, k + 1)
//   of 16 activation rows (`pack_lanes`); a weight pair broadcast against it gives 16 outputs' partial
//   sums, one lane each (`lane_block`: R = 8 weight rows x H = 3 groups of 16 rows, 24 accumulators), so
//   each loaded weight pair serves 48 activation rows and no horizontal sums are needed. Tiles of 8
//   weight rows split across threads; a tile's rows (8 x K bf16) stay in L1/L2 while all of x streams by.
// K tails: masked loads (few rows), a zero-padded last pair (many rows).

constexpr int64_t BT = 12;        // few-row path: weight rows per tile (blocks of 3 or 4 rows)
constexpr int64_t FEW_ROWS = 16;  // up to this many activation rows: bdots; more: the lanes kernel
constexpr int MBMAX = 8;          // bdots: activation rows per pass (8 x 3 accumulators + 3 weights + x)
constexpr int LR = 8, LH = 3;     // lane_block: weight rows x groups of 16 activation rows
#ifndef SEEKWEN_BF16_KC
#define SEEKWEN_BF16_KC 256
#endif
constexpr int64_t KC = SEEKWEN_BF16_KC;  // lanes kernel: input pairs per chunk of K
constexpr int64_t NB = 8;                // lanes kernel: tiles of LR weight rows per block

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
static inline __mmask32 mask32(int64_t r) { return (__mmask32)((1ull << r) - 1); }  // r < 32 lanes
static inline __m512i load32(const uint16_t* p) { return _mm512_loadu_si512(p); }
static inline __m512i tail32(const uint16_t* p, int64_t r) { return _mm512_maskz_loadu_epi16(mask32(r), p); }
static inline __m512 dp(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, as_bh(a), as_bh(b)); }

// 16 fp32 -> 16 bf16, round to nearest even on the bits (u + 0x7FFF + lsb) >> 16, as c10::BFloat16 does
// (denormals rounded, not flushed as vcvtneps2bf16 would), NaN -> 0x7FC0 (torch's quiet NaN)
static inline __m256i round16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// x [M, K] fp32 -> xb [M, K] bf16 bits, rows split across threads
static void round_rows(const float* x, int64_t M, int64_t K, uint16_t* xb) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * K;
      uint16_t* o = xb + m * K;
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) _mm256_storeu_si256((__m256i*)(o + k), round16(_mm512_loadu_ps(xr + k)));
      if (k < K) {
        const __mmask16 t = (__mmask16)((1u << (K - k)) - 1);
        _mm256_mask_storeu_epi16(o + k, t, round16(_mm512_maskz_loadu_ps(t, xr + k)));
      }
    }
  });
}

// ---- few rows --------------------------------------------------------------------------------------

// out[m * ldo + r] = sum_k xb[m, k] w[n + r, k] for m < MB, r < R (MB x R accumulators); the same
// positions `ahead` rows on are prefetched (each 32-bf16 vector is one 64-byte line)
template <int MB, int R>
static inline void bdots(const uint16_t* w, const uint16_t* x, int64_t n, int64_t K, int64_t ahead, float* out,
                         int64_t ldo) {
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(w + (n + r + ahead) * K + k), _MM_HINT_T0);
      wv[r] = load32(w + (n + r) * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = load32(x + m * K + k);  // activations: L1/L2-resident
      for (int r = 0; r < R; ++r) acc[m][r] = dp(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {  // K % 32 tail: masked (zero) lanes
    const int64_t rem = K - k;
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = tail32(w + (n + r) * K + k, rem);
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = tail32(x + m * K + k, rem);
      for (int r = 0; r < R; ++r) acc[m][r] = dp(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = _mm512_reduce_add_ps(acc[m][r]);
}

static constexpr int brows(int mb) { return mb <= 6 ? 4 : 3; }

// mb (runtime, 1..MBMAX) activation rows against one tile of BT rows (out[m * BT + r]), or one weight row
template <int MB = 1>
static inline void btile(int64_t mb, const uint16_t* w, const uint16_t* x, int64_t n, int64_t K, float* out) {
  if (mb == MB) {
    constexpr int R = brows(MB);
    static_assert(BT % R == 0, "R divides BT");
    for (int64_t r = 0; r < BT; r += R) bdots<MB, R>(w, x, n + r, K, BT, out + r, BT);
  } else if constexpr (MB < MBMAX) {
    btile<MB + 1>(mb, w, x, n, K, out);
  }
}
template <int MB = 1>
static inline void brow(int64_t mb, const uint16_t* w, const uint16_t* x, int64_t n, int64_t K, float* out) {
  if (mb == MB) bdots<MB, 1>(w, x, n, K, 1, out, BT);
  else if constexpr (MB < MBMAX) brow<MB + 1>(mb, w, x, n, K, out);
}

// y[m, n] = dot (+ bias[n]) for the output tiles [t0, t1) of BT rows
static void run_few(const uint16_t* w, const uint16_t* xb, int64_t M, int64_t K, int64_t N, const float* bias,
                    float* y, int64_t t0, int64_t t1) {
  float out[MBMAX * BT];
  for (int64_t n = t0 * BT; n < std::min(t1 * BT, N); n += BT) {
    const int64_t nr = std::min(BT, N - n);
    for (int64_t m0 = 0; m0 < M; m0 += MBMAX) {
      const int64_t mb = std::min<int64_t>(MBMAX, M - m0);
      const uint16_t* xm = xb + m0 * K;
      if (nr == BT) btile(mb, w, xm, n, K, out);
      else for (int64_t r = 0; r < nr; ++r) brow(mb, w, xm, n + r, K, out + r);
      for (int64_t m = 0; m < mb; ++m)
        for (int64_t r = 0; r < nr; ++r) y[(m0 + m) * N + n + r] = out[m * BT + r] + (bias ? bias[n + r] : 0.f);
    }
  }
}

// ---- many rows -------------------------------------------------------------------------------------

// xb [M, K] -> xp [G = ceil(M / 16), P = ceil(K / 2), 16] uint32: lane l of pair p of group g holds
// (xb[16g + l, 2p], xb[16g + l, 2p + 1]) in its low and high half (zero past M and K)
static void pack_lanes(const uint16_t* xb, int64_t M, int64_t K, uint32_t* xp) {
  const int64_t G = (M + 15) / 16, P = (K + 1) / 2;
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int l = 0; l < 16; ++l) {
        const int64_t m = 16 * g + l;
        uint32_t* o = xp + g * P * 16 + l;
        for (int64_t p = 0; p < P; ++p) {
          const uint32_t lo = m < M ? xb[m * K + 2 * p] : 0, hi = m < M && 2 * p + 1 < K ? xb[m * K + 2 * p + 1] : 0;
          o[p * 16] = lo | hi << 16;
        }
      }
  });
}

static inline uint32_t pair_at(const uint16_t* p) {  // w[k], w[k + 1] as one lane (rows may be 2-byte aligned)
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// y[m0 + 16h + l, n + r] = acc[r][h] lane l (+ bias) if `first`, else += it, rows past M left alone: the
// R x 16 block of each h transposed through L1 (acc[r][h] holds one output column), then written one row
// of R outputs at a time (8 stores of a whole row of 8 per group, not 128 scattered down the columns).
template <int R, int H>
static inline void store_rows(const __m512 (&acc)[R][H], bool first, int64_t m0, int64_t M, int64_t N, int64_t n,
                              const float* bias, float* y) {
  const __mmask8 cols = (__mmask8)((1u << R) - 1);
  const __m256 b = bias && first ? _mm256_maskz_loadu_ps(cols, bias + n) : _mm256_setzero_ps();
  alignas(64) float col[R][16], row[16][8];
  for (int h = 0; h < H; ++h) {
    for (int r = 0; r < R; ++r) _mm512_store_ps(col[r], acc[r][h]);
    for (int l = 0; l < 16; ++l)
      for (int r = 0; r < R; ++r) row[l][r] = col[r][l];
    const int64_t rows = std::min<int64_t>(16, M - m0 - 16 * h);
    for (int64_t l = 0; l < rows; ++l) {
      float* yr = y + (m0 + 16 * h + l) * N + n;
      const __m256 v = _mm256_load_ps(row[l]);
      _mm256_mask_storeu_ps(yr, cols, first ? _mm256_add_ps(v, b) : _mm256_add_ps(_mm256_maskz_loadu_ps(cols, yr), v));
    }
  }
}

// One chunk of K, pairs [p0, p1), of the outputs y[16 (g + h) + l, n + r] for R weight rows n.. and H
// groups g.. of 16 activation rows (xg: group g's packed pairs, P per group): the first chunk writes
// dot (+ bias), the others add theirs; rows past M are not written. The outputs' lines are prefetched
// first (one per row: most are in L3 or RAM, and the loop over K hides that), and while streaming, the
// next tile's weights (LR rows on), once per 64-byte line.
struct Chunk {
  int64_t p0, p1;
};
template <int R, int H>
static inline void lane_block(const uint16_t* w, int64_t K, int64_t n, const uint32_t* xg, int64_t P, Chunk c,
                              int64_t m0, int64_t M, int64_t N, const float* bias, float* y) {
  __m512 acc[R][H];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < H; ++h) acc[r][h] = _mm512_setzero_ps();
  for (int64_t l = 0; l < 16 * H && m0 + l < M; ++l) __builtin_prefetch(y + (m0 + l) * N + n, 1, 3);  // hidden by K
  const int64_t full = std::min(c.p1, K / 2);
  for (int64_t p = c.p0; p < full; ++p) {
    if (p % 16 == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (n + r + LR) * K + 2 * p), _MM_HINT_T0);
    __m512i xv[H];
    for (int h = 0; h < H; ++h) xv[h] = _mm512_loadu_si512(xg + (h * P + p) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i wb = _mm512_set1_epi32((int)pair_at(w + (n + r) * K + 2 * p));
      for (int h = 0; h < H; ++h) acc[r][h] = dp(acc[r][h], wb, xv[h]);
    }
  }
  if (K % 2 && c.p1 == P) {  // the last pair is (w[K - 1], 0) against (x[K - 1], 0): nothing read past the row
    __m512i xv[H];
    for (int h = 0; h < H; ++h) xv[h] = _mm512_loadu_si512(xg + (h * P + P - 1) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i wb = _mm512_set1_epi32((int)w[(n + r) * K + K - 1]);
      for (int h = 0; h < H; ++h) acc[r][h] = dp(acc[r][h], wb, xv[h]);
    }
  }
  store_rows<R, H>(acc, c.p0 == 0, m0, M, N, n, bias, y);
}

// lane_block for runtime rows r (1..LR) and groups h (1..LH)
template <int R, int H = 1>
static inline void lane_h(int64_t h, const uint16_t* w, int64_t K, int64_t n, const uint32_t* xg, int64_t P, Chunk c,
                          int64_t m0, int64_t M, int64_t N, const float* bias, float* y) {
  if (h == H) lane_block<R, H>(w, K, n, xg, P, c, m0, M, N, bias, y);
  else if constexpr (H < LH) lane_h<R, H + 1>(h, w, K, n, xg, P, c, m0, M, N, bias, y);
}
template <int R = 1>
static inline void lane_rh(int64_t r, int64_t h, const uint16_t* w, int64_t K, int64_t n, const uint32_t* xg,
                           int64_t P, Chunk c, int64_t m0, int64_t M, int64_t N, const float* bias, float* y) {
  if (r == R) lane_h<R>(h, w, K, n, xg, P, c, m0, M, N, bias, y);
  else if constexpr (R < LR) lane_rh<R + 1>(r, h, w, K, n, xg, P, c, m0, M, N, bias, y);
}

// the output tiles [t0, t1) of LR weight rows. K in chunks of KC pairs (a chunk of all packed activation
// rows, G x KC x 64 bytes, stays in L2), the tiles in blocks of NB (their chunk of weights, NB x LR x KC x
// 4 bytes, stays in L2 too); a block's tiles run against LH groups of activation rows at a time, so the
// outputs are written (and added to) 48 rows x NB x LR columns at a time, not down whole columns of y.
static void run_lanes(const uint16_t* w, const uint32_t* xp, int64_t M, int64_t K, int64_t N, const float* bias,
                      float* y, int64_t t0, int64_t t1) {
  const int64_t G = (M + 15) / 16, P = (K + 1) / 2;
  for (int64_t p0 = 0; p0 < P; p0 += KC) {
    const Chunk c{p0, std::min(P, p0 + KC)};
    for (int64_t b0 = t0; b0 < t1; b0 += NB)
      for (int64_t g = 0; g < G; g += LH)
        for (int64_t t = b0; t < std::min(t1, b0 + NB); ++t) {
          const int64_t n = t * LR, nr = std::min<int64_t>(LR, N - n);
          lane_rh(nr, std::min<int64_t>(LH, G - g), w, K, n, xp + g * P * 16, P, c, 16 * g, M, N, bias, y);
        }
  }
}

// y[M, N] = bf16(x)[M, K] . w[N, K]^T (+ bias), w bf16 bits
static void bf16_mm(const float* x, const uint16_t* w, int64_t M, int64_t K, int64_t N, const float* bias, float* y) {
  std::vector<uint16_t> xb(M * K);
  round_rows(x, M, K, xb.data());
  if (M <= FEW_ROWS) {
    const int64_t tiles = (N + BT - 1) / BT;
    at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) { run_few(w, xb.data(), M, K, N, bias, y, t0, t1); });
    return;
  }
  std::vector<uint32_t> xp(((M + 15) / 16) * ((K + 1) / 2) * 16);
  pack_lanes(xb.data(), M, K, xp.data());
  const int64_t tiles = (N + LR - 1) / LR;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { run_lanes(w, xp.data(), M, K, N, bias, y, t0, t1); });
}
