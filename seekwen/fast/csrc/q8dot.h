// Integer kernels for GGUF's Q8_0 / Q4_0 weights with int8 activations (llama.cpp's scheme): each
// activation row is quantized once per call to blocks of 32 int8 (one fp32 scale per block, `quantize`),
// then per block and output an exact integer dot product (vpdpbusd: unsigned x signed bytes, 4 per int32
// lane), and y += float(dot) * (d_w * d_x) (one fma per block), summed over blocks in order.
//
// Textually included by kernels.cpp once per integer instruction set (namespaces i512: AVX512-VNNI,
// i256vnni: AVX-VNNI, i256: AVX2 maddubs), after that namespace's integer vector traits `IV`
// (vec_int.h). No include guard, no #includes here. Every variant computes bit-identical results (the
// same integers, the same fp32 operations in the same order), as does the scalar code in kernels.cpp.
//
// The weights are repacked at load time (kernels.cpp `qpack`) so that one 512-bit vector holds 4 input
// channels of 16 output rows: rows in groups of QG = 16 (N padded with zero rows), per group and block
// of 32 input channels QB bytes:
//   Q8_0 (QB = 544): 8 chunks of 64 bytes, chunk j byte 4r + i = q[n0 + r, 32b + 4j + i] + 128 (uint8),
//                    then 16 fp16 scales d[n0 + r, b];
//   Q4_0 (QB = 288): 4 chunks of 64 bytes, chunk j byte 4r + i = code(32b + 8j + i) | code(32b + 8j + 4 + i) << 4
//                    (code = q + 8), then the 16 fp16 scales.
// So a broadcast of 4 activations against one chunk gives 16 outputs' partial dots at once (one lane per
// output row), and each loaded weight vector serves all activation rows of the pass. The unsigned-times-
// signed product needs a correction that depends only on the activations: Q8_0: sum (q + 128) a =
// sum q a + 128 sum a; Q4_0: sum code a = sum q a + 8 sum a; so each block's integer accumulator starts at
// -128 sum a (Q8_0; IV::Q8_BIAS, 0 for the maddubs variant, which multiplies q itself) or -8 sum a, computed
// once per call (qmm) and broadcast from memory.

constexpr int H = 16 / IV::LANES;  // vectors per 64-byte chunk (1 for 512-bit, 2 for 256-bit)

