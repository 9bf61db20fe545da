// Paged decode attention on CPU: one new query position per sequence, its keys read in place from
// fixed-size KV blocks through the sequence's block table (no gather of the cache per step).
//
// One kernel serves GQA and MLA. Per sequence b and KV head g there are Q queries (GQA: the query
// heads sharing KV head g; MLA: every head, G = 1) attending to keys [start[b], count[b]):
//   score(q, t) = scale * (q1[q] . k1[t] + q2[q] . k2[t])      (k2: MLA's rotated key; absent for GQA)
//   out[q]      = sum_t softmax_t(score(q, .)) v[t]             (MLA: v = k1, the latent itself)
// Position t of sequence b lives in block table[b, t / bs] at row t % bs of every pool.
//
// Work is split flash-decoding style: tasks of (sequence, KV head, CHUNK keys) run in parallel, each
// keeps its running max, sum and unnormalised output, and one merge per (sequence, head) combines them.
// Within a task every key row is read once for all Q queries (scores), then once more for the values.
// The dot products and axpys are plain loops under `omp simd` (vectorised by -O3 -mavx2 -mfma).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 256;  // keys per task

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

struct Task {
  int64_t b, g, t0, t1;
};

}  // namespace

// q1 [B, G, Q, d1], q2 [B, G, Q, d2] (d2 may be 0), pools k1 [N, bs, G, d1], k2 [N, bs, G, d2],
// v [N, bs, G, dv] (contiguous), table [B, nb] int32, start/count [B]: keys [start, count) of each
// sequence. Returns [B, G, Q, dv].
torch::Tensor paged_attention(torch::Tensor q1, torch::Tensor q2, torch::Tensor k1, torch::Tensor k2,
                              torch::Tensor v, torch::Tensor table, std::vector<int64_t> start,
                              std::vector<int64_t> count, double scale) {
  for (const auto* t : {&q1, &q2, &k1, &k2, &v})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->dim() == 4,
                "paged_attention: fp32 contiguous 4-d tensors");
  TORCH_CHECK(table.scalar_type() == torch::kInt && table.is_contiguous() && table.dim() == 2,
              "paged_attention: int32 block table [B, nb]");
  const int64_t B = q1.size(0), G = q1.size(1), Q = q1.size(2), d1 = q1.size(3);
  const int64_t d2 = q2.numel() ? q2.size(3) : 0, dv = v.size(3), bs = k1.size(1), nb = table.size(1);
  TORCH_CHECK(k1.size(2) == G && v.size(2) == G && k1.size(3) == d1 && v.size(1) == bs, "paged_attention: pools");
  TORCH_CHECK(d2 == 0 || (q2.size(0) == B && q2.size(1) == G && q2.size(2) == Q && k2.size(3) == d2),
              "paged_attention: q2 / k2");
  TORCH_CHECK((int64_t)start.size() == B && (int64_t)count.size() == B && table.size(0) == B,
              "paged_attention: one start and count per sequence");
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= start[b] && start[b] < count[b] && count[b] <= nb * bs, "paged_attention: key range");
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t0 = start[b]; t0 < count[b]; t0 += CHUNK) tasks.push_back({b, g, t0, std::min(count[b], t0 + CHUNK)});
  }
  const int64_t T = tasks.size();
  auto part_o = torch::zeros({T, Q, dv}, q1.options());
  std::vector<float> part_m(T * Q), part_l(T * Q);
  const float* Q1 = q1.data_ptr<float>();
  const float* Q2 = d2 ? q2.data_ptr<float>() : nullptr;
  const float *K1 = k1.data_ptr<float>(), *K2 = d2 ? k2.data_ptr<float>() : nullptr, *Vp = v.data_ptr<float>();
  const int32_t* tab = table.data_ptr<int32_t>();
  float* PO = part_o.data_ptr<float>();
  const float sc = (float)scale;
  at::parallel_for(0, T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(Q * CHUNK);
    for (int64_t i = i0; i < i1; ++i) {
      const Task tk = tasks[i];
      const int64_t len = tk.t1 - tk.t0;
      const float* q1b = Q1 + (tk.b * G + tk.g) * Q * d1;
      const float* q2b = d2 ? Q2 + (tk.b * G + tk.g) * Q * d2 : nullptr;
      auto row = [&](int64_t t) { return (int64_t)tab[tk.b * nb + t / bs] * bs + t % bs; };
      for (int64_t t = tk.t0; t < tk.t1; ++t) {
        const int64_t r = row(t);
        const float* kr1 = K1 + (r * G + tk.g) * d1;
        const float* kr2 = d2 ? K2 + (r * G + tk.g) * d2 : nullptr;
        for (int64_t q = 0; q < Q; ++q) {
          float x = dot(q1b + q * d1, kr1, d1);
          if (d2) x += dot(q2b + q * d2, kr2, d2);
          s[q * CHUNK + (t - tk.t0)] = x * sc;
        }
      }
      for (int64_t q = 0; q < Q; ++q) {
        float* sq = s.data() + q * CHUNK;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < len; ++j) m = std::max(m, sq[j]);
        float l = 0.f;
        for (int64_t j = 0; j < len; ++j) {
          sq[j] = std::exp(sq[j] - m);
          l += sq[j];
        }
        part_m[i * Q + q] = m;
        part_l[i * Q + q] = l;
      }
      float* o = PO + i * Q * dv;
      for (int64_t t = tk.t0; t < tk.t1; ++t) {
        const float* vr = Vp + (row(t) * G + tk.g) * dv;
        for (int64_t q = 0; q < Q; ++q) axpy(o + q * dv, s[q * CHUNK + (t - tk.t0)], vr, dv);
      }
    }
  });
  // merge the chunks of each (sequence, head): tasks of one (b, g) are consecutive
  auto out = torch::empty({B, G, Q, dv}, q1.options());
  float* O = out.data_ptr<float>();
  std::vector<int64_t> first(B * G + 1, T);
  for (int64_t i = T - 1; i >= 0; --i) first[tasks[i].b * G + tasks[i].g] = i;
  at::parallel_for(0, B * G, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      int64_t i0 = first[j], i1 = i0;
      while (i1 < T && tasks[i1].b * G + tasks[i1].g == j) ++i1;
      for (int64_t q = 0; q < Q; ++q) {
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t i = i0; i < i1; ++i) M = std::max(M, part_m[i * Q + q]);
        float L = 0.f;
        float* y = O + (j * Q + q) * dv;
        std::fill(y, y + dv, 0.f);
        for (int64_t i = i0; i < i1; ++i) {
          const float w = std::exp(part_m[i * Q + q] - M);
          L += w * part_l[i * Q + q];
          axpy(y, w, PO + (i * Q + q) * dv, dv);
        }
        const float inv = 1.f / L;
        for (int64_t c = 0; c < dv; ++c) y[c] *= inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged decode attention (GQA / MLA), keys read through block tables");
}
