// Integer vector traits `IV` for q8dot.h: SEEKWEN_IV512 defined: AVX512-VNNI (__m512i, 16 int32 lanes =
// the 16 rows of a packed group); else 256-bit (__m256i, 8 lanes, two vectors per group), with AVX-VNNI's
// vpdpbusd where SEEKWEN_IV_VNNI is 1 and AVX2's vpmaddubsw + vpmaddwd where it is 0. Included by
// kernels.cpp inside each integer namespace, under that namespace's `#pragma GCC target`; no include
// guard, no #includes of its own.
//
// dot_u(acc, u, a): acc + per int32 lane the sum of 4 products u8 x s8 (u: Q4_0 codes 0..15, exact in
// both variants: maddubs' 16-bit pair sums stay far below saturation). dot_q8(acc, wb, a): the same for
// Q8_0's biased bytes wb = q + 128: VNNI: exactly sum wb a (the 128 sum a is the accumulator's starting
// correction, Q8_BIAS = 128); maddubs would saturate there (255 x 127 x 2 > 32767), so that variant
// multiplies |q| by a with q's sign (llama.cpp's mul_sum_i8_pairs; |pair sums| <= 2 x 128 x 127) and
// needs no correction (Q8_BIAS = 0).
//
// quantize_block(x, q, d, s): one block of 32 activations -> 32 int8, d = amax / 127, s = sum of q.
// Rounding: v = x * (1 / d) in fp32, then halves away from zero as C's roundf, done exactly as
// t = trunc(v); q = t + sign(v) where |v - t| >= 0.5 (v - t is exact). kernels.py builds with
// -ffp-contract=off, so no multiply here is fused into an add.

#ifdef SEEKWEN_IV512
struct IV {
  using ivec = __m512i;
  using fvec = __m512;
  static constexpr int LANES = 16, BYTES = 64;
  static constexpr int MBMAX = 8;  // 8 rows: 8 float + 8 int accumulators, the weights, a broadcast
  static constexpr int SPLIT_MB = 4;  // up to 4 rows: two integer chains per row (q8dot.h)
  static constexpr int Q8_BIAS = 128;
  static inline ivec load(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
  static inline ivec bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static inline ivec set1(int32_t v) { return _mm512_set1_epi32(v); }
  static inline ivec add(ivec a, ivec b) { return _mm512_add_epi32(a, b); }
  static inline ivec lo4(ivec v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
  static inline ivec hi4(ivec v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15)); }
  static inline ivec dot_u(ivec acc, ivec u, ivec a) { return _mm512_dpbusd_epi32(acc, u, a); }
  static inline ivec dot_q8(ivec acc, ivec wb, ivec a) { return _mm512_dpbusd_epi32(acc, wb, a); }
  static inline fvec zerof() { return _mm512_setzero_ps(); }
  static inline fvec set1f(float v) { return _mm512_set1_ps(v); }
  static inline fvec load_f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static inline fvec cvt(ivec v) { return _mm512_cvtepi32_ps(v); }
  static inline fvec mul(fvec a, fvec b) { return _mm512_mul_ps(a, b); }
  static inline fvec fma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void store(float* p, fvec v) { _mm512_storeu_ps(p, v); }

  // 16 activations -> int32 lanes rounded half away from zero (v = x * id)
  static inline __m512i round_away(__m512 x, __m512 id) {
    const __m512 v = _mm512_mul_ps(x, id);
    const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_abs_ps(_mm512_sub_ps(v, t));
    const __mmask16 up = _mm512_cmp_ps_mask(f, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512 one = _mm512_or_ps(_mm512_and_ps(v, _mm512_set1_ps(-0.f)), _mm512_set1_ps(1.f));  // sign(v) 1
    return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, one));
  }
  static inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* s) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float dd = amax / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
    const __m512i q0 = round_away(x0, _mm512_set1_ps(id)), q1 = round_away(x1, _mm512_set1_ps(id));
    _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtepi32_epi8(q1));
    *d = dd;
    *s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
};
#else
struct IV {
  using ivec = __m256i;
  using fvec = __m256;
  static constexpr int LANES = 8, BYTES = 32;
  static constexpr int MBMAX = 3;  // 3 rows x 2 halves: 6 float + 6 int accumulators, 2 weights, a broadcast
  static constexpr int SPLIT_MB = 1;  // one row: two integer chains (q8dot.h); more would spill
  static constexpr int Q8_BIAS = SEEKWEN_IV_VNNI ? 128 : 0;
  static inline ivec load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static inline ivec bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  static inline ivec set1(int32_t v) { return _mm256_set1_epi32(v); }
  static inline ivec add(ivec a, ivec b) { return _mm256_add_epi32(a, b); }
  static inline ivec lo4(ivec v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
  static inline ivec hi4(ivec v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
#if SEEKWEN_IV_VNNI
  static inline ivec dot_u(ivec acc, ivec u, ivec a) { return _mm256_dpbusd_avx_epi32(acc, u, a); }
  static inline ivec dot_q8(ivec acc, ivec wb, ivec a) { return _mm256_dpbusd_avx_epi32(acc, wb, a); }
#else
  static inline ivec sum_pairs(ivec p16) { return _mm256_madd_epi16(p16, _mm256_set1_epi16(1)); }
  static inline ivec dot_u(ivec acc, ivec u, ivec a) {
    return _mm256_add_epi32(acc, sum_pairs(_mm256_maddubs_epi16(u, a)));
  }
  static inline ivec dot_q8(ivec acc, ivec wb, ivec a) {
    const ivec w = _mm256_xor_si256(wb, _mm256_set1_epi8((char)0x80));  // q, signed
    return _mm256_add_epi32(acc, sum_pairs(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w))));
  }
#endif
  static inline fvec zerof() { return _mm256_setzero_ps(); }
  static inline fvec set1f(float v) { return _mm256_set1_ps(v); }
  static inline fvec load_f16(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static inline fvec cvt(ivec v) { return _mm256_cvtepi32_ps(v); }
  static inline fvec mul(fvec a, fvec b) { return _mm256_mul_ps(a, b); }
  static inline fvec fma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline void store(float* p, fvec v) { _mm256_storeu_ps(p, v); }

  static inline __m256i round_away(__m256 x, __m256 id) {
    const __m256 v = _mm256_mul_ps(x, id);
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 f = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
    const __m256 up = _mm256_cmp_ps(f, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    const __m256 one = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.f));
    return _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, one)));
  }
  static inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* s) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 xs[4], mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      xs[i] = _mm256_loadu_ps(x + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, xs[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float dd = amax / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
    __m256i qi[4];
    for (int i = 0; i < 4; ++i) qi[i] = round_away(xs[i], _mm256_set1_ps(id));
    // int32 -> int8 in order: packs interleave the 128-bit halves, the permute undoes it
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i t = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
    *d = dd;
    *s = _mm_cvtsi128_si32(t4);
  }
};
#endif