// acc[m][h] (+)= sum over the nb blocks of one group for MB activation rows (x: their rows, stride K).
template <bool Q4, int MB>
static inline void group_dots(const uint8_t* gp, const QAct& a, int64_t nb, IV::fvec (&acc)[MB][H]) {
  constexpr int64_t QB = Q4 ? 288 : 544, CODES = Q4 ? 256 : 512, AHEAD = Q4 ? 16 : 8;
  for (int64_t b = 0; b < nb; ++b, gp += QB) {
    for (int64_t l = 0; l < QB; l += 64)  // the block ~4.5 KB ahead (each thread's stream is sequential)
      _mm_prefetch((const char*)(gp + AHEAD * QB + l), _MM_HINT_T0);
    // this block's integer dots, started at the correction (a.s: see qmm). For few rows in two
    // independent chains (s, t: half the dependent vpdpbusd latency per block; with more rows the rows'
    // chains overlap anyway); integer sums, so the order does not change the result
    constexpr bool SPLIT = MB <= IV::SPLIT_MB;
    IV::ivec s[MB][H], t[MB][H];
    for (int m = 0; m < MB; ++m) {
      const IV::ivec c = IV::set1(a.s[m * nb + b]);
      for (int h = 0; h < H; ++h) s[m][h] = c, t[m][h] = IV::set1(0);  // (t unused unless SPLIT)
    }
    const int8_t* xb = a.q + 32 * b;  // activation row m, block b: xb + m * a.K
    if constexpr (Q4) {
      for (int j = 0; j < 4; ++j) {
        IV::ivec lo[H], hi[H];
        for (int h = 0; h < H; ++h) {
          const IV::ivec raw = IV::load(gp + 64 * j + h * IV::BYTES);
          lo[h] = IV::lo4(raw), hi[h] = IV::hi4(raw);
        }
        for (int m = 0; m < MB; ++m) {
          const IV::ivec x0 = IV::bcast4(xb + m * a.K + 8 * j), x1 = IV::bcast4(xb + m * a.K + 8 * j + 4);
          for (int h = 0; h < H; ++h) {
            s[m][h] = IV::dot_u(s[m][h], lo[h], x0);
            if constexpr (SPLIT) t[m][h] = IV::dot_u(t[m][h], hi[h], x1);
            else s[m][h] = IV::dot_u(s[m][h], hi[h], x1);
          }
        }
      }
    } else {
      for (int j = 0; j < 8; j += 2) {
        IV::ivec w0[H], w1[H];
        for (int h = 0; h < H; ++h)
          w0[h] = IV::load(gp + 64 * j + h * IV::BYTES), w1[h] = IV::load(gp + 64 * (j + 1) + h * IV::BYTES);
        for (int m = 0; m < MB; ++m) {
          const IV::ivec x0 = IV::bcast4(xb + m * a.K + 4 * j), x1 = IV::bcast4(xb + m * a.K + 4 * j + 4);
          for (int h = 0; h < H; ++h) {
            s[m][h] = IV::dot_q8(s[m][h], w0[h], x0);
            if constexpr (SPLIT) t[m][h] = IV::dot_q8(t[m][h], w1[h], x1);
            else s[m][h] = IV::dot_q8(s[m][h], w1[h], x1);
          }
        }
      }
    }
    if constexpr (SPLIT)
      for (int m = 0; m < MB; ++m)
        for (int h = 0; h < H; ++h) s[m][h] = IV::add(s[m][h], t[m][h]);
    IV::fvec dw[H];  // the 16 rows' weight scales
    for (int h = 0; h < H; ++h) dw[h] = IV::load_f16(gp + CODES + 2 * h * IV::LANES);
    for (int m = 0; m < MB; ++m) {
      const IV::fvec dx = IV::set1f(a.d[m * nb + b]);
      for (int h = 0; h < H; ++h) acc[m][h] = IV::fma(IV::cvt(s[m][h]), IV::mul(dw[h], dx), acc[m][h]);
    }
  }
}

// y[m, n0 .. n0 + nr) = the group's dots (+ bias) for the MB activation rows starting at a's row 0.
template <bool Q4, int MB>
static inline void group_rows(const uint8_t* gp, const QAct& a, int64_t nb, int64_t n0, int64_t nr,
                              const float* bias, float* y, int64_t ldy) {
  IV::fvec acc[MB][H];
  for (int m = 0; m < MB; ++m)
    for (int h = 0; h < H; ++h) acc[m][h] = IV::zerof();
  group_dots<Q4, MB>(gp, a, nb, acc);
  alignas(64) float out[16];
  for (int m = 0; m < MB; ++m) {
    for (int h = 0; h < H; ++h) IV::store(out + h * IV::LANES, acc[m][h]);
    for (int64_t r = 0; r < nr; ++r) y[m * ldy + n0 + r] = bias ? out[r] + bias[n0 + r] : out[r];
  }
}

// mb (runtime, 1..IV::MBMAX) activation rows: the group_rows instance for it
template <bool Q4, int MB = 1>
static inline void group_mb(int64_t mb, const uint8_t* gp, const QAct& a, int64_t nb, int64_t n0, int64_t nr,
                            const float* bias, float* y, int64_t ldy) {
  if (mb == MB) group_rows<Q4, MB>(gp, a, nb, n0, nr, bias, y, ldy);
  else if constexpr (MB < IV::MBMAX) group_mb<Q4, MB + 1>(mb, gp, a, nb, n0, nr, bias, y, ldy);
}

