// Native CPU kernels for one decoding step (fp32, no autograd); attention/native.py builds and
// loads this file and documents why it exists. Two kernels, each a plain loop nest that the
// compiler vectorises (GCC/Clang vector extensions, no intrinsics):
//
//   linear_small_rows   y = x Wᵀ + b for a few rows of x (a decoding step has one per sequence)
//   single_query_attention   softmax(q kᵀ · scale) v for one query per (row, head)
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

// C[0:rows, 0:cols] = X[0:rows, :] · panel (+ bias), one tile. X is (rows, K) with row stride
// K, the panel (K, NR) row-major, C has row stride ldc. ROWS is a template argument so the
// accumulators live in registers.
template <int ROWS>
void tile(const float* x, int64_t K, const float* panel, const float* bias, float* c,
          int64_t ldc, int64_t cols) {
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
    for (int64_t j = 0; j < cols; ++j) c[m * ldc + j] = row[j] + (bias ? bias[j] : 0.f);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t,
                        int64_t);
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

// x (M, K) contiguous, panels from pack_weight, bias (N) or None -> (M, N).
torch::Tensor linear_small_rows(const torch::Tensor& x, const torch::Tensor& panels,
                                const c10::optional<torch::Tensor>& bias, int64_t N) {
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
      kTiles[rows - 1](xp + m0 * K, K, pp + t * K * NR, b ? b + n0 : nullptr, yp + m0 * N + n0,
                       N, std::min(NR, N - n0));
    }
  });
  return y;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "W (N, K) -> panels (ceil(N/32), K, 32)");
  m.def("linear_small_rows", &linear_small_rows, "x Wᵀ + b from packed panels");
  m.def("single_query_attention", &single_query_attention,
        "softmax(q kᵀ · scale) v for one query per (row, head)");
}
