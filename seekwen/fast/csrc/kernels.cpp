// seekwen's few-row CPU kernels, y[M, N] = x[M, K] . W[N, K]^T for M <= 16 (decode); see kernels.py for
// what each function computes and why it exists. Compiled at first use by kernels.py
// (torch.utils.cpp_extension.load, -O3 -mavx2 -mfma -mf16c -fopenmp).
//
// Two instruction sets, one build. The loop code (loops.h) is compiled twice from the same text, in
// namespace avx2 (__m256, 8 lanes) and in namespace avx512 (__m512, 16 lanes) under
// `#pragma GCC target("avx512f,...")`, so the module builds and loads on any AVX2 CPU; which one runs is
// chosen at run time (__builtin_cpu_supports), or forced with set_isa (SEEKWEN_KERNELS=avx2 in kernels.py).
// AVX-512 pays at 5-8 activation rows: with 32 vector registers all 8 rows x 3 weight rows (24
// accumulators) fit in one pass, and each FMA does 16 lanes, so batch-8 decode stops being FMA-bound.
// Clang has no `#pragma GCC target`, so there only the AVX2 code is built.
//
// Weight formats: each is a decoder in loops.h (fp32, bf16, fp16, int8 per-channel, GGUF Q8_0 and Q4_0,
// group-asymmetric int4) that hands the one loop V::L fp32 weights at a time, with a per-block state
// (the block's scale; for Q4_0 on AVX-512 a 16-entry lookup table of d * (code - 8)) loaded once per
// block of 32. Activations and accumulation are fp32 for every format.
//
// Loop structure: output rows are split across threads (at::parallel_for) in tiles of 12 rows; a tile is
// walked in blocks of R = 3-4 weight rows, each streamed once, sequentially, one vector at a time, FMA'd
// against up to MBMAX activation rows (4 for AVX2, 8 for AVX-512; L1/L2-resident), with one independent
// accumulator per (activation row, weight row) pair (they stay in registers, and enough FMA chains are in
// flight to hide the FMA latency). The next tile's weights are prefetched while a tile streams. More than
// MBMAX activation rows: the tile is run again for the next ones; its weights then come from L1/L2.
// K tails use masked loads (the block formats need K % 32 == 0).
//
// f32_gemm / gemm (many rows: prefill) are gemm.h's GEMM, compiled per instruction set like loops.h: outer
// products of x transposed into panels of 32 (16) rows against 12 (6) weight rows broadcast from W in place.
// bf16_mm (bf16 weights with bf16-rounded activations, AVX512-BF16 vdpbf16ps, llama.cpp's arithmetic for
// BF16) is separate too: bf16dot.h, compiled once in namespace b512 with avx512bf16 enabled for it alone,
// run only where the CPU has it (has_bf16_mm).
//
// qmm (Q8_0 / Q4_0 with int8 activations, llama.cpp's scheme) is separate: q8dot.h, compiled once per
// integer instruction set (namespaces i512, i256vnni, i256 with vec_int.h's traits; chosen at run time by
// qisa_now, or forced by set_qisa), against weights regrouped by qpack; its scalar twin is below.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <functional>
#include <limits>
#include <vector>

#include <pybind11/stl.h>

// A weight matrix [N, K] as the loops see it, instruction-set neutral: its format and its pointers
// (loops.h's with_decoder turns it into that namespace's decoder).
enum class Fmt { F32, BF16, F16, I8, Q8_0, Q4_0, I4G };
struct WRef {
  Fmt fmt;
  const void* w;                        // the weights (codes for the quantized formats)
  const uint16_t* d = nullptr;          // Q8_0 / Q4_0: fp16 block scales [N, K / 32]
  const float *sc = nullptr, *ze = nullptr;  // I4G: scale, zero [N, K / group]
  int64_t K = 0, group = 0;
};

// Q8_0 / Q4_0 with int8 activations (q8dot.h): activation rows quantized to blocks of 32 (q [M, K] int8,
// fp32 scales d and integer sums s [M, K / 32]), and weights repacked in groups of 16 rows (`qpack`).
struct QAct {
  const int8_t* q;
  const float* d;
  const int32_t* s;
  int64_t K;
};
struct QPacked {
  const uint8_t* p;  // [ceil(N / 16), K / 32, 544 (Q8_0) or 288 (Q4_0)] bytes, layout in q8dot.h
  int64_t N, K;
  bool q4;
};

namespace avx2 {
#include "vec_avx2.h"
#include "loops.h"
#include "gemm.h"
}  // namespace avx2

namespace i256 {  // AVX2: vpmaddubsw + vpmaddwd (the whole file is built with -mavx2)
#define SEEKWEN_IV_VNNI 0
#include "vec_int.h"
#include "q8dot.h"
#undef SEEKWEN_IV_VNNI
}  // namespace i256

#if defined(__GNUC__) && !defined(__clang__)
#define SEEKWEN_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#include "vec_avx512.h"
#include "loops.h"
#include "gemm.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avxvnni,avx2,fma,f16c")
namespace i256vnni {  // AVX-VNNI: 256-bit vpdpbusd
#define SEEKWEN_IV_VNNI 1
#include "vec_int.h"
#include "q8dot.h"
#undef SEEKWEN_IV_VNNI
}  // namespace i256vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace i512 {  // AVX512-VNNI
#define SEEKWEN_IV512 1
#include "vec_int.h"
#include "q8dot.h"
#undef SEEKWEN_IV512
}  // namespace i512
#pragma GCC pop_options

