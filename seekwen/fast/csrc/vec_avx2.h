// AVX2 vector traits `V` (__m256, 8 fp32 lanes) for loops.h: arithmetic, and the loads that widen each
// weight format to fp32 lanes. Included by kernels.cpp inside namespace avx2; no include guard, no
// #includes of its own.
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
  static constexpr int scaled_rows(int mb) { return mb <= 2 ? 3 : 2; }  // + a block scale per row
  static inline vec zero() { return _mm256_setzero_ps(); }
  static inline vec set1(float a) { return _mm256_set1_ps(a); }
  static inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
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
  static inline vec load_bf16(const uint16_t* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static inline vec tail_bf16(const uint16_t* p, int64_t r) {
    uint16_t b[8] = {0};
    std::memcpy(b, p, 2 * r);
    return load_bf16(b);
  }
  static inline vec load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static inline vec tail_f16(const uint16_t* p, int64_t r) {
    uint16_t b[8] = {0};
    std::memcpy(b, p, 2 * r);
    return load_f16(b);
  }
  // Q4_0: per block its scale d; lanes = the low (hi = false) or high nibbles of 8 bytes, (code - 8) * d
  struct Q4Block {
    vec d;
  };
  static inline Q4Block q4_block(float d) { return {set1(d)}; }
  static inline vec q4_load(const Q4Block& b, const uint8_t* p, bool hi) {
    __m128i v = _mm_loadl_epi64((const __m128i*)p);
    if (hi) v = _mm_srli_epi16(v, 4);
    v = _mm_sub_epi8(_mm_and_si128(v, _mm_set1_epi8(15)), _mm_set1_epi8(8));
    return mul(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), b.d);
  }
  // int4 (group-asymmetric): 8 codes from 4 bytes, two per byte in order (code 2j low, 2j + 1 high)
  static inline vec load_u4seq(const uint8_t* p) {
    int32_t b;
    std::memcpy(&b, p, 4);
    const __m128i v = _mm_cvtsi32_si128(b), lo4 = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, lo4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), lo4);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
  }
};
