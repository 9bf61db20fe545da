// Paged attention on CPU (included by kernels.cpp; bound as kernels.paged_attention): each row is one new query position of a sequence, its keys read in place from
// fixed-size KV blocks through the sequence's block table (no gather of the cache per step).
//
// One kernel serves GQA and MLA. Per row b and KV head g there are Q queries (GQA: the query heads
// sharing KV head g; MLA: every head, G = 1) attending to keys [start[b], count[b]):
//   score(q, t) = scale * (q1[q] . k1[t] + q2[q] . k2[t])      (k2: MLA's rotated key; absent for GQA)
//   out[q]      = sum_t softmax_t(score(q, .)) v[t]             (MLA: v = k1, the latent itself)
// Position t of row b lives in block table[b, t / bs] at row t % bs of every pool.
//
// Consecutive rows with the same block table are one group: the tokens of one sequence computed in the
// same call (a prefill chunk, speculative tokens; the runner's one-token rows). A group's keys are read
// once for all its rows' queries, each query masked to its own row's [start, count).
//
// Work is split flash-decoding style: tasks of (group, KV head, CHUNK keys) run in parallel, each keeps
// its running max, sum and unnormalised output per query, and one merge per (row, head) combines them.
// Scores are computed a tile of TILE keys at a time: the tile is transposed into [d, TILE], so each
// query's scores are d broadcast multiply-adds over TILE lanes (no per-key horizontal sum), QB queries
// at once (independent accumulator chains); the exponentials are a vectorisable polynomial
// (`fast_exp`). GCC vector types and plain loops, vectorised by -O3 -mavx2 -mfma.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace paged {