#if __GNUC__ >= 10
#define SEEKWEN_BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
namespace b512 {  // AVX512-BF16: bf16 weights with bf16 activations (vdpbf16ps)
#include "bf16dot.h"
}  // namespace b512
#pragma GCC pop_options
#endif
#endif

// ---- torch-facing functions: checks, output allocation, and the choice of instruction set ----------

#ifdef SEEKWEN_AVX512
static bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
static bool use_avx512 = cpu_has_avx512();
#else
static bool cpu_has_avx512() { return false; }
static bool use_avx512 = false;
#endif

// "avx512" or "avx2": the instruction set the kernels run with now.
std::string isa() { return use_avx512 ? "avx512" : "avx2"; }

// Force an instruction set ("avx2", or "avx512" where the CPU and compiler have it); returns isa().
std::string set_isa(std::string name) {
  TORCH_CHECK(name == "avx2" || name == "avx512", "set_isa: avx2 or avx512");
  TORCH_CHECK(name == "avx2" || cpu_has_avx512(), "set_isa: avx512 not available on this CPU / build");
  use_avx512 = name == "avx512";
  return isa();
}

#ifdef SEEKWEN_AVX512
#define SEEKWEN_DISPATCH(fn, ...) (use_avx512 ? avx512::fn(__VA_ARGS__) : avx2::fn(__VA_ARGS__))
#else
#define SEEKWEN_DISPATCH(fn, ...) avx2::fn(__VA_ARGS__)
#endif

static void check(const torch::Tensor& x, const torch::Tensor& w, int64_t k_per_row) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "kernels: 2-d contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.size(1) == w.size(1) * k_per_row, "kernels: fp32 x [M, K]");
}

static const float* opt_ptr(const c10::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// y[M, N] = x[M, K] . w[N, K]^T (+ bias): fp32 weights
torch::Tensor f32_mm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check(x, w, 1);
  TORCH_CHECK(w.scalar_type() == torch::kFloat, "f32_mm: fp32 weights");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  SEEKWEN_DISPATCH(f32_mm, x.data_ptr<float>(), w.data_ptr<float>(), M, K, N, opt_ptr(bias), y.data_ptr<float>());
  return y;
}

// y[M, N] = x[M, K] . w[N, K]^T (+ bias), fp32, any number of rows: gemm.h's prefill GEMM
torch::Tensor f32_gemm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check(x, w, 1);
  TORCH_CHECK(w.scalar_type() == torch::kFloat, "f32_gemm: fp32 weights");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->scalar_type() == torch::kFloat &&
              bias->is_contiguous() && bias->numel() == w.size(0)), "f32_gemm: bias fp32 [N]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M > 0 && N > 0 && K > 0)
    SEEKWEN_DISPATCH(f32_gemm, x.data_ptr<float>(), w.data_ptr<float>(), M, K, N, opt_ptr(bias), y.data_ptr<float>());
  else if (M > 0 && N > 0)
    y.copy_(bias.has_value() && bias->defined() ? bias->expand({M, N}) : torch::zeros({M, N}, x.options()));
  return y;
}

// y[h] = x[h] . w[h]^T for x [H, M, K], w [H, N, K] (per-head products, e.g. MLA's absorbed decode)
torch::Tensor f32_bmm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && x.is_contiguous() && w.is_contiguous(), "f32_bmm: 3-d contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "f32_bmm: fp32");
  TORCH_CHECK(x.size(0) == w.size(0) && x.size(2) == w.size(2), "f32_bmm: x [H, M, K], w [H, N, K]");
  const int64_t H = x.size(0), M = x.size(1), K = x.size(2), N = w.size(1);
  auto y = torch::empty({H, M, N}, x.options());
  SEEKWEN_DISPATCH(f32_bmm, x.data_ptr<float>(), w.data_ptr<float>(), H, M, K, N, y.data_ptr<float>());
  return y;
}

// y[M, N] = x[M, K] . (q[N, K] * s[N])^T (+ bias): int8 weights, fp32 activations and accumulation
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s, c10::optional<torch::Tensor> bias) {
  check(x, q, 1);
  TORCH_CHECK(q.scalar_type() == torch::kChar && s.scalar_type() == torch::kFloat && s.numel() == q.size(0),
              "int8_mm: int8 q [N, K], fp32 s [N]");
  const int64_t M = x.size(0), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  const WRef r{Fmt::I8, q.data_ptr<int8_t>(), nullptr, nullptr, nullptr, q.size(1)};
  SEEKWEN_DISPATCH(linear, r, x.data_ptr<float>(), M, N, s.data_ptr<float>(), opt_ptr(bias), y.data_ptr<float>());
  return y;
}

