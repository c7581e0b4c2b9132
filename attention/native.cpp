// Native CPU kernels for one decoding step (fp32, no autograd); attention/native.py builds and
// loads this file and documents why it exists. Two kernels, each a plain loop nest that the
// compiler vectorises (GCC/Clang vector extensions, no intrinsics):
//
//   linear_small_rows   y = x Wᵀ + b for a few rows of x (a decoding step has one per sequence)
//   single_query_attention   softmax(q kᵀ · scale) v for one query per (row, head)
//   *_block              a pre-norm sublayer of a decoding step in one call (see below)
//
// Threads: at::parallel_for, i.e. PyTorch's own intra-op pool (torch.set_num_threads).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// 16 floats: one AVX-512 register, or two AVX2 ones (the compiler splits it).
typedef float vec16 __attribute__((vector_size(64)));

// Output columns per weight panel and rows of x per tile: a tile keeps 2 x MR = 16 vectors of
// partial sums in registers and reads one panel row (NR floats) per step of the inner product.
constexpr int64_t NR = 32;
constexpr int64_t MR = 8;

inline vec16 load16(const float* p) {
  vec16 v;
  __builtin_memcpy(&v, p, sizeof v);   // unaligned load
  return v;
}

// C[0:rows, 0:cols] = (RES +) X[0:rows, :] · panel (+ bias), one tile. X is (rows, K) with row
// stride K, the panel (K, NR) row-major, C and RES have row stride ldc. ROWS is a template
// argument so the accumulators live in registers.
template <int ROWS>
void tile(const float* x, int64_t K, const float* panel, const float* bias, const float* res,
          float* c, int64_t ldc, int64_t cols) {
  vec16 lo[ROWS], hi[ROWS];
  for (int m = 0; m < ROWS; ++m) lo[m] = hi[m] = vec16{};
  for (int64_t k = 0; k < K; ++k) {
    const vec16 w_lo = load16(panel + k * NR), w_hi = load16(panel + k * NR + 16);
    for (int m = 0; m < ROWS; ++m) {
      const float xs = x[m * K + k];
      lo[m] += xs * w_lo;
      hi[m] += xs * w_hi;
    }
  }
  float row[NR];
  for (int m = 0; m < ROWS; ++m) {
    __builtin_memcpy(row, &lo[m], sizeof lo[m]);
    __builtin_memcpy(row + 16, &hi[m], sizeof hi[m]);
    for (int64_t j = 0; j < cols; ++j) {
      float y = bias ? row[j] + bias[j] : row[j];
      c[m * ldc + j] = res ? res[m * ldc + j] + y : y;   // as x + linear(h) in Python
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, const float*, const float*,
                        float*, int64_t, int64_t);
constexpr TileFn kTiles[MR] = {tile<1>, tile<2>, tile<3>, tile<4>,
                               tile<5>, tile<6>, tile<7>, tile<8>};

void check_cpu_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name,
              " must be a CPU float32 tensor, got ", t.scalar_type(), " on ", t.device());
}

}  // namespace

// W (N, K) -> panels (ceil(N / NR), K, NR): panel t holds output columns t·NR .. t·NR+NR-1,
// one row per input feature, zero-padded past N. Made once per weight and decoding call.
torch::Tensor pack_weight(const torch::Tensor& weight) {
  check_cpu_f32(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-d (out, in), got ", weight.dim(), " dims");
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), T = (N + NR - 1) / NR;
  auto panels = torch::zeros({T, K, NR}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = panels.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t j = 0; j < std::min(NR, N - t * NR); ++j)
        for (int64_t k = 0; k < K; ++k) dst[(t * K + k) * NR + j] = src[(t * NR + j) * K + k];
  });
  return panels;
}