// y[M, N] = x . W^T (+ bias) over the row groups [g0, g1) of packed weights w, for quantized activations
// a [M, K] whose a.s are already the blocks' corrections (`corrections`): each group's rows run against
// the activation rows IV::MBMAX at a time (more rows: the group's packed weights, 16 x K bytes or half
// that, are read again from L1/L2).
static void qmm_groups(const QPacked& w, const QAct& a, int64_t M, const float* bias, float* y, int64_t g0,
                       int64_t g1) {
  const int64_t nb = w.K / 32, gbytes = nb * (w.q4 ? 288 : 544);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t n0 = 16 * g, nr = std::min<int64_t>(16, w.N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += IV::MBMAX) {
      const int64_t mb = std::min<int64_t>(IV::MBMAX, M - m0);
      const QAct am{a.q + m0 * a.K, a.d + m0 * nb, a.s + m0 * nb, a.K};
      if (w.q4) group_mb<true>(mb, w.p + g * gbytes, am, nb, n0, nr, bias, y + m0 * w.N, w.N);
      else group_mb<false>(mb, w.p + g * gbytes, am, nb, n0, nr, bias, y + m0 * w.N, w.N);
    }
  }
}

// The blocks' integer accumulators start at -(the codes' unsigned offset: 8 or IV::Q8_BIAS) * (the
// activation block's sum): c [M * nb] from the sums a.s.
static std::vector<int32_t> corrections(const QAct& a, int64_t M, bool q4) {
  const int32_t unsigned_bias = q4 ? 8 : IV::Q8_BIAS;
  std::vector<int32_t> c(M * (a.K / 32));
  for (size_t i = 0; i < c.size(); ++i) c[i] = -unsigned_bias * a.s[i];
  return c;
}

// y[M, N] = x . W^T (+ bias) for packed weights w and quantized activations a [M, K] (a.s: the
// activations' block sums): the row groups split across threads.
static void qmm(const QPacked& w, const QAct& a, int64_t M, const float* bias, float* y) {
  const std::vector<int32_t> c = corrections(a, M, w.q4);
  const QAct ac{a.q, a.d, c.data(), a.K};
  at::parallel_for(0, (w.N + 15) / 16, 1, [&](int64_t g0, int64_t g1) { qmm_groups(w, ac, M, bias, y, g0, g1); });
}

// Grouped products (MoE experts): for each e < G, y[e's rows] = x[e's rows] . ws[e]^T, rows[e] consecutive
// activation rows each (a: all of them, quantized once), every ws[e] [N, K] of one format. One thread team
// over all (expert, row group) pairs, each thread a contiguous range: the experts' weights stream back to
// back with no fork/join per expert.
static void grouped_qmm(const QPacked* ws, const QAct& a, const int64_t* rows, int64_t G, float* y) {
  std::vector<int64_t> r0(G + 1, 0);
  for (int64_t e = 0; e < G; ++e) r0[e + 1] = r0[e] + rows[e];
  const std::vector<int32_t> c = corrections(a, r0[G], ws[0].q4);
  const int64_t nb = a.K / 32, N = ws[0].N, groups = (N + 15) / 16;
  at::parallel_for(0, G * groups, 1, [&](int64_t i, int64_t end) {
    while (i < end) {  // [i, end) may start and end inside an expert
      const int64_t e = i / groups, g0 = i % groups, g1 = std::min(groups, g0 + (end - i));
      const QAct ae{a.q + r0[e] * a.K, a.d + r0[e] * nb, c.data() + r0[e] * nb, a.K};
      qmm_groups(ws[e], ae, rows[e], nullptr, y + r0[e] * N, g0, g1);
      i += g1 - g0;
    }
  });
}

// Rows [m0, m1) of x [M, K] (fp32) -> int8 blocks of 32 (ggml's quantize_row_q8_0: d = amax / 127,
// q = roundf(x * (1 / d)), halves away from zero) with their fp32 scales d and integer sums s [M, K / 32].
static void quantize(const float* x, int64_t K, int8_t* q, float* d, int32_t* s, int64_t m0, int64_t m1) {
  const int64_t nb = K / 32;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t b = 0; b < nb; ++b)
      IV::quantize_block(x + m * K + 32 * b, q + m * K + 32 * b, d + m * nb + b, s + m * nb + b);
}
