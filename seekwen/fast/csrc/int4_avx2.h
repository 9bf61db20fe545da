// int4 weight-only products, AVX2 only (their per-group decode, not the FMA width, is what limits them).
// Included by kernels.cpp inside namespace avx2 after vec_avx2.h and loops.h: uses hsum, TILE and run.

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
