// The loop code shared by both instruction sets: weight decoders, register-blocked dot products, tiles,
// threading, and the raw-pointer entry points (f32_mm, int8_mm, grouped_mm, f32_bmm, f32_mm_kn).
//
// Textually included by kernels.cpp once per instruction set, inside namespace avx2 and namespace
// avx512, after that namespace's vector traits `V` (vec_avx2.h / vec_avx512.h): `V` supplies the
// vector type, its width V::L and its operations. Hence no include guard and no #includes here.
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
