// AVX-512 vector traits `V` (__m512, 16 fp32 lanes) for loops.h. Included by kernels.cpp inside
// namespace avx512, under `#pragma GCC target("avx512f,...")`; no include guard, no #includes of its own.
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
