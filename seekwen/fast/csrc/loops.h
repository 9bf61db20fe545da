// The loop code shared by both instruction sets: weight decoders, register-blocked dot products, tiles,
// threading, and the raw-pointer entry points (dense_mm over any decoder, grouped_mm, f32_bmm, f32_mm_kn).
//
// Textually included by kernels.cpp once per instruction set, inside namespace avx2 and namespace
// avx512, after that namespace's vector traits `V` (vec_avx2.h / vec_avx512.h): `V` supplies the
// vector type, its width V::L and its operations. Hence no include guard and no #includes here.

// ---- weight decoders -----------------------------------------------------------------------------------
// A decoder reads rows of K weights in some format and hands out V::L consecutive weights of one row as
// fp32 lanes. Its rows are cut into blocks of B weights (B = V::L for the unscaled formats; 32 for the
// block formats, which have one scale per block): `block(n, k)` loads what a block needs (its scale,
// broadcast) once, `load(b, n, k)` decodes lanes k..k+L-1 of row n (k inside that block). Unscaled formats
// also have `tail(n, k, r)` (r < L lanes, TAILS) for K % L != 0; block formats need K % 32 == 0.
// `line(n, k)`: the address of weight k of row n, for prefetching; LINE weights share a 64-byte line.
struct NoScale {};

struct F32W {  // fp32 [N, K]
  const float* w;
  int64_t K;
  static constexpr int64_t B = V::L, LINE = 16;
  static constexpr bool TAILS = true;
  NoScale block(int64_t, int64_t) const { return {}; }
  V::vec load(NoScale, int64_t n, int64_t k) const { return V::load(w + n * K + k); }
  V::vec tail(int64_t n, int64_t k, int64_t r) const { return V::tail(w + n * K + k, r); }
  const void* line(int64_t n, int64_t k) const { return w + n * K + k; }
};

struct BF16W {  // bf16 [N, K]: the upper 16 bits of an fp32, widened by a shift (exact)
  const uint16_t* w;
  int64_t K;
  static constexpr int64_t B = V::L, LINE = 32;
  static constexpr bool TAILS = true;
  NoScale block(int64_t, int64_t) const { return {}; }
  V::vec load(NoScale, int64_t n, int64_t k) const { return V::load_bf16(w + n * K + k); }
  V::vec tail(int64_t n, int64_t k, int64_t r) const { return V::tail_bf16(w + n * K + k, r); }
  const void* line(int64_t n, int64_t k) const { return w + n * K + k; }
};

struct F16W {  // IEEE fp16 [N, K], converted by F16C's vcvtph2ps (exact)
  const uint16_t* w;
  int64_t K;
  static constexpr int64_t B = V::L, LINE = 32;
  static constexpr bool TAILS = true;
  NoScale block(int64_t, int64_t) const { return {}; }
  V::vec load(NoScale, int64_t n, int64_t k) const { return V::load_f16(w + n * K + k); }
  V::vec tail(int64_t n, int64_t k, int64_t r) const { return V::tail_f16(w + n * K + k, r); }
  const void* line(int64_t n, int64_t k) const { return w + n * K + k; }
};

struct I8W {  // int8 [N, K] with one scale per output row (applied after the dot product, by run_tiles)
  const int8_t* w;
  int64_t K;
  static constexpr int64_t B = V::L, LINE = 64;
  static constexpr bool TAILS = true;
  NoScale block(int64_t, int64_t) const { return {}; }
  V::vec load(NoScale, int64_t n, int64_t k) const { return V::load_i8(w + n * K + k); }
  V::vec tail(int64_t n, int64_t k, int64_t r) const { return V::tail_i8(w + n * K + k, r); }
  const void* line(int64_t n, int64_t k) const { return w + n * K + k; }
};

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

struct Scale {
  V::vec d;
};

// Q8_0 (GGUF): w[n, k] = q[n, k] * d[n, k / 32], q int8 [N, K], d fp16 [N, K / 32].
struct Q80W {
  const int8_t* q;
  const uint16_t* d;
  int64_t K;
  static constexpr int64_t B = 32, LINE = 64;
  static constexpr bool TAILS = false;
  Scale block(int64_t n, int64_t k) const { return {V::set1(half_to_float(d[n * (K / 32) + k / 32]))}; }
  V::vec load(const Scale& s, int64_t n, int64_t k) const { return V::mul(V::load_i8(q + n * K + k), s.d); }
  const void* line(int64_t n, int64_t k) const { return q + n * K + k; }
};