constexpr int64_t TILE = 16;    // keys scored at once
constexpr int64_t CHUNK = 256;  // keys per task (a multiple of TILE)
constexpr int64_t QB = 4;       // queries scored together: 2 * QB independent multiply-add chains
typedef float Lanes __attribute__((vector_size(8 * sizeof(float))));  // 8 keys' scores (one AVX register)
static_assert(TILE == 16, "a tile is two Lanes of keys");
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// e^x for x <= 0 (a score minus its row's max): 2^n * p(r), x = n ln 2 + r, |r| <= ln 2 / 2, p the
// degree-6 Taylor polynomial (relative error < 3e-7); below -87 it flushes to e^-87 ~ 1.6e-38.
inline float fast_exp(float x) {
  x = std::max(x, -87.f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = std::fma(n, -6.93145752e-1f, std::fma(n, -1.42860677e-6f, x));
  float p = 1.f / 720;
  p = std::fma(p, r, 1.f / 120);
  p = std::fma(p, r, 1.f / 24);
  p = std::fma(p, r, 1.f / 6);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Scores of a block of QB queries qt [d, QB] (component-major, zero-padded past the real ones) against
// one transposed tile kt [d, TILE] (as Lanes: [c][2]), written scaled to out[k * stride + j] for the
// block's nq real queries and the tile's n keys.
inline void score_tile(const float* qt, const Lanes* kt, int64_t d, float scale, int64_t nq, int64_t n,
                       float* out, int64_t stride) {
  Lanes lo[QB] = {}, hi[QB] = {};  // per query: keys 0-7, 8-15 of the tile
  for (int64_t c = 0; c < d; ++c) {
    const Lanes a = kt[2 * c], b = kt[2 * c + 1];
#pragma GCC unroll 4
    for (int64_t k = 0; k < QB; ++k) {
      lo[k] += qt[c * QB + k] * a;
      hi[k] += qt[c * QB + k] * b;
    }
  }
  for (int64_t k = 0; k < nq; ++k)
    for (int64_t j = 0; j < n; ++j) out[k * stride + j] = (j < 8 ? lo[k][j] : hi[k][j - 8]) * scale;
}

inline Lanes load(const float* p) {
  Lanes x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline void store_add(float* p, Lanes x) {
  Lanes y = load(p) + x;
  std::memcpy(p, &y, sizeof y);
}

// o[k, c] = sum_t p[k * len + t] * v[t][c] for nq (<= QB) queries' weights p over len keys with value rows
// v[t] [dv]: QB queries x 16 components per pass (8 accumulators: each value load feeds QB products).
inline void value_block(const float* p, int64_t len, int64_t nq, const float* const* v, int64_t dv, float* o) {
  int64_t c = 0;
  for (; c + 16 <= dv; c += 16) {
    Lanes lo[QB] = {}, hi[QB] = {};
    for (int64_t t = 0; t < len; ++t) {
      const Lanes a = load(v[t] + c), b = load(v[t] + c + 8);
#pragma GCC unroll 4
      for (int64_t k = 0; k < QB; ++k) {
        const float w = k < nq ? p[k * len + t] : 0.f;
        lo[k] += w * a;
        hi[k] += w * b;
      }
    }
    for (int64_t k = 0; k < nq; ++k) store_add(o + k * dv + c, lo[k]), store_add(o + k * dv + c + 8, hi[k]);
  }
  for (; c < dv; ++c)  // dv not a multiple of 16: the rest one component at a time
    for (int64_t k = 0; k < nq; ++k) {
      float acc = 0.f;
      for (int64_t t = 0; t < len; ++t) acc += p[k * len + t] * v[t][c];
      o[k * dv + c] += acc;
    }
}

#ifdef __AVX2__
// dst[c * TILE + j0 + i] = src[i][c0 + c] for an 8 x 8 block (8 key rows, 8 components), in registers
inline void transpose8(const float* const* src, int64_t c0, float* dst) {
  __m256 r[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src[i] + c0);
  for (int i = 0; i < 8; i += 2) u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44), r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44), r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * TILE, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * TILE, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// kt[c * TILE + j] = rows[j][c] for the tile's n key rows and d components (kt already zero past n
// when n < TILE); full tiles with d % 8 == 0 go through 8 x 8 register transposes.
inline void transpose_tile(const float* const* rows, int64_t n, int64_t d, float* kt) {
#ifdef __AVX2__
  if (n == TILE && d % 8 == 0) {
    for (int64_t c0 = 0; c0 < d; c0 += 8) {
      transpose8(rows, c0, kt + c0 * TILE);
      transpose8(rows + 8, c0, kt + c0 * TILE + 8);
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) kt[c * TILE + j] = rows[j][c];
}

struct Group {
  int64_t b0, b1, t0, t1;  // rows [b0, b1), keys [t0, t1): the union of the rows' ranges
};

struct Task {
  int64_t group, g, t0, t1, out;  // out: offset of its (rows x Q) partial results
};

// Rows grouped: consecutive rows whose block tables are equal.
std::vector<Group> group_rows(const int32_t* tab, int64_t B, int64_t nb, const std::vector<int64_t>& start,
                              const std::vector<int64_t>& count) {
  std::vector<Group> groups;
  for (int64_t b = 0; b < B; ++b) {
    if (!groups.empty() && std::memcmp(tab + b * nb, tab + (b - 1) * nb, nb * sizeof(int32_t)) == 0) {
      Group& gr = groups.back();
      gr.b1 = b + 1, gr.t0 = std::min(gr.t0, start[b]), gr.t1 = std::max(gr.t1, count[b]);
    } else {
      groups.push_back({b, b + 1, start[b], count[b]});
    }
  }
  return groups;
}

}  // namespace paged

// q1 [B, G, Q, d1], q2 [B, G, Q, d2] (d2 may be 0), pools k1 [N, bs, G, d1], k2 [N, bs, G, d2],
// v [N, bs, G, dv] (contiguous), table [B, nb] int32, start/count [B]: keys [start, count) of each
// row. Returns [B, G, Q, dv].
torch::Tensor paged_attention(torch::Tensor q1, torch::Tensor q2, torch::Tensor k1, torch::Tensor k2,
                              torch::Tensor v, torch::Tensor table, std::vector<int64_t> start,
                              std::vector<int64_t> count, double scale) {
  using namespace paged;
  for (const auto* t : {&q1, &q2, &k1, &k2, &v})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->dim() == 4,
                "paged_attention: fp32 contiguous 4-d tensors");
  TORCH_CHECK(table.scalar_type() == torch::kInt && table.is_contiguous() && table.dim() == 2,
              "paged_attention: int32 block table [B, nb]");
  const int64_t B = q1.size(0), G = q1.size(1), Q = q1.size(2), d1 = q1.size(3);
  const int64_t d2 = q2.numel() ? q2.size(3) : 0, dv = v.size(3), bs = k1.size(1), nb = table.size(1);
  const int64_t d = d1 + d2;
  TORCH_CHECK(k1.size(2) == G && v.size(2) == G && k1.size(3) == d1 && v.size(1) == bs, "paged_attention: pools");
  TORCH_CHECK(d2 == 0 || (q2.size(0) == B && q2.size(1) == G && q2.size(2) == Q && k2.size(3) == d2),
              "paged_attention: q2 / k2");
  TORCH_CHECK((int64_t)start.size() == B && (int64_t)count.size() == B && table.size(0) == B,
              "paged_attention: one start and count per row");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= start[b] && start[b] < count[b] && count[b] <= nb * bs, "paged_attention: key range");
  const int32_t* tab = table.data_ptr<int32_t>();
  const std::vector<Group> groups = group_rows(tab, B, nb, start, count);
  std::vector<Task> tasks;
  int64_t n_out = 0;
  for (int64_t gi = 0; gi < (int64_t)groups.size(); ++gi) {
    const Group& gr = groups[gi];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t0 = gr.t0; t0 < gr.t1; t0 += CHUNK) {
        tasks.push_back({gi, g, t0, std::min(gr.t1, t0 + CHUNK), n_out});
        n_out += (gr.b1 - gr.b0) * Q;
      }
  }
  const int64_t T = tasks.size();
  auto part_o = torch::zeros({n_out, dv}, q1.options());
  std::vector<float> part_m(n_out), part_l(n_out);
  const float* Q1 = q1.data_ptr<float>();
  const float* Q2 = d2 ? q2.data_ptr<float>() : nullptr;
  const float *K1 = k1.data_ptr<float>(), *K2 = d2 ? k2.data_ptr<float>() : nullptr, *Vp = v.data_ptr<float>();
  float* PO = part_o.data_ptr<float>();
  const float sc = (float)scale;
  at::parallel_for(0, T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s, qt;
    std::vector<const float*> vrows;  // the task's value rows
    std::vector<Lanes> kt(2 * d);  // a transposed tile [d, TILE]
    float* ktf = reinterpret_cast<float*>(kt.data());
    for (int64_t i = i0; i < i1; ++i) {
      const Task tk = tasks[i];
      const Group& gr = groups[tk.group];
      const int64_t len = tk.t1 - tk.t0, nq = (gr.b1 - gr.b0) * Q;  // queries: (row, q)
      auto row = [&](int64_t t) { return (int64_t)tab[gr.b0 * nb + t / bs] * bs + t % bs; };
      // the queries in blocks of QB, each block [d, QB] component-major (q1, then q2)
      qt.assign(((nq + QB - 1) / QB) * QB * d, 0.f);
      for (int64_t j = 0; j < nq; ++j) {
        const int64_t b = gr.b0 + j / Q, q = j % Q;
        const float* a = Q1 + ((b * G + tk.g) * Q + q) * d1;
        const float* a2 = d2 ? Q2 + ((b * G + tk.g) * Q + q) * d2 : nullptr;
        float* dst = qt.data() + (j / QB) * QB * d + j % QB;
        for (int64_t c = 0; c < d1; ++c) dst[c * QB] = a[c];
        for (int64_t c = 0; c < d2; ++c) dst[(d1 + c) * QB] = a2[c];
      }
      s.resize(nq * len);  // scores [nq, len]
      for (int64_t t = tk.t0; t < tk.t1; t += TILE) {
        const int64_t n = std::min(TILE, tk.t1 - t);
        if (n < TILE) std::fill(ktf, ktf + d * TILE, 0.f);  // kt[c, j] = key t + j's component c, 0 past the keys
        const float* k1r[TILE];
        const float* k2r[TILE];
        for (int64_t j = 0; j < n; ++j) {
          const int64_t r = row(t + j);
          k1r[j] = K1 + (r * G + tk.g) * d1;
          k2r[j] = d2 ? K2 + (r * G + tk.g) * d2 : nullptr;
        }
        transpose_tile(k1r, n, d1, ktf);
        if (d2) transpose_tile(k2r, n, d2, ktf + d1 * TILE);
        for (int64_t j0 = 0; j0 < nq; j0 += QB)
          score_tile(qt.data() + j0 * d, kt.data(), d, sc, std::min(QB, nq - j0), n, s.data() + j0 * len + (t - tk.t0), len);
      }
      // softmax numerators per query over its own keys; keys outside its row's range weigh 0
      for (int64_t j = 0; j < nq; ++j) {
        const int64_t b = gr.b0 + j / Q;
        // the row's keys within this task: [lo, hi) of its len (empty when the row ends before it)
        const int64_t lo = std::clamp<int64_t>(start[b] - tk.t0, 0, len);
        const int64_t hi = std::clamp<int64_t>(count[b] - tk.t0, lo, len);
        float* sq = s.data() + j * len;
        float m = NEG_INF, l = 0.f;
        for (int64_t k = lo; k < hi; ++k) m = std::max(m, sq[k]);
        std::fill(sq, sq + lo, 0.f);
#pragma omp simd reduction(+ : l)
        for (int64_t k = lo; k < hi; ++k) {
          sq[k] = fast_exp(sq[k] - m);
          l += sq[k];
        }
        std::fill(sq + hi, sq + len, 0.f);
        part_m[tk.out + j] = m;
        part_l[tk.out + j] = l;
      }
      vrows.resize(len);
      for (int64_t t = tk.t0; t < tk.t1; ++t) vrows[t - tk.t0] = Vp + (row(t) * G + tk.g) * dv;
      for (int64_t j0 = 0; j0 < nq; j0 += QB)
        value_block(s.data() + j0 * len, len, std::min(QB, nq - j0), vrows.data(), dv, PO + (tk.out + j0) * dv);
    }
  });
  // merge, per (row, head), the chunks of its group's tasks for that head (consecutive tasks)
  auto out = torch::empty({B, G, Q, dv}, q1.options());
  float* O = out.data_ptr<float>();
  std::vector<int64_t> first(groups.size() * G + 1, T);
  for (int64_t i = T - 1; i >= 0; --i) first[tasks[i].group * G + tasks[i].g] = i;
  std::vector<int64_t> group_of(B);
  for (int64_t gi = 0; gi < (int64_t)groups.size(); ++gi)
    for (int64_t b = groups[gi].b0; b < groups[gi].b1; ++b) group_of[b] = gi;
  at::parallel_for(0, B * G, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / G, g = j % G, gi = group_of[b], local = (b - groups[gi].b0) * Q;
      int64_t i0 = first[gi * G + g], i1 = i0;
      while (i1 < T && tasks[i1].group == gi && tasks[i1].g == g) ++i1;
      for (int64_t q = 0; q < Q; ++q) {
        float M = NEG_INF;
        for (int64_t i = i0; i < i1; ++i) M = std::max(M, part_m[tasks[i].out + local + q]);
        float L = 0.f;
        float* y = O + (j * Q + q) * dv;
        std::fill(y, y + dv, 0.f);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t k = tasks[i].out + local + q;
          if (part_m[k] == NEG_INF) continue;  // none of the row's keys in this chunk
          const float w = std::exp(part_m[k] - M);
          L += w * part_l[k];
          axpy(y, w, PO + k * dv, dv);
        }
        const float inv = 1.f / L;
        for (int64_t c = 0; c < dv; ++c) y[c] *= inv;
      }
    }
  });
  return out;
}
