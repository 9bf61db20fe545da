// The many-row fp32 GEMM (prefill): y[M, N] = x[M, K] . W[N, K]^T (+ bias), fp32 in, fp32 accumulation,
// fp32 out, W read in place in its stored [N, K] layout (no packed copy of the weights).
//
// Textually included by kernels.cpp once per instruction set, after that namespace's vector traits `V`
// and loops.h (no include guard, no #includes), like loops.h.
//
// Design: outer products with the vectors along M. x is transposed per call, one K block at a time, into
// panels of P = 2 V::L rows (xt [panels][K block][P], zero past M; cheap: M x K). A tile is P activation
// rows x NB weight rows (NB = 12 with AVX-512, 6 with AVX2): 2 x NB accumulators, and per k two vector
// loads of xt and NB scalar broadcasts straight from W's rows (each row streamed sequentially, the next
// tile's rows prefetched). So the weights need neither packing (a BLIS-style transposed copy of W panels)
// nor K tails, and the accumulation over k is plain fp32 in order. A last panel of <= V::L rows runs
// with one vector (NB accumulators); rows are otherwise padded to P, which costs at 17-31 rows (see
// linear.GEMM_ROWS). The finished tile [NB][P] is written transposed into y (a few hundred scalar stores
// per K block; negligible against the 2 P NB K flops). Cache blocking: K in blocks of <= GEMM_KC (an xt
// panel slice of <= 128 KB and the W slice stay in L2), N in slices of ~GEMM_WSLICE bytes of weights
// reused across all panels of x. Threads: the weight-row groups split evenly (every thread streams its
// own rows of W), and the panels of x as well where there are fewer groups than threads.
// One core (Zen 4, AVX-512) reaches ~100 GFLOP/s of its ~106 peak on Qwen2.5-0.5B's shapes from 32 rows.
//
// Other weight formats (bf16, fp16, Q8_0, Q4_0: loops.h's decoders) are widened to fp32 one N slice x
// K block at a time into a per-thread scratch buffer (~GEMM_WSLICE bytes), which then serves all panels
// of x as the fp32 weights would: no fp32 copy of the whole weight per call.

constexpr int GEMM_MV = 2;                       // vectors of activation rows per tile
constexpr int64_t GEMM_P = GEMM_MV * V::L;       // activation rows per panel: 32 (AVX-512), 16 (AVX2)
constexpr int GEMM_NB = V::L == 16 ? 12 : 6;     // weight rows per tile: 2 x NB accumulators of 32 / 16 regs
constexpr int64_t GEMM_KC = 1024;                // most K per block
constexpr int64_t GEMM_WSLICE = 384 * 1024;      // bytes of W per N slice (L2-resident across panels)

// xt[p][k][i] = x[p P + i, k0 + k] for the panels p < np of x [M, K], k < kc; 0 for rows past M.
static void gemm_pack_x(const float* x, int64_t M, int64_t K, int64_t k0, int64_t kc, int64_t np, float* xt) {
  for (int64_t p = 0; p < np; ++p) {
    float* o = xt + p * kc * GEMM_P;
    for (int64_t i = 0; i < GEMM_P; ++i) {
      const int64_t m = p * GEMM_P + i;
      if (m < M)
        for (int64_t k = 0; k < kc; ++k) o[k * GEMM_P + i] = x[m * K + k0 + k];
      else
        for (int64_t k = 0; k < kc; ++k) o[k * GEMM_P + i] = 0.f;
    }
  }
}