// Q4_0 (GGUF): w[n, k] = (code - 8) * d[n, k / 32], 16 bytes per block of 32 codes with GGUF's order:
// byte j of a block holds code j in its low nibble and code j + 16 in its high nibble. p uint8 [N, K / 2],
// d fp16 [N, K / 32]. Lanes k..k+L-1 of a block are the low (k % 32 < 16) or high nibbles of L bytes.
// The per-block state (V::Q4Block: the scale, or with AVX-512 the 16 values d * (code - 8) as a lookup
// table) and the decode of L codes are the instruction set's (vec_*.h).
struct Q40W {
  const uint8_t* p;
  const uint16_t* d;
  int64_t K;
  static constexpr int64_t B = 32, LINE = 128;
  static constexpr bool TAILS = false;
  V::Q4Block block(int64_t n, int64_t k) const { return V::q4_block(half_to_float(d[n * (K / 32) + k / 32])); }
  V::vec load(const V::Q4Block& s, int64_t n, int64_t k) const {
    return V::q4_load(s, p + n * (K / 2) + (k / 32) * 16 + k % 16, k % 32 >= 16);
  }
  const void* line(int64_t n, int64_t k) const { return p + n * (K / 2) + k / 2; }
};

// The older group-asymmetric int4 (linear.Int4Linear): w[n, k] = (code - 8) * sc[n, g] + ze[n, g],
// g = k / group (group % V::L == 0), codes two per byte in order. Block = one vector: its group's scale and
// offset (ze - 8 sc) broadcast, then w = code * s + z.
struct GroupScale {
  V::vec s, z;
};
struct I4GW {
  const uint8_t* p;
  const float *sc, *ze;
  int64_t K, group;
  static constexpr int64_t B = V::L, LINE = 128;
  static constexpr bool TAILS = false;  // K % group == 0
  GroupScale block(int64_t n, int64_t k) const {
    const int64_t i = n * (K / group) + k / group;
    return {V::set1(sc[i]), V::set1(ze[i] - 8.f * sc[i])};
  }
  V::vec load(const GroupScale& s, int64_t n, int64_t k) const {
    return V::fma(V::load_u4seq(p + n * (K / 2) + k / 2), s.s, s.z);
  }
  const void* line(int64_t n, int64_t k) const { return p + n * (K / 2) + k / 2; }
};

// The decoder a WRef (kernels.cpp: format + pointers, instruction-set neutral) describes, handed to f.
template <class F>
static inline void with_decoder(const WRef& r, F&& f) {
  switch (r.fmt) {
    case Fmt::F32: f(F32W{(const float*)r.w, r.K}); break;
    case Fmt::BF16: f(BF16W{(const uint16_t*)r.w, r.K}); break;
    case Fmt::F16: f(F16W{(const uint16_t*)r.w, r.K}); break;
    case Fmt::I8: f(I8W{(const int8_t*)r.w, r.K}); break;
    case Fmt::Q8_0: f(Q80W{(const int8_t*)r.w, r.d, r.K}); break;
    case Fmt::Q4_0: f(Q40W{(const uint8_t*)r.w, r.d, r.K}); break;
    case Fmt::I4G: f(I4GW{(const uint8_t*)r.w, r.sc, r.ze, r.K, r.group}); break;
  }
}

constexpr int64_t TILE = 12;  // output rows per tile: blocks of 3 or 4 rows (V::rows)