// The WRef of a weight tensor w [N, K'] and its block scales d: fp32, bf16 or fp16 w (no d); int8 codes
// [N, K] with fp16 d [N, K / 32] (Q8_0); uint8 [N, K / 2] packed 4-bit codes with fp16 d (Q4_0).
static WRef wref(const torch::Tensor& w, const c10::optional<torch::Tensor>& d) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "kernels: weights must be 2-d contiguous [N, K]");
  const bool scaled = d.has_value() && d->defined();
  const auto t = w.scalar_type();
  if (t == torch::kFloat || t == torch::kBFloat16 || t == torch::kHalf) {
    TORCH_CHECK(!scaled, "kernels: fp32 / bf16 / fp16 weights take no block scales");
    const Fmt f = t == torch::kFloat ? Fmt::F32 : t == torch::kBFloat16 ? Fmt::BF16 : Fmt::F16;
    return WRef{f, w.data_ptr(), nullptr, nullptr, nullptr, w.size(1)};
  }
  TORCH_CHECK(t == torch::kChar || t == torch::kByte, "kernels: weights fp32, bf16, fp16, int8 (Q8_0) or uint8 (Q4_0)");
  TORCH_CHECK(scaled, "kernels: Q8_0 / Q4_0 weights need their fp16 block scales");
  const int64_t K = t == torch::kChar ? w.size(1) : 2 * w.size(1);
  TORCH_CHECK(K % 32 == 0, "kernels: Q8_0 / Q4_0 need K % 32 == 0");
  TORCH_CHECK(d->scalar_type() == torch::kHalf && d->is_contiguous() && d->dim() == 2 && d->size(0) == w.size(0) &&
              d->size(1) == K / 32, "kernels: block scales must be contiguous fp16 [N, K / 32]");
  const Fmt f = t == torch::kChar ? Fmt::Q8_0 : Fmt::Q4_0;
  return WRef{f, w.data_ptr(), (const uint16_t*)d->data_ptr(), nullptr, nullptr, K};
}

// y[M, N] = x[M, K] . W^T (+ bias) for W in any of wref's formats
torch::Tensor mm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> d, c10::optional<torch::Tensor> bias) {
  const WRef r = wref(w, d);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat && x.size(1) == r.K,
              "mm: x must be contiguous fp32 [M, K]");
  TORCH_CHECK(!bias.has_value() || !bias->defined() ||
              (bias->scalar_type() == torch::kFloat && bias->numel() == w.size(0)), "mm: bias fp32 [N]");
  const int64_t M = x.size(0), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  SEEKWEN_DISPATCH(linear, r, x.data_ptr<float>(), M, N, nullptr, opt_ptr(bias), y.data_ptr<float>());
  return y;
}

// mm for many rows (prefill): gemm.h's GEMM, the weights widened to fp32 slice by slice
torch::Tensor gemm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> d, c10::optional<torch::Tensor> bias) {
  const WRef r = wref(w, d);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat && x.size(1) == r.K,
              "gemm: x must be contiguous fp32 [M, K]");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->scalar_type() == torch::kFloat &&
              bias->is_contiguous() && bias->numel() == w.size(0)), "gemm: bias fp32 [N]");
  const int64_t M = x.size(0), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M > 0 && N > 0 && r.K > 0)
    SEEKWEN_DISPATCH(gemm, r, x.data_ptr<float>(), M, N, opt_ptr(bias), y.data_ptr<float>());
  else if (M > 0 && N > 0)
    y.copy_(bias.has_value() && bias->defined() ? bias->expand({M, N}) : torch::zeros({M, N}, x.options()));
  return y;
}

// Routed SwiGLU experts of one MoE layer: xs [R, D] holds the rows routed to each expert, grouped
// (rows[g] rows for expert g, in order); w13[g] [2I, D] = gate and up stacked, w2[g] [D, I], in mm's
// formats (one for all w13, one for all w2; d13, d2: their block scales for Q8_0 / Q4_0, else empty). Returns ys [R, D],
// ys = w2 . (silu(gate) * up) per row, unweighted. Two grouped products (all experts at once) instead of
// two kernel calls and three small torch ops per expert.
torch::Tensor moe_experts(torch::Tensor xs, std::vector<torch::Tensor> w13, std::vector<torch::Tensor> w2,
                          std::vector<int64_t> rows, std::vector<torch::Tensor> d13, std::vector<torch::Tensor> d2) {
  const int64_t G = rows.size();
  TORCH_CHECK(G > 0 && (int64_t)w13.size() == G && (int64_t)w2.size() == G, "moe_experts: one w13, w2 per group");
  TORCH_CHECK(d13.size() == d2.size() && (d13.empty() || (int64_t)d13.size() == G), "moe_experts: scales per group");
  TORCH_CHECK(xs.dim() == 2 && xs.is_contiguous() && xs.scalar_type() == torch::kFloat, "moe_experts: fp32 xs");
  const int64_t D = xs.size(1), I = w13[0].size(0) / 2;
  std::vector<WRef> r13(G), r2(G);
  int64_t R = 0;
  for (int64_t g = 0; g < G; ++g) {
    r13[g] = wref(w13[g], d13.empty() ? c10::optional<torch::Tensor>() : d13[g]);
    r2[g] = wref(w2[g], d2.empty() ? c10::optional<torch::Tensor>() : d2[g]);
    TORCH_CHECK(r13[g].fmt == r13[0].fmt && r2[g].fmt == r2[0].fmt, "moe_experts: one format for all w13, one for all w2");
    TORCH_CHECK(w13[g].size(0) == 2 * I && r13[g].K == D && w2[g].size(0) == D && r2[g].K == I,
                "moe_experts: w13 [2I, D], w2 [D, I]");
    TORCH_CHECK(rows[g] > 0, "moe_experts: empty group");
    R += rows[g];
  }
  TORCH_CHECK(R == xs.size(0), "moe_experts: rows must add up to xs's rows");
  auto h = torch::empty({R, 2 * I}, xs.options());
  SEEKWEN_DISPATCH(grouped, r13.data(), xs.data_ptr<float>(), rows.data(), G, 2 * I, h.data_ptr<float>());
  auto act = torch::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I);  // [R, I], contiguous
  auto ys = torch::empty({R, D}, xs.options());
  SEEKWEN_DISPATCH(grouped, r2.data(), act.data_ptr<float>(), rows.data(), G, D, ys.data_ptr<float>());
  return ys;
}