// t[j][i] = sum_k xt[k][i] w[j, k] over kc inputs, i < MV L, j < NB: w row j at w + j ldw. The next
// tile's weight rows (NB further on) are prefetched once per 64-byte line as the rows stream.
template <int MV, int NB>
static inline void gemm_tile(const float* xt, const float* w, int64_t ldw, int64_t kc, float* t) {
  V::vec acc[NB][MV];
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = V::zero();
  for (int64_t k = 0; k < kc; ++k) {
    if (k % 16 == 0)
      for (int j = 0; j < NB; ++j) _mm_prefetch((const char*)(w + (j + NB) * ldw + k), _MM_HINT_T0);
    V::vec xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = V::load(xt + k * GEMM_P + v * V::L);
    for (int j = 0; j < NB; ++j) {
      const V::vec b = V::set1(w[j * ldw + k]);
      for (int v = 0; v < MV; ++v) acc[j][v] = V::fma(b, xv[v], acc[j][v]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < MV; ++v) V::store(t + j * GEMM_P + v * V::L, acc[j][v]);
}

// gemm_tile with a run-time row count nb (1..GEMM_NB: the N tail) and vector count mv (1: <= L rows left).
template <int MV, int NB = GEMM_NB>
static inline void gemm_tile_nb(int nb, const float* xt, const float* w, int64_t ldw, int64_t kc, float* t) {
  if (nb == NB) gemm_tile<MV, NB>(xt, w, ldw, kc, t);
  else if constexpr (NB > 1) gemm_tile_nb<MV, NB - 1>(nb, xt, w, ldw, kc, t);
}
static inline void gemm_tile_any(int64_t mr, int nb, const float* xt, const float* w, int64_t ldw, int64_t kc,
                                 float* t) {
  if (mr <= V::L) gemm_tile_nb<1>(nb, xt, w, ldw, kc, t);
  else gemm_tile_nb<GEMM_MV>(nb, xt, w, ldw, kc, t);
}

// y[i, j] (ldy) = t[j][i] (+ bias[j] if first, else + y[i, j]) for i < mr, j < nb.
static inline void gemm_store(const float* t, int64_t mr, int nb, const float* bias, bool first, float* y,
                              int64_t ldy) {
  for (int64_t i = 0; i < mr; ++i) {
    float* yr = y + i * ldy;
    for (int j = 0; j < nb; ++j) {
      const float prev = first ? (bias ? bias[j] : 0.f) : yr[j];
      yr[j] = prev + t[j * GEMM_P + i];
    }
  }
}

// out[r][k] = weight k0 + k of row n0 + r, widened to fp32 by the decoder w (loops.h), r < rows, k < kc.
// Block formats: k0 and kc multiples of their block size (K % 32 == 0, K blocks of a multiple of 32).
template <class W>
static void gemm_widen(const W& w, int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * kc;
    int64_t k = 0;
    for (; k + W::B <= kc; k += W::B) {
      const auto s = w.block(n0 + r, k0 + k);
      for (int64_t i = 0; i < W::B; i += V::L) V::store(o + k + i, w.load(s, n0 + r, k0 + k + i));
    }
    if constexpr (W::TAILS) {
      if (k < kc) {
        alignas(64) float t[V::L];
        V::store(t, w.tail(n0 + r, k0 + k, kc - k));
        std::memcpy(o + k, t, (kc - k) * sizeof(float));
      }
    }
  }
}

// The K block size for K (a multiple of 32 unless K is smaller: the block formats' blocks) and the rows
// of W per N slice (a multiple of NB, ~GEMM_WSLICE bytes of fp32 at that block size).
static inline int64_t gemm_kblock(int64_t K) {
  const int64_t nk = (K + GEMM_KC - 1) / GEMM_KC;
  return std::min(K, ((K + nk - 1) / nk + 31) / 32 * 32);
}
static inline int64_t gemm_slice(int64_t kcb) {
  return std::max<int64_t>(GEMM_NB, GEMM_WSLICE / (4 * kcb) / GEMM_NB * GEMM_NB);
}

// One share of the work: weight rows [n0, n1) against the np panels of x [M, K] (y [M, N] at the same
// rows); K blocks outermost, then N slices of W, then panels, then tiles of NB rows. xfull: x already
// transposed for all of K (xt [np][K][P]); else each K block of x is transposed here first. fp32 weights
// are read in place; any other format is widened slice by slice (rows x K block, ~GEMM_WSLICE bytes of
// fp32) into a scratch buffer first.
template <class W>
static void gemm_part(const float* x, const float* xfull, const W& w, int64_t M, int64_t K, int64_t N,
                      const float* bias, float* y, int64_t n0, int64_t n1, int64_t np) {
  constexpr bool in_place = std::is_same_v<W, F32W>;
  alignas(64) float t[GEMM_NB * GEMM_P];
  const int64_t kcb = gemm_kblock(K), slice = gemm_slice(kcb);
  std::unique_ptr<float[]> xt(xfull ? nullptr : new float[np * kcb * GEMM_P]);  // one K block, transposed
  std::unique_ptr<float[]> wide(in_place ? nullptr : new float[slice * kcb]);
  for (int64_t k0 = 0; k0 < K; k0 += kcb) {
    const int64_t kc = std::min(kcb, K - k0);
    if (!xfull) gemm_pack_x(x, M, K, k0, kc, np, xt.get());
    const float* xb = xfull ? xfull + k0 * GEMM_P : xt.get();  // panel p of this K block: xb + p * pstride
    const int64_t pstride = (xfull ? K : kc) * GEMM_P;
    for (int64_t s0 = n0; s0 < n1; s0 += slice) {
      const int64_t s1 = std::min(s0 + slice, n1);
      const float* ws = nullptr;  // the slice's row s0, column k0, as fp32; rows ldw apart
      int64_t ldw = K;
      if constexpr (in_place) {
        ws = w.w + s0 * K + k0;
      } else {
        gemm_widen(w, s0, s1 - s0, k0, kc, wide.get());
        ws = wide.get(), ldw = kc;
      }
      for (int64_t p = 0; p < np; ++p) {
        const int64_t m0 = p * GEMM_P, mr = std::min(GEMM_P, M - m0);
        for (int64_t n = s0; n < s1; n += GEMM_NB) {
          const int nb = (int)std::min<int64_t>(GEMM_NB, n1 - n);
          gemm_tile_any(mr, nb, xb + p * pstride, ws + (n - s0) * ldw, ldw, kc, t);
          gemm_store(t, mr, nb, bias ? bias + n : nullptr, k0 == 0, y + m0 * N + n, N);
        }
      }
    }
  }
}

// Static split: task (gi, mi) of gn x gm takes the gi-th share of the weight-row groups and the mi-th of
// the panels, transposing its panels of x one K block at a time (scratch <= M x GEMM_KC floats).
template <class W>
static void gemm_static(const W& w, const float* x, int64_t M, int64_t K, int64_t N, const float* bias, float* y,
                        int64_t nt) {
  const int64_t panels = (M + GEMM_P - 1) / GEMM_P, groups = (N + GEMM_NB - 1) / GEMM_NB;
  const int64_t gn = std::min(nt, groups), gm = std::max<int64_t>(1, std::min(nt / gn, panels));
  at::parallel_for(0, gn * gm, 1, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) {
      const int64_t gi = task % gn, mi = task / gn, p0 = panels * mi / gm, p1 = panels * (mi + 1) / gm;
      const int64_t n0 = std::min(N, groups * gi / gn * GEMM_NB), n1 = std::min(N, groups * (gi + 1) / gn * GEMM_NB);
      const int64_t m0 = p0 * GEMM_P;
      gemm_part(x + m0 * K, nullptr, w, std::min(M, p1 * GEMM_P) - m0, K, N, bias, y + m0 * N, n0, n1, p1 - p0);
    }
  });
}