namespace {

// residual + x Wᵀ + b for x (M, K) contiguous, panels from pack_weight, bias (N) or None,
// residual (M, N) contiguous or None -> (M, N).
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& panels,
                          const c10::optional<torch::Tensor>& bias, int64_t N,
                          const torch::Tensor* residual) {
  check_cpu_f32(x, "x");
  check_cpu_f32(panels, "panels");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (rows, in) matrix");
  const int64_t M = x.size(0), K = x.size(1), T = panels.size(0);
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == K && panels.size(2) == NR
                  && T == (N + NR - 1) / NR,
              "panels ", panels.sizes(), " do not fit x ", x.sizes(), " and ", N, " outputs");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_cpu_f32(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                "bias must be contiguous (", N, ",), got ", bias->sizes());
    b = bias->data_ptr<float>();
  }
  const float* r = nullptr;
  if (residual != nullptr) {
    TORCH_CHECK(residual->sizes() == torch::IntArrayRef({M, N}) && residual->is_contiguous()
                    && residual->scalar_type() == torch::kFloat32,
                "residual must be a contiguous float32 (", M, ", ", N, "), got ",
                residual->sizes());
    r = residual->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t row_tiles = (M + MR - 1) / MR;
  // Work item i: panel i / row_tiles, row tile i % row_tiles, so one thread takes a panel's
  // row tiles one after the other and reads the panel from memory once.
  at::parallel_for(0, T * row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / row_tiles, m0 = (i % row_tiles) * MR;
      const int64_t n0 = t * NR, rows = std::min(MR, M - m0);
      kTiles[rows - 1](xp + m0 * K, K, pp + t * K * NR, b ? b + n0 : nullptr,
                       r ? r + m0 * N + n0 : nullptr, yp + m0 * N + n0, N,
                       std::min(NR, N - n0));
    }
  });
  return y;
}

}  // namespace

// x (M, K) contiguous, panels from pack_weight, bias (N) or None -> (M, N).
torch::Tensor linear_small_rows(const torch::Tensor& x, const torch::Tensor& panels,
                                const c10::optional<torch::Tensor>& bias, int64_t N) {
  return linear_impl(x, panels, bias, N, nullptr);
}

// q (B, H, 1, D), k (B, H, L, D), v (B, H, L, E), any strides but a unit one on the last dim
// -> (B, H, 1, E) contiguous. Per (row, head): scores over the L keys, their softmax, the
// weighted sum of values; K and V are each read once.
torch::Tensor single_query_attention(const torch::Tensor& q, const torch::Tensor& k,
                                     const torch::Tensor& v, double scale) {
  check_cpu_f32(q, "q");
  check_cpu_f32(k, "k");
  check_cpu_f32(v, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "q must be (B, H, 1, D) and k, v (B, H, L, D), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), L = k.size(2), E = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H
                  && k.size(3) == D && v.size(2) == L && L > 0,
              "shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "q, k and v need a unit stride on their last dim");
  auto out = torch::empty({B, H, 1, E}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(L);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* qq = qp + b * q.stride(0) + h * q.stride(1);
      const float* kk = kp + b * k.stride(0) + h * k.stride(1);
      const float* vv = vp + b * v.stride(0) + h * v.stride(1);
      float top = -INFINITY;
      for (int64_t l = 0; l < L; ++l) {
        const float* key = kk + l * k.stride(2);
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qq[d] * key[d];
        p[l] = dot * s;
        top = std::max(top, p[l]);
      }
      float total = 0.f;
      for (int64_t l = 0; l < L; ++l) total += (p[l] = std::exp(p[l] - top));
      float* o = op + bh * E;
      std::fill(o, o + E, 0.f);
      for (int64_t l = 0; l < L; ++l) {
        const float w = p[l];
        const float* value = vv + l * v.stride(2);
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) o[e] += w * value[e];
      }
      const float inv = 1.f / total;
      for (int64_t e = 0; e < E; ++e) o[e] *= inv;
    }
  });
  return out;
}

// ---- Pre-norm sublayers of one decoding step, each in one call -------------------------
// The same operations, in the same order, as core/decoding/step.py's Python path with the
// kernels above (so the same numbers): a layer's Python costs more than its small kernels.
// x is (B, d) contiguous, one row per sequence; each block returns x + sublayer(norm(x)).

namespace {

// core/model/norms.py with the same ATen ops: LayerNorm is F.layer_norm; RMSNorm (rms, no bias) is
// x * rsqrt(mean(x²) + eps) * weight.
torch::Tensor norm(const torch::Tensor& x, const torch::Tensor& weight,
                   const c10::optional<torch::Tensor>& bias, double eps, bool rms) {
  if (rms) return x * at::rsqrt(x.pow(2).mean(-1, true) + eps) * weight;
  return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
}

// (B, H·D) -> the (B, H, 1, D) view of its heads
torch::Tensor heads(const torch::Tensor& t, int64_t H) {
  return t.view({t.size(0), 1, H, t.size(1) / H}).transpose(1, 2);
}

}  // namespace