// Absorbed-MLA decode, one query position per sequence: q_lat [B, Q, r] (the queries moved into latent
// space, Q = heads), q_pe [B, Q, dr], the cached latents kv [B, T, r] and rotated keys pe [B, T, dr] (views
// of the cache: rows contiguous, sequences strided), n[b] keys visible to sequence b (slots 0..n-1).
// Returns the latent outputs [B, Q, r] = softmax(scale * (q_lat . kv^T + q_pe . pe^T)) . kv. The scores
// are f32_mm tiles with the cached tokens as the "weight rows"; the values product streams the latents
// again with the probabilities broadcast (f32_mm_kn). Nothing is expanded per head, and no [B, Q, T]
// intermediate is materialised beyond one sequence's scores.
torch::Tensor mla_decode(torch::Tensor q_lat, torch::Tensor q_pe, torch::Tensor kv, torch::Tensor pe,
                         std::vector<int64_t> n, double scale) {
  TORCH_CHECK(q_lat.dim() == 3 && q_pe.dim() == 3 && kv.dim() == 3 && pe.dim() == 3, "mla_decode: 3-d tensors");
  TORCH_CHECK(q_lat.is_contiguous() && q_pe.is_contiguous(), "mla_decode: contiguous queries");
  for (const auto* t : {&q_lat, &q_pe, &kv, &pe})
    TORCH_CHECK(t->scalar_type() == torch::kFloat, "mla_decode: fp32");
  const int64_t B = q_lat.size(0), Q = q_lat.size(1), r = q_lat.size(2), dr = q_pe.size(2);
  TORCH_CHECK(kv.size(0) == B && pe.size(0) == B && kv.size(2) == r && pe.size(2) == dr && q_pe.size(1) == Q,
              "mla_decode: shapes");
  TORCH_CHECK(kv.stride(2) == 1 && kv.stride(1) == r && pe.stride(2) == 1 && pe.stride(1) == dr,
              "mla_decode: cache rows must be contiguous");
  TORCH_CHECK(r % 16 == 0 && (int64_t)n.size() == B, "mla_decode: r % 16 == 0, one key count per sequence");
  auto out = torch::empty({B, Q, r}, q_lat.options());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = n[b];
    TORCH_CHECK(T >= 1 && T <= kv.size(1), "mla_decode: key count out of range");
    const float* kvb = kv.data_ptr<float>() + b * kv.stride(0);
    const float* peb = pe.data_ptr<float>() + b * pe.stride(0);
    auto s = torch::empty({Q, T}, q_lat.options()), s_pe = torch::empty({Q, T}, q_lat.options());
    SEEKWEN_DISPATCH(f32_mm, q_lat.data_ptr<float>() + b * Q * r, kvb, Q, r, T, nullptr, s.data_ptr<float>());
    SEEKWEN_DISPATCH(f32_mm, q_pe.data_ptr<float>() + b * Q * dr, peb, Q, dr, T, nullptr, s_pe.data_ptr<float>());
    auto p = torch::softmax(s.add_(s_pe).mul_(scale), 1);  // [Q, T], contiguous
    SEEKWEN_DISPATCH(f32_mm_kn, p.data_ptr<float>(), kvb, Q, T, r, r, out.data_ptr<float>() + b * Q * r);
  }
  return out;
}

// y[M, N] = x[M, K] . W^T (+ bias): group-asymmetric int4 (linear.Int4Linear); AVX-512 for groups of a
// multiple of 16, else AVX2 (8)
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor p, torch::Tensor scale, torch::Tensor zero, int64_t group,
                      c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(group % 8 == 0 && group > 0, "int4_mm: group must be a multiple of 8");
  check(x, p, 2);
  const int64_t M = x.size(0), K = x.size(1), N = p.size(0);
  TORCH_CHECK(K % group == 0 && scale.numel() == N * (K / group) && zero.numel() == N * (K / group),
              "int4_mm: scale, zero [N, K / group]");
  auto y = torch::empty({M, N}, x.options());
  const WRef r{Fmt::I4G, p.data_ptr<uint8_t>(), nullptr, scale.data_ptr<float>(), zero.data_ptr<float>(), K, group};
