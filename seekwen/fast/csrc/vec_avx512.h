// AVX-512 vector traits `V` (__m512, 16 fp32 lanes) for loops.h: arithmetic, and the loads that widen
// each weight format to fp32 lanes. Included by kernels.cpp inside namespace avx512, under
// `#pragma GCC target("avx512f,...")`; no include guard, no #includes of its own.
struct V {
  using vec = __m512;
  static constexpr int64_t L = 16;
  static constexpr int MBMAX = 8;  // 8 rows in one pass: 8 x 3 accumulators + 3 weights + x of 32
  static constexpr int KN_COLS = 3;  // f32_mm_kn: 8 x 3 accumulators + 3 loads + 1 broadcast
  static constexpr int rows(int mb) { return mb <= 6 ? 4 : 3; }
  static constexpr int scaled_rows(int mb) { return mb <= 4 ? 4 : 3; }  // + a block scale per row
  static inline __mmask16 mask(int64_t r) { return (__mmask16)((1u << r) - 1); }
  static inline vec zero() { return _mm512_setzero_ps(); }
  static inline vec set1(float a) { return _mm512_set1_ps(a); }
  static inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static inline float sum(vec v) { return _mm512_reduce_add_ps(v); }
  static inline vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline vec tail(const float* p, int64_t r) { return _mm512_maskz_loadu_ps(mask(r), p); }
  static inline vec load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }
  static inline vec tail_i8(const int8_t* p, int64_t r) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask(r), p)));
  }
  static inline vec widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static inline vec load_bf16(const uint16_t* p) { return widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }
  static inline vec tail_bf16(const uint16_t* p, int64_t r) { return widen_bf16(_mm256_maskz_loadu_epi16(mask(r), p)); }
  static inline vec load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static inline vec tail_f16(const uint16_t* p, int64_t r) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(r), p)); }
  // Q4_0: per block a lookup table t[c] = (c - 8) * d of the 16 codes (one multiply), then 16 lanes are
  // one vpermps each: the bytes widened to 32-bit lanes, whose low 4 bits (the low nibble; the high one
  // after a shift by 4) index t. No int -> float conversion or scaling per vector.
  struct Q4Block {
    vec t;
  };
  static inline Q4Block q4_block(float d) {
    const vec codes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    return {_mm512_mul_ps(codes, set1(d))};
  }
  static inline vec q4_load(const Q4Block& b, const uint8_t* p, bool hi) {
    __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    if (hi) i = _mm512_srli_epi32(i, 4);
    return _mm512_permutexvar_ps(i, b.t);  // uses bits 0-3 of each lane
  }
  // int4 (group-asymmetric): 16 codes from 8 bytes, two per byte in order (code 2j low, 2j + 1 high)
  static inline vec load_u4seq(const uint8_t* p) {
    const __m128i v = _mm_loadl_epi64((const __m128i*)p), lo4 = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, lo4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), lo4);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
  }
};