// out[m * ldo + r] = sum_k x[m, k] * w[n + r, k] for m < MB, r < R: MB x R accumulators in registers.
// Block by block: each row's block scale once, then its L-lane vectors, R sequential weight streams. While
// streaming, the same positions `ahead` rows further on (the next tile's rows) are prefetched, once per
// 64-byte line.
template <class W, int MB, int R>
static inline void dots(const W& w, const float* x, int64_t n, int64_t K, int64_t ahead, float* out, int64_t ldo) {
  V::vec acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = V::zero();
  int64_t k0 = 0;
  for (; k0 + W::B <= K; k0 += W::B) {
    decltype(w.block(0, 0)) s[R];
    for (int r = 0; r < R; ++r) s[r] = w.block(n + r, k0);
    for (int64_t k = k0; k < k0 + W::B; k += V::L) {
      if (k % W::LINE == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch((const char*)w.line(n + r + ahead, k), _MM_HINT_T0);
      V::vec wv[R];
      for (int r = 0; r < R; ++r) wv[r] = w.load(s[r], n + r, k);
      for (int m = 0; m < MB; ++m) {
        const V::vec xv = V::load(x + m * K + k);  // activations: L1/L2-resident
        for (int r = 0; r < R; ++r) acc[m][r] = V::fma(xv, wv[r], acc[m][r]);
      }
    }
  }
  if constexpr (W::TAILS) {
    if (k0 < K) {  // K % V::L tail (the formats without blocks)
      const int64_t rem = K - k0;
      for (int m = 0; m < MB; ++m) {
        const V::vec xv = V::tail(x + m * K + k0, rem);
        for (int r = 0; r < R; ++r) acc[m][r] = V::fma(xv, w.tail(n + r, k0, rem), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = V::sum(acc[m][r]);
}

// mb (runtime, 1..V::MBMAX) activation rows against one tile (TILE rows, in blocks of V::rows(MB)),
// or against one weight row (the N % TILE tail); out[m * TILE + r].
template <class W, int MB = 1>
static inline void tile_rows(int64_t mb, const W& w, const float* x, int64_t n, int64_t K, float* out) {
  if (mb == MB) {
    constexpr int R = W::TAILS ? V::rows(MB) : V::scaled_rows(MB);  // block formats: fewer (scale registers)
    static_assert(TILE % R == 0, "R divides TILE");
    for (int64_t r = 0; r < TILE; r += R) dots<W, MB, R>(w, x, n + r, K, TILE, out + r, TILE);
  } else if constexpr (MB < V::MBMAX) {
    tile_rows<W, MB + 1>(mb, w, x, n, K, out);
  }
}
template <class W, int MB = 1>
static inline void one_row(int64_t mb, const W& w, const float* x, int64_t n, int64_t K, float* out) {
  if (mb == MB) dots<W, MB, 1>(w, x, n, K, 1, out, TILE);
  else if constexpr (MB < V::MBMAX) one_row<W, MB + 1>(mb, w, x, n, K, out);
}

// y[m, n] = dot * scale[n] + bias[n] (scale, bias optional) for the output tiles [t0, t1) of TILE rows.
template <class W>
static void run_tiles(const W& w, const float* x, int64_t M, int64_t K, int64_t N, const float* scale,
                      const float* bias, float* y, int64_t t0, int64_t t1) {
  float out[V::MBMAX * TILE];
  for (int64_t n = t0 * TILE; n < std::min(t1 * TILE, N); n += TILE) {
    const int64_t nr = std::min(TILE, N - n);
    for (int64_t m0 = 0; m0 < M; m0 += V::MBMAX) {  // M > MBMAX: the tile's weights are re-read from L1/L2
      const int64_t mb = std::min<int64_t>(V::MBMAX, M - m0);
      const float* xm = x + m0 * K;
      if (nr == TILE) tile_rows<W>(mb, w, xm, n, K, out);
      else for (int64_t r = 0; r < nr; ++r) one_row<W>(mb, w, xm, n + r, K, out + r);
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

// y[M, N] = x[M, K] . W^T (* scale) (+ bias) for any decoder: all output tiles, split across threads.
template <class W>
static void dense_mm(const W& w, const float* x, int64_t M, int64_t K, int64_t N, const float* scale,
                     const float* bias, float* y) {
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) { run_tiles(w, x, M, K, N, scale, bias, y, t0, t1); });
}

// Grouped products (MoE experts): for each group g, y[g's rows] = x[g's rows] . w[g]^T, rows[g] rows each
// (consecutive), every w[g] [N, K] in the same format. One thread team over all (group, output tile) pairs,
// each thread a contiguous range of them: the experts' weights stream back to back with no fork/join per
// expert.
template <class W>
static void grouped_mm(const float* x, const W* w, const int64_t* rows, int64_t G, int64_t K, int64_t N, float* y) {
  std::vector<int64_t> r0(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) r0[g + 1] = r0[g] + rows[g];
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, G * tiles, 1, [&](int64_t a, int64_t b) {
    while (a < b) {  // [a, b) may start and end inside a group
      const int64_t g = a / tiles, t0 = a % tiles, t1 = std::min(tiles, t0 + (b - a));
      run_tiles(w[g], x + r0[g] * K, rows[g], K, N, nullptr, nullptr, y + r0[g] * N, t0, t1);
      a += t1 - t0;
    }
  });
}

// y[h] = x[h] . w[h]^T for x [H, M, K], w [H, N, K]; heads split across threads
static void f32_bmm(const float* x, const float* w, int64_t H, int64_t M, int64_t K, int64_t N, float* y) {
  const int64_t tiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      run_tiles(F32W{w + h * N * K, K}, x + h * M * K, M, K, N, nullptr, nullptr, y + h * M * N, 0, tiles);
  });
}

// Entry points on raw pointers (shapes checked by the callers outside the namespace).
static void f32_mm(const float* x, const float* w, int64_t M, int64_t K, int64_t N, const float* bias, float* y) {
  dense_mm(F32W{w, K}, x, M, K, N, nullptr, bias, y);
}

// y[M, N] = x[M, K] . W^T (* scale) (+ bias), W [N, K] in the format r names
static void linear(const WRef& r, const float* x, int64_t M, int64_t N, const float* scale, const float* bias,
                   float* y) {
  with_decoder(r, [&](const auto& w) { dense_mm(w, x, M, r.K, N, scale, bias, y); });
}

// grouped_mm over G weights of one format (described by rs[0..G))
static void grouped(const WRef* rs, const float* x, const int64_t* rows, int64_t G, int64_t N, float* y) {
  with_decoder(rs[0], [&](const auto& w0) {
    using W = std::decay_t<decltype(w0)>;
    std::vector<W> ws;
    ws.reserve(G);
    for (int64_t g = 0; g < G; ++g)
      with_decoder(rs[g], [&](const auto& w) {
        if constexpr (std::is_same_v<std::decay_t<decltype(w)>, W>) ws.push_back(w);
      });
    grouped_mm(x, ws.data(), rows, G, rs[0].K, N, y);
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