#ifdef SEEKWEN_AVX512
  if (use_avx512 && group % 16 == 0) {
    avx512::linear(r, x.data_ptr<float>(), M, N, nullptr, opt_ptr(bias), y.data_ptr<float>());
    return y;
  }
#endif
  avx2::linear(r, x.data_ptr<float>(), M, N, nullptr, opt_ptr(bias), y.data_ptr<float>());
  return y;
}

// ---- bf16 weights with bf16 activations (bf16dot.h) --------------------------------------------------

#ifdef SEEKWEN_BF16
static bool cpu_has_avx512bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#else
static bool cpu_has_avx512bf16() { return false; }
#endif

// Whether bf16_mm runs here: a CPU with AVX512-BF16, a build with it, and isa() == "avx512".
bool has_bf16_mm() { return use_avx512 && cpu_has_avx512bf16(); }

static void check_bf16_x(const torch::Tensor& x) {
  TORCH_CHECK(has_bf16_mm(), "bf16_mm: needs AVX512-BF16 (and isa() avx512)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "bf16_mm: contiguous fp32 x [M, K]");
}

// x [M, K] fp32 -> bf16 [M, K] as bf16_mm rounds it (for tests): round to nearest even, NaN -> 0x7FC0
torch::Tensor round_bf16(torch::Tensor x) {
  check_bf16_x(x);
  auto out = torch::empty(x.sizes(), x.options().dtype(torch::kBFloat16));
#ifdef SEEKWEN_BF16
  b512::round_rows(x.data_ptr<float>(), x.size(0), x.size(1), (uint16_t*)out.data_ptr());
#endif
  return out;
}

// y[M, N] = bf16(x)[M, K] . w[N, K]^T (+ bias) in fp32, w bf16 [N, K] as stored: vdpbf16ps, any M
torch::Tensor bf16_mm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_bf16_x(x);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kBFloat16 && w.size(1) == x.size(1),
              "bf16_mm: contiguous bf16 w [N, K]");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->scalar_type() == torch::kFloat &&
              bias->numel() == w.size(0) && bias->is_contiguous()), "bf16_mm: bias fp32 [N]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (K == 0) return bias.has_value() && bias->defined() ? bias->expand({M, N}).contiguous() : y.zero_();
#ifdef SEEKWEN_BF16
  if (M > 0 && N > 0)
    b512::bf16_mm(x.data_ptr<float>(), (const uint16_t*)w.data_ptr(), M, K, N, opt_ptr(bias), y.data_ptr<float>());
#endif
  return y;
}

// ---- Q8_0 / Q4_0 with int8 activations (q8dot.h): repack, quantize, integer products ------------------

// Which integer code runs: chosen from the CPU and isa() ("auto"), or forced with set_qisa.
enum class QIsa { Auto, Scalar, Avx2, AvxVnni, Avx512Vnni };
static QIsa qisa_forced = QIsa::Auto;
#ifdef SEEKWEN_AVX512
static bool cpu_has_avx512vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }
static bool cpu_has_avxvnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avxvnni");
}
#else
static bool cpu_has_avx512vnni() { return false; }
static bool cpu_has_avxvnni() { return false; }
#endif
static QIsa qisa_now() {
  if (qisa_forced != QIsa::Auto) return qisa_forced;
  if (use_avx512 && cpu_has_avx512vnni()) return QIsa::Avx512Vnni;
  return cpu_has_avxvnni() ? QIsa::AvxVnni : QIsa::Avx2;
}
static const char* QISA_NAMES[] = {"auto", "scalar", "avx2", "avxvnni", "avx512vnni"};

// The integer code in use now: "avx512vnni", "avxvnni", "avx2" (maddubs) or "scalar".
std::string qisa() { return QISA_NAMES[(int)qisa_now()]; }

// Force one ("auto": follow the CPU and isa() again); returns qisa().
std::string set_qisa(std::string name) {
  int i = 0;
  while (i < 5 && name != QISA_NAMES[i]) ++i;
  TORCH_CHECK(i < 5, "set_qisa: auto, scalar, avx2, avxvnni or avx512vnni");
  const QIsa q = (QIsa)i;
  TORCH_CHECK(q != QIsa::AvxVnni || cpu_has_avxvnni(), "set_qisa: no AVX-VNNI on this CPU / build");
  TORCH_CHECK(q != QIsa::Avx512Vnni || cpu_has_avx512vnni(), "set_qisa: no AVX512-VNNI on this CPU / build");
  qisa_forced = q;
  return qisa();
}

static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

// The scalar code: the same integers and the same fp32 operations, in the same order, as q8dot.h.
static void quantize_block_scalar(const float* x, int8_t* q, float* d, int32_t* s) {
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float dd = amax / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
  int32_t sum = 0;
  for (int i = 0; i < 32; ++i) {
    const float v = x[i] * id, t = std::trunc(v);
    q[i] = (int8_t)(std::fabs(v - t) >= 0.5f ? t + (v < 0.f ? -1.f : 1.f) : t);
    sum += q[i];
  }
  *d = dd;
  *s = sum;
}

