// The compiled decode step (fast/compiled_step.py) and the small fused ops of the per-step host work
// (fast/step_ops.py). Included by kernels.cpp after every kernel it calls.
//
// A decode step of a small model run from Python is a few hundred tiny ATen calls, ~55 nn.Module calls
// and ~1,200 Python function calls: ~1.5 ms of host work on this CPU for the bundled 7.5M-parameter
// model, where its kernels take ~0.5 ms. `DecodeStep` is the whole step (embedding, every layer, final
// norm, LM head) for one new token per row, up to 64 rows, in one C++ call, over the Decoder's row cache
// (`run`: row b is block b of max_len slots) or the paged engine's block pools (`run_paged`):
// the same kernels the Python layers call (f32_mm / mm / bf16_mm / qmm, moe_experts / qmm_experts,
// f32_bmm / qmm_grouped, paged_attention), with the glue between them (norms, rotary, residuals, the
// router, SwiGLU, cache writes) as plain loops over a few hundred numbers.
//
// What it computes is what the Python fast path computes for the same call, layer for layer: Python
// (compiled_step.build) reads each layer's choices (weight format and kernel, fused projections, MLA's
// absorbed products, the router's rules) off the prepared modules and hands them over; it builds nothing
// the modules do not already hold. The tests hold it to the Python step (fp32 logits within 1e-5).

namespace step {

// out[i, :] = x[i, :] * rsqrt(mean(x[i, :]^2) + eps) * w, fp32, rows of n contiguous numbers.
inline void rms_rows(const float* x, const float* w, float* out, int64_t rows, int64_t n, float eps) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * n;
    float* oi = out + i * n;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < n; ++j) ss += xi[j] * xi[j];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) oi[j] = xi[j] * r * w[j];
  }
}

// Rotary embedding of one head vector x [d] at a position with tables c, s [d / 2] -> out [d] (may alias
// nothing). apply_rope's layout: rotate-half pairs (i, i + d/2); interleaved pairs (2i, 2i + 1) come out
// de-interleaved ([rotated evens, rotated odds]), as for every cached key.
inline void rope(const float* x, const float* c, const float* s, int64_t d, bool interleaved, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = interleaved ? x[2 * i] : x[i], b = interleaved ? x[2 * i + 1] : x[i + half];
    out[i] = a * c[i] - b * s[i];
    out[i + half] = b * c[i] + a * s[i];
  }
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// act[m, i] = silu(h[m, i]) * h[m, I + i] for h [M, 2I] (gate, up) -> act [M, I]
inline torch::Tensor swiglu(const torch::Tensor& h) {
  const int64_t M = h.size(0), I = h.size(1) / 2;
  auto act = torch::empty({M, I}, h.options());
  const float* H = h.data_ptr<float>();
  float* A = act.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < I; ++i) A[m * I + i] = silu(H[m * 2 * I + i]) * H[m * 2 * I + I + i];
  return act;
}

inline c10::optional<torch::Tensor> opt(const torch::Tensor& t) {
  return t.defined() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
}

inline torch::Tensor tensor_or(const c10::optional<torch::Tensor>& t) { return t.has_value() ? *t : torch::Tensor(); }

}  // namespace step

// RMSNorm of every row of x [..., n] -> a new contiguous tensor (a non-contiguous x is copied first).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat,
              "rms_norm: fp32 CPU tensors");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && x.dim() >= 1 && x.size(-1) == w.size(0),
              "rms_norm: weight [n] for x [..., n]");
  TORCH_CHECK(x.stride(-1) == 1, "rms_norm: x's last dimension must be contiguous");
  auto xc = x.is_contiguous() ? x : x.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t n = w.size(0);
  step::rms_rows(xc.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), xc.numel() / n, n,
                 static_cast<float>(eps));
  return out;
}