// Self-attention: the new token's keys and values are written at position pos of the cache
// buffers k_buf, v_buf (B, H, capacity, D), then the query attends to positions 0..pos.
torch::Tensor self_attention_block(const torch::Tensor& x, const torch::Tensor& norm_weight,
                                   const c10::optional<torch::Tensor>& norm_bias, double eps,
                                   bool rms, const torch::Tensor& qkv_panels,
                                   const c10::optional<torch::Tensor>& qkv_bias,
                                   const torch::Tensor& out_panels,
                                   const c10::optional<torch::Tensor>& out_bias,
                                   const torch::Tensor& k_buf, const torch::Tensor& v_buf,
                                   int64_t pos, double scale) {
  TORCH_CHECK(k_buf.dim() == 4 && k_buf.sizes() == v_buf.sizes() && pos >= 0
                  && pos < k_buf.size(2) && k_buf.size(0) == x.size(0),
              "cache buffers ", k_buf.sizes(), ", ", v_buf.sizes(), " do not fit position ", pos,
              " of ", x.size(0), " rows");
  const int64_t H = k_buf.size(1), HD = H * k_buf.size(3);
  const auto qkv = linear_impl(norm(x, norm_weight, norm_bias, eps, rms), qkv_panels, qkv_bias,
                               3 * HD, nullptr);
  k_buf.narrow(2, pos, 1).copy_(heads(qkv.narrow(1, HD, HD), H));
  v_buf.narrow(2, pos, 1).copy_(heads(qkv.narrow(1, 2 * HD, HD), H));
  const auto out = single_query_attention(heads(qkv.narrow(1, 0, HD), H),
                                          k_buf.narrow(2, 0, pos + 1),
                                          v_buf.narrow(2, 0, pos + 1), scale);
  return linear_impl(out.view({x.size(0), HD}), out_panels, out_bias, x.size(1), &x);
}

// Cross-attention over the static keys and values k, v (B, H, S, D) of the encoder output.
torch::Tensor cross_attention_block(const torch::Tensor& x, const torch::Tensor& norm_weight,
                                    const c10::optional<torch::Tensor>& norm_bias, double eps,
                                    bool rms, const torch::Tensor& q_panels,
                                    const c10::optional<torch::Tensor>& q_bias,
                                    const torch::Tensor& out_panels,
                                    const c10::optional<torch::Tensor>& out_bias,
                                    const torch::Tensor& k, const torch::Tensor& v,
                                    double scale) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "k and v must be (B, H, S, D)");
  const int64_t H = k.size(1);
  const auto q = linear_impl(norm(x, norm_weight, norm_bias, eps, rms), q_panels, q_bias,
                             H * k.size(3), nullptr);
  const auto out = single_query_attention(heads(q, H), k, v, scale);
  return linear_impl(out.view({x.size(0), H * v.size(3)}), out_panels, out_bias, x.size(1),
                     &x);
}

// Feed-forward: wo(act(wi(norm(x)))), act one of relu, gelu, gelu_tanh (as F.relu, F.gelu).
torch::Tensor ffn_block(const torch::Tensor& x, const torch::Tensor& norm_weight,
                        const c10::optional<torch::Tensor>& norm_bias, double eps, bool rms,
                        const torch::Tensor& in_panels, const c10::optional<torch::Tensor>& in_bias,
                        int64_t d_ff, const std::string& activation,
                        const torch::Tensor& out_panels,
                        const c10::optional<torch::Tensor>& out_bias) {
  auto a = linear_impl(norm(x, norm_weight, norm_bias, eps, rms), in_panels, in_bias, d_ff,
                       nullptr);
  if (activation == "relu") {
    a = at::relu(a);
  } else if (activation == "gelu" || activation == "gelu_tanh") {
    a = at::gelu(a, activation == "gelu" ? "none" : "tanh");
  } else {
    TORCH_CHECK(false, "unknown activation '", activation, "'; choose relu, gelu or gelu_tanh");
  }
  return linear_impl(a, out_panels, out_bias, x.size(1), &x);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "W (N, K) -> panels (ceil(N/32), K, 32)");
  m.def("linear_small_rows", &linear_small_rows, "x Wᵀ + b from packed panels");
  m.def("single_query_attention", &single_query_attention,
        "softmax(q kᵀ · scale) v for one query per (row, head)");
  m.def("self_attention_block", &self_attention_block, "x + self-attention(norm(x)), cached");
  m.def("cross_attention_block", &cross_attention_block, "x + cross-attention(norm(x))");
  m.def("ffn_block", &ffn_block, "x + feed-forward(norm(x))");
}