// The signed weight q (-128..127 for Q8_0, -8..7 for Q4_0) of packed row r, input channel k of a block at bp.
static inline int32_t packed_weight(const uint8_t* bp, bool q4, int r, int k) {
  if (!q4) return (int32_t)bp[64 * (k / 4) + 4 * r + k % 4] - 128;
  const int rem = k % 8;
  return (int32_t)((bp[64 * (k / 8) + 4 * r + rem % 4] >> (rem >= 4 ? 4 : 0)) & 15) - 8;
}

static void qmm_scalar(const QPacked& w, const QAct& a, int64_t M, const float* bias, float* y) {
  const int64_t nb = w.K / 32, groups = (w.N + 15) / 16, QB = w.q4 ? 288 : 544, CODES = w.q4 ? 256 : 512;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t m = 0; m < M; ++m)
        for (int r = 0; r < 16 && 16 * g + r < w.N; ++r) {
          float acc = 0.f;
          for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* bp = w.p + (g * nb + b) * QB;
            const int8_t* xb = a.q + m * a.K + 32 * b;
            int32_t dot = 0;
            for (int k = 0; k < 32; ++k) dot += packed_weight(bp, w.q4, r, k) * xb[k];
            uint16_t dw;
            std::memcpy(&dw, bp + CODES + 2 * r, 2);
            acc = std::fma((float)dot, f16_to_f32(dw) * a.d[m * nb + b], acc);
          }
          y[m * w.N + 16 * g + r] = bias ? acc + bias[16 * g + r] : acc;
        }
  });
}

// Q8_0 int8 codes [N, K] or Q4_0 GGUF-packed nibbles [N, K / 2], with fp16 d [N, K / 32] -> the packed
// layout of q8dot.h, uint8 [ceil(N / 16), K / 32, 544 or 288] (rows past N: zero weights, zero scales).
torch::Tensor qpack(torch::Tensor w, torch::Tensor d) {
  const WRef r = wref(w, d);
  TORCH_CHECK(r.fmt == Fmt::Q8_0 || r.fmt == Fmt::Q4_0, "qpack: Q8_0 (int8) or Q4_0 (uint8) codes");
  const bool q4 = r.fmt == Fmt::Q4_0;
  const int64_t N = w.size(0), K = r.K, nb = K / 32, groups = (N + 15) / 16, QB = q4 ? 288 : 544;
  auto out = torch::zeros({groups, nb, QB}, w.options().dtype(torch::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint8_t* src = (const uint8_t*)w.data_ptr();
  auto code = [&](int64_t n, int64_t k) -> int32_t {  // the unsigned code: q + 128 (Q8_0) or q + 8 (Q4_0)
    if (n >= N) return q4 ? 8 : 128;
    if (!q4) return (int32_t)(int8_t)src[n * K + k] + 128;
    const uint8_t byte = src[n * (K / 2) + 16 * (k / 32) + k % 16];
    return k % 32 < 16 ? byte & 15 : byte >> 4;
  };
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* bp = o + (g * nb + b) * QB;
        for (int rr = 0; rr < 16; ++rr) {
          const int64_t n = 16 * g + rr, k0 = 32 * b;
          for (int i = 0; i < 4; ++i)
            if (q4)
              for (int j = 0; j < 4; ++j)
                bp[64 * j + 4 * rr + i] = (uint8_t)(code(n, k0 + 8 * j + i) | code(n, k0 + 8 * j + 4 + i) << 4);
            else
              for (int j = 0; j < 8; ++j) bp[64 * j + 4 * rr + i] = (uint8_t)code(n, k0 + 4 * j + i);
          if (n < N) std::memcpy(bp + (q4 ? 256 : 512) + 2 * rr, r.d + n * nb + b, 2);
        }
      }
  });
  return out;
}

// x [M, K] fp32 -> (q int8 [M, K], d fp32 [M, K / 32], s int32 [M, K / 32]) with the code qisa() names
static void quantize_rows(const torch::Tensor& x, torch::Tensor& q, torch::Tensor& d, torch::Tensor& s) {
  const int64_t M = x.size(0), K = x.size(1);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  int32_t* sp = s.data_ptr<int32_t>();
  const QIsa isa_ = qisa_now();
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / K), [&](int64_t m0, int64_t m1) {
    switch (isa_) {
#ifdef SEEKWEN_AVX512
      case QIsa::Avx512Vnni: i512::quantize(xp, K, qp, dp, sp, m0, m1); break;
      case QIsa::AvxVnni: i256vnni::quantize(xp, K, qp, dp, sp, m0, m1); break;
#endif
      case QIsa::Scalar:
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t b = 0; b < K / 32; ++b)
            quantize_block_scalar(xp + m * K + 32 * b, qp + m * K + 32 * b, dp + m * (K / 32) + b, sp + m * (K / 32) + b);
        break;
      default: i256::quantize(xp, K, qp, dp, sp, m0, m1); break;
    }
  });
}

static void check_qx(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat && x.size(1) % 32 == 0,
              "quantize_act / qmm: x must be contiguous fp32 [M, K], K % 32 == 0");
}