// One linear layer as a decode step runs it (up to 64 rows): the kernel the layer itself calls for a few
// rows, chosen in Python (compiled_step.linear_spec); fp32 from gemm_rows rows on the prefill GEMM, as
// FastLinear does. (Every few-row kernel takes any number of rows: past its register tile it runs the
// tile again, the weights then from L1/L2.)
struct StepLinear {
  enum Kind : int64_t { F32 = 0, MM = 1, BF16 = 2, QMM = 3, I8 = 4, I4 = 5 };
  int64_t kind;
  torch::Tensor a, b, c, bias;  // F32 / BF16: w; MM: w, d (block scales or none); QMM: packed; I8: q, scale;
                                // I4: packed, scales, zeros
  int64_t N, group, gemm_rows;

  StepLinear(int64_t kind, torch::Tensor a, c10::optional<torch::Tensor> b, c10::optional<torch::Tensor> c,
             c10::optional<torch::Tensor> bias, int64_t N, int64_t group, int64_t gemm_rows)
      : kind(kind), a(a), b(step::tensor_or(b)), c(step::tensor_or(c)), bias(step::tensor_or(bias)), N(N), group(group),
        gemm_rows(gemm_rows) {
    TORCH_CHECK(kind >= F32 && kind <= I4, "StepLinear: unknown kind ", kind);
  }

  // x [M, K] fp32 contiguous -> [M, N]
  torch::Tensor operator()(const torch::Tensor& x) const {
    const auto bo = step::opt(bias);
    switch (kind) {
      case F32: return x.size(0) < gemm_rows ? f32_mm(x, a, bo) : f32_gemm(x, a, bo);
      case MM: return mm(x, a, step::opt(b), bo);
      case BF16: return bf16_mm(x, a, bo);
      case QMM: return qmm(x, a, N, bo);
      case I8: return int8_mm(x, a, b, bo);
      default: return int4_mm(x, a, b, c, group, bo);
    }
  }
};

struct StepAttention {
  bool mla = false;
  torch::Tensor norm;  // the block's attention RMSNorm weight
  float norm_eps = 0.f;
  std::vector<StepLinear> lin;  // GQA: qkv, o; MLA: q_kva, o[, q_b]
  int64_t H = 0, Hkv = 0, hd = 0;                            // GQA
  torch::Tensor q_norm, k_norm;                               // GQA (Qwen3): per-head RMSNorm [hd], or none
  float qk_eps = 0.f;
  int64_t q_lora = 0, nope = 0, rdim = 0, r = 0, dv = 0;     // MLA
  torch::Tensor q_lora_norm, kv_norm, w_uk_t, w_uv_t;         // MLA: [q_lora], [r], [H, r, nope], [H, dv, r]
  float q_lora_eps = 0.f, kv_eps = 0.f;
  std::vector<torch::Tensor> uk_packed, uv_packed;           // MLA: per-head qpack'ed W_UK^T / W_UV^T (int8 acts)
  bool interleaved = false;
  double scale = 1.0;
  int64_t window = -1;      // a sliding window kept at full length (no ring), or -1
  int64_t group = 0;        // which of the call's block tables the layer's pools use (paged cache groups)
  torch::Tensor c1, c2;     // the pools [N, bs, ...]: GQA k, v [N, bs, Hkv, hd]; MLA latent [N, bs, r], key [N, bs, dr]
};

struct StepFFN {
  torch::Tensor norm;
  float norm_eps = 0.f;
  bool moe = false;
  std::vector<StepLinear> lin;  // dense: w13, w2; MoE shared experts (when any): w13, w2
  torch::Tensor gate, gate_bias, shared_gate;  // MoE: router [E, D] fp32, e_score_correction_bias [E], [1, D]
  bool sigmoid = false, noaux = false, grouped = false, norm_topk = false;
  int64_t top_k = 0, n_group = 1, topk_group = 1, inter = 0;
  double norm_eps_r = 0.0, scaling = 1.0;
  std::vector<torch::Tensor> e13, e2, d13, d2;  // moe_experts' operands per expert (d: block scales, or empty)
  std::vector<torch::Tensor> p13, p2;           // qmm_experts' packed blocks per expert (int8 activations)
};