// Dynamic split by N: each thread transposes all of x once (M x K floats), then claims chunks of weight
// rows (>= 4 per thread, at most one N slice each) from a shared counter until none are left; so a
// thread the OS deschedules on a busy host leaves its work to the others instead of holding up the join.
template <class W>
static void gemm_dynamic(const W& w, const float* x, int64_t M, int64_t K, int64_t N, const float* bias, float* y,
                         int64_t nt) {
  const int64_t panels = (M + GEMM_P - 1) / GEMM_P;
  const int64_t want = ((N + 4 * nt - 1) / (4 * nt) + GEMM_NB - 1) / GEMM_NB * GEMM_NB;
  const int64_t chunk = std::min(gemm_slice(gemm_kblock(K)), want), chunks = (N + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {  // one call per thread (or one in all, if serial)
    std::unique_ptr<float[]> xt(new float[panels * K * GEMM_P]);
    gemm_pack_x(x, M, K, 0, K, panels, xt.get());
    for (int64_t c = next++; c < chunks; c = next++)
      gemm_part(x, xt.get(), w, M, K, N, bias, y, c * chunk, std::min(N, (c + 1) * chunk), panels);
  });
}

// y[M, N] = x[M, K] . W^T (+ bias) for any decoder W (fp32: in place), any M, K, N >= 1, in one parallel
// region: split dynamically by N where there are enough weight rows (>= 4 tiles per thread) and x's
// transposed copy is small (<= GEMM_XFULL floats, 4 MB, per thread: the copies stay in L3 beside W; a
// larger x is better transposed one K block at a time), else statically (by N, and by M too where N has
// fewer tiles than there are threads).
constexpr int64_t GEMM_XFULL = 1 << 20;
template <class W>
static void gemm_mm(const W& w, const float* x, int64_t M, int64_t K, int64_t N, const float* bias, float* y) {
  const int64_t nt = at::get_num_threads(), groups = (N + GEMM_NB - 1) / GEMM_NB;
  const int64_t xfull = (M + GEMM_P - 1) / GEMM_P * GEMM_P * K;
  if (nt > 1 && groups >= 4 * nt && xfull <= GEMM_XFULL) gemm_dynamic(w, x, M, K, N, bias, y, nt);
  else gemm_static(w, x, M, K, N, bias, y, nt);
}

static void f32_gemm(const float* x, const float* w, int64_t M, int64_t K, int64_t N, const float* bias, float* y) {
  gemm_mm(F32W{w, K}, x, M, K, N, bias, y);
}

// gemm_mm for W [N, K] in the format r names (fp32, bf16, fp16, Q8_0, Q4_0, ...)
static void gemm(const WRef& r, const float* x, int64_t M, int64_t N, const float* bias, float* y) {
  with_decoder(r, [&](const auto& w) { gemm_mm(w, x, M, r.K, N, bias, y); });
}