// x [M, K] fp32 -> its int8 blocks (q, d, s), as qmm quantizes it
struct QRows {
  torch::Tensor q, d, s;
  explicit QRows(const torch::Tensor& x)
      : q(torch::empty({x.size(0), x.size(1)}, x.options().dtype(torch::kChar))),
        d(torch::empty({x.size(0), x.size(1) / 32}, x.options())),
        s(torch::empty({x.size(0), x.size(1) / 32}, x.options().dtype(torch::kInt))) {
    quantize_rows(x, q, d, s);
  }
  QAct act() const { return {q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<int32_t>(), q.size(1)}; }
};

// x [M, K] -> (q, d, s) as qmm quantizes it (for tests): ggml's quantize_row_q8_0 plus the block sums
std::vector<torch::Tensor> quantize_act(torch::Tensor x) {
  check_qx(x);
  const QRows xq(x);
  return {xq.q, xq.d, xq.s};
}

static void check_packed(const torch::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == torch::kByte &&
              (packed.size(2) == 544 || packed.size(2) == 288) && packed.size(0) == (N + 15) / 16 &&
              packed.size(1) * 32 == K, "qmm: packed must be qpack's [ceil(N / 16), K / 32, 544 | 288]");
}

// y[M, N] = x . W^T (+ bias) with x quantized to int8 blocks, W packed by qpack (N: W's rows)
torch::Tensor qmm(torch::Tensor x, torch::Tensor packed, int64_t N, c10::optional<torch::Tensor> bias) {
  check_qx(x);
  check_packed(packed, N, x.size(1));
  TORCH_CHECK(!bias.has_value() || !bias->defined() ||
              (bias->scalar_type() == torch::kFloat && bias->numel() == N && bias->is_contiguous()), "qmm: bias fp32 [N]");
  const int64_t M = x.size(0), K = x.size(1);
  const QRows xq(x);
  auto y = torch::empty({M, N}, x.options());
  const QPacked w{packed.data_ptr<uint8_t>(), N, K, packed.size(2) == 288};
  const QAct a = xq.act();
  float* yp = y.data_ptr<float>();
  const float* bp = opt_ptr(bias);
  switch (qisa_now()) {
#ifdef SEEKWEN_AVX512
    case QIsa::Avx512Vnni: i512::qmm(w, a, M, bp, yp); break;
    case QIsa::AvxVnni: i256vnni::qmm(w, a, M, bp, yp); break;
#endif
    case QIsa::Scalar: qmm_scalar(w, a, M, bp, yp); break;
    default: i256::qmm(w, a, M, bp, yp); break;
  }
  return y;
}

// grouped_qmm (q8dot.h) with the code qisa() names; the scalar code runs the experts one after another
static void grouped_qmm(const std::vector<QPacked>& ws, const QAct& a, const std::vector<int64_t>& rows, float* y) {
  const int64_t G = ws.size();
  switch (qisa_now()) {
#ifdef SEEKWEN_AVX512
    case QIsa::Avx512Vnni: i512::grouped_qmm(ws.data(), a, rows.data(), G, y); return;
    case QIsa::AvxVnni: i256vnni::grouped_qmm(ws.data(), a, rows.data(), G, y); return;
#endif
    case QIsa::Scalar: {
      const int64_t nb = a.K / 32;
      for (int64_t e = 0, r0 = 0; e < G; r0 += rows[e++]) {
        const QAct ae{a.q + r0 * a.K, a.d + r0 * nb, a.s + r0 * nb, a.K};
        qmm_scalar(ws[e], ae, rows[e], nullptr, y + r0 * ws[e].N);
      }
      return;
    }
    default: i256::grouped_qmm(ws.data(), a, rows.data(), G, y); return;
  }
}

// Grouped products y[R, N] with int8 activations: rows[g] consecutive rows of xs [R, K] against packed[g]
// (qpack'ed [N, K], one format), one thread team over all (group, row group) pairs; each group's rows equal
// qmm's for it, bit for bit. (MLA's absorbed W_UK / W_UV per head from a GGUF file's k_b / v_b blocks.)
torch::Tensor qmm_grouped(torch::Tensor xs, std::vector<torch::Tensor> packed, std::vector<int64_t> rows, int64_t N) {
  check_qx(xs);
  const int64_t G = rows.size(), R = xs.size(0), K = xs.size(1);
  TORCH_CHECK(G > 0 && (int64_t)packed.size() == G, "qmm_grouped: one packed weight per group");
  std::vector<QPacked> ws;
  int64_t total = 0;
  for (int64_t g = 0; g < G; ++g) {
    check_packed(packed[g], N, K);
    TORCH_CHECK(packed[g].size(2) == packed[0].size(2), "qmm_grouped: one format");
    TORCH_CHECK(rows[g] > 0, "qmm_grouped: empty group");
    ws.push_back({packed[g].data_ptr<uint8_t>(), N, K, packed[g].size(2) == 288});
    total += rows[g];
  }
  TORCH_CHECK(total == R, "qmm_grouped: rows must add up to xs's rows");
  auto y = torch::empty({R, N}, xs.options());
  grouped_qmm(ws, QRows(xs).act(), rows, y.data_ptr<float>());
  return y;
}