class DecodeStep {
 public:
  // block_size: slots per block of the pools (the row cache: max_len, one block per row)
  DecodeStep(torch::Tensor embed, torch::Tensor norm, double eps, StepLinear head, torch::Tensor cos,
             torch::Tensor sin, int64_t block_size)
      : embed_(embed), norm_(norm), eps_((float)eps), head_(head), cos_(cos), sin_(sin), bs_(block_size) {
    TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous() && embed.scalar_type() == torch::kFloat, "DecodeStep: embed");
    TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.sizes() == cos.sizes(), "DecodeStep: rotary tables");
  }

  void add_gqa(torch::Tensor norm, double eps, StepLinear qkv, StepLinear o, int64_t H, int64_t Hkv, int64_t hd,
               c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, double qk_eps,
               bool interleaved, double scale, int64_t window, int64_t group, torch::Tensor k, torch::Tensor v) {
    TORCH_CHECK(H % Hkv == 0 && hd % 2 == 0 && 2 * cos_.size(1) == hd, "add_gqa: heads / rotary");
    check_cache(k, {bs_, Hkv, hd});
    check_cache(v, {bs_, Hkv, hd});
    StepAttention a;
    a.norm = norm, a.norm_eps = (float)eps, a.lin = {qkv, o}, a.H = H, a.Hkv = Hkv, a.hd = hd;
    a.q_norm = step::tensor_or(q_norm), a.k_norm = step::tensor_or(k_norm), a.qk_eps = (float)qk_eps;
    a.interleaved = interleaved, a.scale = scale, a.window = window, a.group = group, a.c1 = k, a.c2 = v;
    attn_.push_back(a);
  }

  void add_mla(torch::Tensor norm, double eps, StepLinear q_kva, StepLinear o, c10::optional<StepLinear> q_b,
               c10::optional<torch::Tensor> q_lora_norm, double q_lora_eps, torch::Tensor kv_norm, double kv_eps,
               int64_t H, int64_t q_lora, int64_t nope, int64_t rdim, int64_t r, int64_t dv, torch::Tensor w_uk_t,
               torch::Tensor w_uv_t, std::vector<torch::Tensor> uk_packed, std::vector<torch::Tensor> uv_packed,
               bool interleaved, double scale, int64_t window, int64_t group, torch::Tensor kv, torch::Tensor pe) {
    TORCH_CHECK(2 * cos_.size(1) == rdim && (q_lora == 0) == !q_b.has_value(), "add_mla: rotary / q_lora");
    TORCH_CHECK(uk_packed.empty() ? (w_uk_t.dim() == 3 && w_uv_t.dim() == 3) : (int64_t)uk_packed.size() == H &&
                (int64_t)uv_packed.size() == H, "add_mla: W_UK / W_UV per head");
    check_cache(kv, {bs_, r});
    check_cache(pe, {bs_, rdim});
    StepAttention a;
    a.mla = true, a.norm = norm, a.norm_eps = (float)eps, a.lin = {q_kva, o};
    if (q_b.has_value()) a.lin.push_back(*q_b);
    a.q_lora_norm = step::tensor_or(q_lora_norm), a.q_lora_eps = (float)q_lora_eps;
    a.kv_norm = kv_norm, a.kv_eps = (float)kv_eps, a.H = H, a.q_lora = q_lora, a.nope = nope, a.rdim = rdim;
    a.r = r, a.dv = dv, a.w_uk_t = w_uk_t, a.w_uv_t = w_uv_t, a.uk_packed = uk_packed, a.uv_packed = uv_packed;
    a.interleaved = interleaved, a.scale = scale, a.window = window, a.group = group, a.c1 = kv, a.c2 = pe;
    attn_.push_back(a);
  }

  void add_mlp(torch::Tensor norm, double eps, StepLinear w13, StepLinear w2) {
    StepFFN f;
    f.norm = norm, f.norm_eps = (float)eps, f.lin = {w13, w2};
    ffn_.push_back(f);
  }

  void add_moe(torch::Tensor norm, double eps, torch::Tensor gate, c10::optional<torch::Tensor> gate_bias,
               bool sigmoid, std::string method, int64_t n_group, int64_t topk_group, int64_t top_k, bool norm_topk,
               double norm_eps, double scaling, std::vector<torch::Tensor> e13, std::vector<torch::Tensor> e2,
               std::vector<torch::Tensor> d13, std::vector<torch::Tensor> d2, std::vector<torch::Tensor> p13,
               std::vector<torch::Tensor> p2, int64_t inter, c10::optional<StepLinear> s13,
               c10::optional<StepLinear> s2, c10::optional<torch::Tensor> shared_gate) {
    const int64_t E = gate.size(0);
    TORCH_CHECK(gate.dim() == 2 && gate.scalar_type() == torch::kFloat && gate.is_contiguous(), "add_moe: router");
    TORCH_CHECK(p13.empty() ? ((int64_t)e13.size() == E && (int64_t)e2.size() == E)
                            : ((int64_t)p13.size() == E && (int64_t)p2.size() == E), "add_moe: one entry per expert");
    TORCH_CHECK(top_k > 0 && top_k <= E && E % n_group == 0 && topk_group <= n_group, "add_moe: routing");
    TORCH_CHECK(s13.has_value() == s2.has_value(), "add_moe: shared experts");
    StepFFN f;
    f.moe = true, f.norm = norm, f.norm_eps = (float)eps, f.gate = gate, f.gate_bias = step::tensor_or(gate_bias);
    f.sigmoid = sigmoid, f.noaux = method == "noaux_tc";
    f.grouped = (method == "noaux_tc" || method == "group_limited_greedy") && n_group > 1;
    f.n_group = n_group, f.topk_group = topk_group, f.top_k = top_k, f.norm_topk = norm_topk && top_k > 1;
    f.norm_eps_r = norm_eps, f.scaling = scaling, f.e13 = e13, f.e2 = e2, f.d13 = d13, f.d2 = d2;
    f.p13 = p13, f.p2 = p2, f.inter = inter, f.shared_gate = step::tensor_or(shared_gate);
    if (s13.has_value()) f.lin = {*s13, *s2};
    ffn_.push_back(f);
  }

  // The row cache: tokens [n] int64, lens [n] int64 (tokens row b holds before this one) -> logits [n, vocab].
  // Row b is block b of max_len (= block_size) slots; the new token's entries go to slot lens[b] of row b.
  torch::Tensor run(torch::Tensor tokens, torch::Tensor lens) {
    TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == torch::kLong, "DecodeStep: int64 lens [n]");
    const int64_t n = lens.size(0);
    TORCH_CHECK(n > 0 && n <= attn_.at(0).c1.size(0), "DecodeStep: more rows than the cache holds");
    auto len = lens.contiguous();
    for (int64_t b = 0; b < n; ++b)
      if (len.data_ptr<int64_t>()[b] + 1 > bs_)
        throw pybind11::value_error("KV cache is full: position " + std::to_string(len.data_ptr<int64_t>()[b]) +
                                    " does not fit in " + std::to_string(bs_) + " slots");
    auto table = torch::arange(n, torch::dtype(torch::kInt)).view({n, 1});
    std::vector<torch::Tensor> tables(groups(), table);
    return forward(tokens, len, tables, torch::Tensor());
  }

  // The paged cache: tokens [n], positions [n] int64, tables[g] [n, nb] int32 (row b's blocks for cache
  // group g), keep [m] int64 (the rows whose logits are wanted) -> logits [m, vocab]. Rows with the same
  // table are one sequence's tokens (written before any is read, each attending up to its own position).
  torch::Tensor run_paged(torch::Tensor tokens, torch::Tensor positions, std::vector<torch::Tensor> tables,
                          torch::Tensor keep) {
    TORCH_CHECK((int64_t)tables.size() == groups(), "DecodeStep: one block table per cache group");
    TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == torch::kLong, "DecodeStep: int64 keep [m]");
    return forward(tokens, positions.contiguous(), tables, keep);
  }

 private:
  torch::Tensor embed_, norm_;
  float eps_;
  StepLinear head_;
  torch::Tensor cos_, sin_;  // [positions, d / 2] the model's rotary tables (attention factor included)
  int64_t bs_;
  std::vector<StepAttention> attn_;
  std::vector<StepFFN> ffn_;

  int64_t groups() const {
    int64_t g = 0;
    for (const auto& a : attn_) g = std::max(g, a.group + 1);
    return g;
  }

  torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& pos_t, const std::vector<torch::Tensor>& tables,
                        const torch::Tensor& keep) {
    TORCH_CHECK(attn_.size() == ffn_.size() && !attn_.empty(), "DecodeStep: every layer needs attention and an FFN");
    TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == torch::kLong && pos_t.dim() == 1 &&
                pos_t.scalar_type() == torch::kLong && pos_t.size(0) == tokens.size(0),
                "DecodeStep: int64 tokens [n], positions [n]");
    const int64_t n = tokens.size(0), D = embed_.size(1), V = embed_.size(0);
    TORCH_CHECK(n > 0 && n <= 64, "DecodeStep: 1..64 rows");
    for (const auto& t : tables)
      TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.scalar_type() == torch::kInt && t.is_contiguous(),
                  "DecodeStep: block tables int32 [n, nb]");
    auto tok = tokens.contiguous();
    std::vector<int64_t> pos(n), count(n);
    for (int64_t b = 0; b < n; ++b) {
      pos[b] = pos_t.data_ptr<int64_t>()[b], count[b] = pos[b] + 1;
      TORCH_CHECK(pos[b] >= 0 && pos[b] < cos_.size(0), "DecodeStep: position ", pos[b], " past the rotary tables");
      for (const auto& t : tables)
        TORCH_CHECK(count[b] <= t.size(1) * bs_, "DecodeStep: position ", pos[b], " past row ", b, "'s block table");
      const int64_t id = tok.data_ptr<int64_t>()[b];
      TORCH_CHECK(0 <= id && id < V, "DecodeStep: token id ", id, " out of range [0, ", V, ")");
    }
    auto h = torch::empty({n, D}, embed_.options());  // the residual stream
    float* hp = h.data_ptr<float>();
    for (int64_t b = 0; b < n; ++b)
      std::memcpy(hp + b * D, embed_.data_ptr<float>() + tok.data_ptr<int64_t>()[b] * D, D * sizeof(float));
    for (size_t i = 0; i < attn_.size(); ++i) {
      const StepAttention& a = attn_[i];
      const torch::Tensor& table = tables[a.group];
      add_into(h, a.mla ? mla(a, norm(h, a.norm, a.norm_eps), pos, count, table)
                        : gqa(a, norm(h, a.norm, a.norm_eps), pos, count, table));
      const StepFFN& f = ffn_[i];
      auto x = norm(h, f.norm, f.norm_eps);
      add_into(h, f.moe ? moe(f, x) : f.lin[1](step::swiglu(f.lin[0](x))));
    }
    if (keep.defined()) {
      if (keep.numel() == 0) return torch::empty({0, V}, embed_.options());
      h = h.index_select(0, keep.contiguous());
    }
    return head_(norm(h, norm_, eps_));
  }

  // The pool row of position p for a row whose block table is tab [nb]
  int64_t slot(const torch::Tensor& table, int64_t b, int64_t p) const {
    return (int64_t)table.data_ptr<int32_t>()[b * table.size(1) + p / bs_] * bs_ + p % bs_;
  }

  void check_cache(const torch::Tensor& t, std::vector<int64_t> tail) const {
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == torch::kFloat && t.dim() == (int64_t)tail.size() + 1,
                "DecodeStep: cache tensors fp32 contiguous [B, T, ...]");
    for (size_t j = 0; j < tail.size(); ++j) TORCH_CHECK(t.size(j + 1) == tail[j], "DecodeStep: cache shape");
  }

  static torch::Tensor norm(const torch::Tensor& x, const torch::Tensor& w, float eps) {
    auto out = torch::empty_like(x);
    step::rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1), eps);
    return out;
  }

  static void add_into(torch::Tensor& h, const torch::Tensor& y) {
    float* hp = h.data_ptr<float>();
    const float* yp = y.data_ptr<float>();
    const int64_t n = h.numel();
    for (int64_t i = 0; i < n; ++i) hp[i] += yp[i];
  }

  std::vector<int64_t> starts(const StepAttention& a, const std::vector<int64_t>& count) const {
    std::vector<int64_t> s(count.size(), 0);
    if (a.window > 0)
      for (size_t b = 0; b < count.size(); ++b) s[b] = std::max<int64_t>(0, count[b] - a.window);
    return s;
  }

  // GQA / MHA: fused qkv, optional per-head q/k norm, rotary, cache write, paged attention over the row.
  torch::Tensor gqa(const StepAttention& a, const torch::Tensor& x, const std::vector<int64_t>& pos,
                    const std::vector<int64_t>& count, const torch::Tensor& table) const {
    const int64_t n = x.size(0), H = a.H, Hkv = a.Hkv, hd = a.hd;
    auto qkv = a.lin[0](x);  // [n, (H + 2 Hkv) hd]
    auto q = torch::empty({n, H, hd}, x.options());
    std::vector<float> tmp(hd);
    const float *QKV = qkv.data_ptr<float>(), *qn = a.q_norm.defined() ? a.q_norm.data_ptr<float>() : nullptr;
    const float* kn = a.k_norm.defined() ? a.k_norm.data_ptr<float>() : nullptr;
    float *Kc = a.c1.data_ptr<float>(), *Vc = a.c2.data_ptr<float>();
    for (int64_t b = 0; b < n; ++b) {
      const float* row = QKV + b * (H + 2 * Hkv) * hd;
      const float *c = cos_.data_ptr<float>() + pos[b] * (hd / 2), *s = sin_.data_ptr<float>() + pos[b] * (hd / 2);
      auto rotate = [&](const float* src, const float* w, float* dst) {
        if (w) step::rms_rows(src, w, tmp.data(), 1, hd, a.qk_eps), src = tmp.data();
        step::rope(src, c, s, hd, a.interleaved, dst);
      };
      for (int64_t j = 0; j < H; ++j) rotate(row + j * hd, qn, q.data_ptr<float>() + (b * H + j) * hd);
      const int64_t at = slot(table, b, pos[b]) * Hkv * hd;
      for (int64_t g = 0; g < Hkv; ++g) rotate(row + (H + g) * hd, kn, Kc + at + g * hd);
      std::memcpy(Vc + at, row + (H + Hkv) * hd, Hkv * hd * sizeof(float));
    }
    auto none = torch::empty({0, 0, 0, 0}, x.options());
    auto out = paged_attention(q.view({n, Hkv, H / Hkv, hd}), none, a.c1, none, a.c2, table, starts(a, count),
                               count, a.scale);  // [n, Hkv, G, hd]
    return a.lin[1](out.view({n, H * hd}));
  }

  // MLA, absorbed: fused q / kv_a projection, latent norm, rotary, cache write, queries moved into latent
  // space per head, paged attention against the latents, outputs through W_UV, wo.
  torch::Tensor mla(const StepAttention& a, const torch::Tensor& x, const std::vector<int64_t>& pos,
                    const std::vector<int64_t>& count, const torch::Tensor& table) const {
    const int64_t n = x.size(0), H = a.H, nope = a.nope, dr = a.rdim, r = a.r, dv = a.dv;
    const int64_t qh = nope + dr, qdim = a.q_lora ? a.q_lora : H * qh, width = qdim + r + dr;
    auto qa = a.lin[0](x);  // [n, qdim + r + dr]
    const float* QA = qa.data_ptr<float>();
    torch::Tensor q;  // [n, H * qh]
    if (a.q_lora) {
      auto ql = torch::empty({n, a.q_lora}, x.options());
      for (int64_t b = 0; b < n; ++b)
        step::rms_rows(QA + b * width, a.q_lora_norm.data_ptr<float>(), ql.data_ptr<float>() + b * a.q_lora, 1,
                       a.q_lora, a.q_lora_eps);
      q = a.lin[2](ql);
    }
    const float* Q = a.q_lora ? q.data_ptr<float>() : QA;
    const int64_t qstride = a.q_lora ? H * qh : width;
    auto qn = torch::empty({H, n, nope}, x.options());  // q_nope heads first
    auto qpe = torch::empty({n, 1, H, dr}, x.options());
    float *KV = a.c1.data_ptr<float>(), *PE = a.c2.data_ptr<float>();
    for (int64_t b = 0; b < n; ++b) {
      const float *c = cos_.data_ptr<float>() + pos[b] * (dr / 2), *s = sin_.data_ptr<float>() + pos[b] * (dr / 2);
      const float* kv_a = QA + b * width + qdim;
      const int64_t at = slot(table, b, pos[b]);
      step::rms_rows(kv_a, a.kv_norm.data_ptr<float>(), KV + at * r, 1, r, a.kv_eps);
      step::rope(kv_a + r, c, s, dr, a.interleaved, PE + at * dr);
      for (int64_t j = 0; j < H; ++j) {
        const float* src = Q + b * qstride + j * qh;
        std::memcpy(qn.data_ptr<float>() + (j * n + b) * nope, src, nope * sizeof(float));
        step::rope(src + nope, c, s, dr, a.interleaved, qpe.data_ptr<float>() + (b * H + j) * dr);
      }
    }
    std::vector<int64_t> per_head(H, n);
    auto q_lat = a.uk_packed.empty() ? f32_bmm(qn, a.w_uk_t)  // [H, n, r]
                                     : qmm_grouped(qn.view({H * n, nope}), a.uk_packed, per_head, r).view({H, n, r});
    auto q1 = q_lat.transpose(0, 1).contiguous().view({n, 1, H, r});
    auto lat = a.c1.view({a.c1.size(0), bs_, 1, r}), pe = a.c2.view({a.c2.size(0), bs_, 1, dr});
    auto o_lat = paged_attention(q1, qpe, lat, pe, lat, table, starts(a, count), count, a.scale);  // [n, 1, H, r]
    auto o_h = o_lat.view({n, H, r}).transpose(0, 1).contiguous();  // [H, n, r]
    auto out = a.uv_packed.empty() ? f32_bmm(o_h, a.w_uv_t)  // [H, n, dv]
                                   : qmm_grouped(o_h.view({H * n, r}), a.uv_packed, per_head, dv).view({H, n, dv});
    return a.lin[1](out.transpose(0, 1).contiguous().view({n, H * dv}));
  }

  // The router (model/moe.py's Gate): scores, the choice (bias, groups), top-k, weights.
  void route(const StepFFN& f, const float* logits, int64_t E, std::vector<int64_t>& idx, std::vector<float>& w) const {
    std::vector<float> score(E), choice(E);
    if (f.sigmoid) {
      for (int64_t e = 0; e < E; ++e) score[e] = 1.f / (1.f + std::exp(-logits[e]));
    } else {
      const float m = *std::max_element(logits, logits + E);
      float z = 0.f;
      for (int64_t e = 0; e < E; ++e) z += (score[e] = std::exp(logits[e] - m));
      for (int64_t e = 0; e < E; ++e) score[e] /= z;
    }
    const float* bias = f.gate_bias.defined() ? f.gate_bias.data_ptr<float>() : nullptr;
    for (int64_t e = 0; e < E; ++e) choice[e] = bias ? score[e] + bias[e] : score[e];
    if (f.grouped) {  // keep the topk_group best groups (noaux_tc: by the sum of their top 2; else their max)
      const int64_t G = f.n_group, per = E / G;
      std::vector<float> gs(G);
      for (int64_t g = 0; g < G; ++g) {
        std::vector<float> v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
        std::sort(v.begin(), v.end(), std::greater<float>());
        gs[g] = f.noaux ? v[0] + (per > 1 ? v[1] : 0.f) : v[0];
      }
      std::vector<int64_t> order(G);
      for (int64_t g = 0; g < G; ++g) order[g] = g;
      std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return gs[i] > gs[j]; });
      std::vector<bool> keep(G, false);
      for (int64_t j = 0; j < f.topk_group; ++j) keep[order[j]] = true;
      const float fill = f.noaux ? -std::numeric_limits<float>::infinity() : 0.f;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per]) choice[e] = fill;
    }
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return choice[i] > choice[j]; });
    idx.assign(order.begin(), order.begin() + f.top_k);
    w.resize(f.top_k);
    float sum = 0.f;
    for (int64_t j = 0; j < f.top_k; ++j) sum += (w[j] = score[idx[j]]);
    for (int64_t j = 0; j < f.top_k; ++j) {
      if (f.norm_topk) w[j] = w[j] / (sum + (float)f.norm_eps_r);
      w[j] *= (float)f.scaling;
    }
  }

  // MoE: route every token, group the (token, expert) pairs by expert, run the chosen experts in one
  // moe_experts / qmm_experts call, sum each token's weighted outputs in ascending expert order; + shared.
  torch::Tensor moe(const StepFFN& f, const torch::Tensor& x) const {
    const int64_t n = x.size(0), D = x.size(1), E = f.gate.size(0);
    auto logits = f32_mm(x, f.gate, c10::nullopt);  // [n, E]
    struct Pair { int64_t e, t; float w; };
    std::vector<Pair> pairs;
    std::vector<int64_t> idx;
    std::vector<float> w;
    for (int64_t t = 0; t < n; ++t) {
      route(f, logits.data_ptr<float>() + t * E, E, idx, w);
      for (size_t j = 0; j < idx.size(); ++j) pairs.push_back({idx[j], t, w[j]});
    }
    std::stable_sort(pairs.begin(), pairs.end(), [](const Pair& p, const Pair& q) { return p.e < q.e; });
    const int64_t R = pairs.size();
    auto xs = torch::empty({R, D}, x.options());
    std::vector<int64_t> experts, rows;
    for (int64_t i = 0; i < R; ++i) {
      std::memcpy(xs.data_ptr<float>() + i * D, x.data_ptr<float>() + pairs[i].t * D, D * sizeof(float));
      if (experts.empty() || experts.back() != pairs[i].e) experts.push_back(pairs[i].e), rows.push_back(0);
      ++rows.back();
    }
    auto pick = [&](const std::vector<torch::Tensor>& all) {
      std::vector<torch::Tensor> out;
      if (!all.empty())
        for (int64_t e : experts) out.push_back(all[e]);
      return out;
    };
    auto ys = f.p13.empty() ? moe_experts(xs, pick(f.e13), pick(f.e2), rows, pick(f.d13), pick(f.d2))
                            : qmm_experts(xs, pick(f.p13), pick(f.p2), rows, f.inter);  // [R, D]
    auto y = torch::zeros({n, D}, x.options());
    float* Y = y.data_ptr<float>();
    const float* YS = ys.data_ptr<float>();
    for (int64_t t = 0; t < n; ++t)  // per token, its experts in ascending order (dispatch's summation order)
      for (int64_t i = 0; i < R; ++i)
        if (pairs[i].t == t)
          for (int64_t c = 0; c < D; ++c) Y[t * D + c] += pairs[i].w * YS[i * D + c];
    if (!f.lin.empty()) {  // shared experts, optionally gated (Qwen2-MoE: sigmoid(x . w_g))
      auto s = f.lin[1](step::swiglu(f.lin[0](x)));
      const float* S = s.data_ptr<float>();
      for (int64_t t = 0; t < n; ++t) {
        float g = 1.f;
        if (f.shared_gate.defined()) {
          float z = 0.f;
          for (int64_t c = 0; c < D; ++c) z += x.data_ptr<float>()[t * D + c] * f.shared_gate.data_ptr<float>()[c];
          g = 1.f / (1.f + std::exp(-z));
        }
        for (int64_t c = 0; c < D; ++c) Y[t * D + c] += g * S[t * D + c];
      }
    }
    return y;
  }
};

inline void bind_step(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension, fp32");
  m.def("paged_attention", &paged_attention, "paged attention (GQA / MLA), keys read through block tables");
  py::class_<StepLinear>(m, "StepLinear")
      .def(py::init<int64_t, torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                    c10::optional<torch::Tensor>, int64_t, int64_t, int64_t>())
      .def_readonly("kind", &StepLinear::kind)
      .def("__call__", &StepLinear::operator());
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<torch::Tensor, torch::Tensor, double, StepLinear, torch::Tensor, torch::Tensor, int64_t>())
      .def("add_gqa", &DecodeStep::add_gqa)
      .def("add_mla", &DecodeStep::add_mla)
      .def("add_mlp", &DecodeStep::add_mlp)
      .def("add_moe", &DecodeStep::add_moe)
      .def("run", &DecodeStep::run, "the row cache: tokens [n], lens [n] -> logits [n, vocab]")
      .def("run_paged", &DecodeStep::run_paged, "block pools: tokens, positions, tables per group, keep -> logits");
}