// One MoE layer's routed SwiGLU experts with Q8_0 / Q4_0 weights and int8 activations: xs [R, D], rows[e]
// consecutive rows of it for expert e, its fused gate/up p13[e] (qpack'ed [2I, D]) and down p2[e] ([D, I]).
// xs is quantized once, gate/up runs as one grouped product, silu(gate) * up is quantized once, down runs
// as a second grouped product -> [R, D]. Each expert's rows equal qmm's for it, bit for bit.
torch::Tensor qmm_experts(torch::Tensor xs, std::vector<torch::Tensor> p13, std::vector<torch::Tensor> p2,
                          std::vector<int64_t> rows, int64_t I) {
  const int64_t G = rows.size();
  check_qx(xs);
  const int64_t R = xs.size(0), D = xs.size(1);
  TORCH_CHECK(G > 0 && (int64_t)p13.size() == G && (int64_t)p2.size() == G, "qmm_experts: one p13, p2 per expert");
  TORCH_CHECK(I % 32 == 0, "qmm_experts: the experts' width must be a multiple of 32");
  std::vector<QPacked> w13, w2;
  int64_t total = 0;
  for (int64_t e = 0; e < G; ++e) {
    check_packed(p13[e], 2 * I, D);
    check_packed(p2[e], D, I);
    TORCH_CHECK(p13[e].size(2) == p13[0].size(2) && p2[e].size(2) == p2[0].size(2), "qmm_experts: one format");
    TORCH_CHECK(rows[e] > 0, "qmm_experts: empty expert");
    w13.push_back({p13[e].data_ptr<uint8_t>(), 2 * I, D, p13[e].size(2) == 288});
    w2.push_back({p2[e].data_ptr<uint8_t>(), D, I, p2[e].size(2) == 288});
    total += rows[e];
  }
  TORCH_CHECK(total == R, "qmm_experts: rows must add up to xs's rows");
  auto h = torch::empty({R, 2 * I}, xs.options());
  grouped_qmm(w13, QRows(xs).act(), rows, h.data_ptr<float>());
  auto act = torch::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I);  // [R, I], contiguous
  auto ys = torch::empty({R, D}, xs.options());
  grouped_qmm(w2, QRows(act).act(), rows, ys.data_ptr<float>());
  return ys;
}

#include "paged.h"  // paged_attention
#include "step.h"   // rms_norm, the compiled decode step (DecodeStep)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_step(m);
  m.def("f32_mm", torch::wrap_pybind_function(f32_mm), "y = x . w^T (+ bias), fp32 weights [N, K]");
  m.def("f32_gemm", torch::wrap_pybind_function(f32_gemm), "y = x . w^T (+ bias), fp32, many rows (prefill)");
  m.def("gemm", torch::wrap_pybind_function(gemm), "mm for many rows: fp32/bf16/fp16, Q8_0 or Q4_0 weights");
  m.def("mm", torch::wrap_pybind_function(mm), "y = x . W^T (+ bias): fp32/bf16/fp16, Q8_0 or Q4_0 weights");
  m.def("f32_bmm", torch::wrap_pybind_function(f32_bmm), "per-head y[h] = x[h] . w[h]^T");
  m.def("int8_mm", torch::wrap_pybind_function(int8_mm), "y = x . (q * s)^T (+ bias), int8 weights");
  m.def("int4_mm", torch::wrap_pybind_function(int4_mm), "y = x . W^T (+ bias), packed int4 weights");
  m.def("moe_experts", torch::wrap_pybind_function(moe_experts), "one MoE layer's routed SwiGLU experts");
  m.def("mla_decode", torch::wrap_pybind_function(mla_decode), "absorbed-MLA attention, one new token");
  m.def("isa", torch::wrap_pybind_function(isa), "the instruction set in use: avx512 or avx2");
  m.def("set_isa", torch::wrap_pybind_function(set_isa), "force avx2 or avx512; returns isa()");
  m.def("qpack", torch::wrap_pybind_function(qpack), "Q8_0 / Q4_0 blocks -> qmm's packed groups of 16 rows");
  m.def("qmm", torch::wrap_pybind_function(qmm), "y = x . W^T (+ bias), x as int8 blocks, W qpack'ed");
  m.def("qmm_grouped", torch::wrap_pybind_function(qmm_grouped), "grouped qmm: rows[g] rows against packed[g]");
  m.def("qmm_experts", torch::wrap_pybind_function(qmm_experts), "MoE routed experts, Q8_0 / Q4_0 with int8 activations");
  m.def("quantize_act", torch::wrap_pybind_function(quantize_act), "x -> int8 blocks (q, d, sums) as qmm's");
  m.def("qisa", torch::wrap_pybind_function(qisa), "qmm's integer code: avx512vnni, avxvnni, avx2, scalar");
  m.def("set_qisa", torch::wrap_pybind_function(set_qisa), "force qmm's integer code (or auto)");
  m.def("bf16_mm", torch::wrap_pybind_function(bf16_mm), "y = bf16(x) . W^T (+ bias), bf16 W, vdpbf16ps, fp32 out");
  m.def("round_bf16", torch::wrap_pybind_function(round_bf16), "x -> bf16 as bf16_mm rounds it (nearest even)");
  m.def("has_bf16_mm", torch::wrap_pybind_function(has_bf16_mm), "whether bf16_mm runs here (AVX512-BF16)");
}
