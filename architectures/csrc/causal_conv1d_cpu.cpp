// Mamba's causal depthwise convolution followed by SiLU, fused, on CPU (mamba-ssm's causal-conv1d
// kernel plays this part on CUDA), channels-last:
//   c[b, t, e] = bias[e] + sum_k w[e, k] x[b, t - (K - 1) + k, e]   (zero before the start)
//   y = SiLU(c)
// The backward recomputes c (K multiply-adds) instead of keeping it, and writes dx, dw and dbias in
// one pass; in PyTorch the K shifted multiply-adds and their backward took a third of a Mamba
// training step at 4K tokens. x is (batch, L, C) with unit stride over C and any other strides (the
// Mamba mixer passes a slice of in_proj's output); w is (C, K) contiguous. With an optional step
// order (batch, L) int64, step t of row b is position order[b, t] (read and written there): the
// convolution runs along that order, as the bidirectional Mamba's reversed pass needs. Built with
// selective_scan_cpu.cpp into one extension (architectures/ssm_cpu.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "fast_math.h"
#include "step_order.h"

namespace {

using namespace seq_arena;

constexpr int64_t kChannels = 64;  // channels per task
constexpr int64_t kMaxWidth = 8;   // the largest K (Mamba uses 4)

struct Conv {
  int64_t batch, L, C, K, x_b, x_t;
  const float *x, *w, *bias;  // bias may be null
  const int64_t* order;        // (batch, L) positions of the steps, or null for t itself

  int64_t pos(int64_t b, int64_t t) const { return order ? order[b * L + t] : t; }
};

// w for channels [e0, e1), transposed to (K, kChannels) so that a tap reads contiguous lanes, and
// the bias (zeros without one).
SCAN_INLINE void load_weights(const Conv& p, int64_t e0, int64_t e1, float* wt, float* bias) {
  for (int64_t k = 0; k < p.K; ++k)
    for (int64_t j = 0; j < e1 - e0; ++j) wt[k * kChannels + j] = p.w[(e0 + j) * p.K + k];
  for (int64_t j = 0; j < e1 - e0; ++j) bias[j] = p.bias ? p.bias[e0 + j] : 0.0f;
}

const float kZeros[kChannels] = {};  // the inputs before the start

// The rows of x (channels e0 ..) that the K taps of step t read: tap k reads step t - (K - 1) + k,
// at its position; kZeros before the start.
SCAN_INLINE void tap_rows(const Conv& p, int64_t b, int64_t t, int64_t K, int64_t e0, const float** xk) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t s = t - (K - 1) + k;
    xk[k] = s < 0 ? kZeros : p.x + b * p.x_b + p.pos(b, s) * p.x_t + e0;
  }
}

// One pass over the steps; per step, one vector loop over the channels does the K taps and the
// SiLU with the pre-activation in a register. kK: the width K at compile time (4, Mamba's), or 0.
template <int64_t kK>
SCAN_CLONES void forward_task(const Conv& p, int64_t b, int64_t e0, int64_t e1, float* y) {
  const int64_t K = kK ? kK : p.K, n = e1 - e0;
  float wt[kMaxWidth * kChannels], bias[kChannels];
  const float* xk[kMaxWidth];
  load_weights(p, e0, e1, wt, bias);
  for (int64_t t = 0; t < p.L; ++t) {
    tap_rows(p, b, t, K, e0, xk);
    float* yt = y + (b * p.L + p.pos(b, t)) * p.C + e0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float c = bias[j];
      for (int64_t k = 0; k < K; ++k) c += wt[k * kChannels + j] * xk[k][j];
      yt[j] = c * sigmoid(c);
    }
  }
}

// dx (batch, L, C; element (b, t, c) at dx[b * dx_b + t * dx_t + c]) of this task's rows and
// channels, added into; dw (C, K) and dbias (C,) of batch row b. Step t adds its gradient into the
// dx rows of its K taps.
template <int64_t kK>
SCAN_CLONES void backward_task(const Conv& p, const float* grad_y, int64_t b, int64_t e0, int64_t e1, float* dx,
                               int64_t dx_b, int64_t dx_t, float* dw, float* dbias) {
  const int64_t K = kK ? kK : p.K, n = e1 - e0;
  float wt[kMaxWidth * kChannels], bias[kChannels], dwt[kMaxWidth * kChannels] = {}, db[kChannels] = {};
  float sink[kChannels];  // the gradient of the inputs before the start, dropped
  const float* xk[kMaxWidth];
  float* dxk[kMaxWidth];
  load_weights(p, e0, e1, wt, bias);
  for (int64_t t = 0; t < p.L; ++t) {
    tap_rows(p, b, t, K, e0, xk);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t s = t - (K - 1) + k;
      dxk[k] = s < 0 ? sink : dx + b * dx_b + p.pos(b, s) * dx_t + e0;
    }
    const float* gy = grad_y + (b * p.L + p.pos(b, t)) * p.C + e0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float c = bias[j];
      for (int64_t k = 0; k < K; ++k) c += wt[k * kChannels + j] * xk[k][j];
      const float sg = sigmoid(c);
      const float gc = gy[j] * sg * (1.0f + c * (1.0f - sg));  // SiLU'(c) = s (1 + c (1 - s))
      db[j] += gc;
      for (int64_t k = 0; k < K; ++k) {
        dxk[k][j] += wt[k * kChannels + j] * gc;
        dwt[k * kChannels + j] += gc * xk[k][j];
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    dbias[b * p.C + e0 + j] = db[j];
    for (int64_t k = 0; k < K; ++k) dw[(b * p.C + e0 + j) * p.K + k] = dwt[k * kChannels + j];
  }
}

Conv describe(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
              const std::optional<at::Tensor>& order) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  x.dim() == 3 && x.stride(2) == 1,
              "causal_conv1d_cpu: x must be fp32 CPU (batch, L, C) with unit stride over C");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(2) && w.size(1) <= kMaxWidth && w.is_contiguous(),
              "causal_conv1d_cpu: w must be contiguous (C, K) with K <= 8");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == x.size(2) && bias->is_contiguous() &&
                                    bias->scalar_type() == at::kFloat),
              "causal_conv1d_cpu: bias must be contiguous fp32 (C,)");
  return {x.size(0), x.size(1), x.size(2), w.size(1), x.stride(0), x.stride(1), x.data_ptr<float>(),
          w.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr,
          order.has_value() ? step_order(*order, x.size(0), x.size(1), "causal_conv1d_cpu") : nullptr};
}

template <typename Task>
void for_each_task(const Conv& p, const Task& task) {
  const int64_t blocks = (p.C + kChannels - 1) / kChannels;
  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks, e0 = (i % blocks) * kChannels;
      task(b, e0, std::min(e0 + kChannels, p.C));
    }
  });
}

}  // namespace

// Returns SiLU(conv(x)) (batch, L, C), contiguous.
at::Tensor causal_conv1d_silu_forward(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias,
                                      std::optional<at::Tensor> order) {
  const Conv p = describe(x, w, bias, order);
  auto y = at::empty({p.batch, p.L, p.C}, x.options());
  float* py = y.data_ptr<float>();
  for_each_task(p, [&](int64_t b, int64_t e0, int64_t e1) {
    if (p.K == 4) forward_task<4>(p, b, e0, e1, py);
    else forward_task<0>(p, b, e0, e1, py);
  });
  return y;
}

// Returns dx (batch, L, C) contiguous, dw (C, K) and dbias (C,). With dx_out, a (batch, L, C)
// tensor with unit stride over C (a slice of a wider one), dx is added into it and the returned
// dx is zero-size (an op's output may not alias its input): the bidirectional Mamba sums both
// passes' gradients in one tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_silu_backward(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias,
                                                       at::Tensor grad_y, std::optional<at::Tensor> order,
                                                       std::optional<at::Tensor> dx_out) {
  const Conv p = describe(x, w, bias, order);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous(), "causal_conv1d_cpu: contiguous grad_y like x expected");
  TORCH_CHECK(!dx_out.has_value() || (dx_out->sizes() == x.sizes() && dx_out->stride(2) == 1 &&
                                      dx_out->scalar_type() == at::kFloat),
              "causal_conv1d_cpu: dx_out like x with unit stride over C expected");
  auto dx = dx_out.has_value() ? *dx_out : at::zeros({p.batch, p.L, p.C}, x.options());
  const int64_t dx_b = dx.stride(0), dx_t = dx.stride(1);
  auto dw = at::empty({p.batch, p.C, p.K}, x.options());  // per batch row, summed below
  auto dbias = at::empty({p.batch, p.C}, x.options());
  const float* pg = grad_y.data_ptr<float>();
  float *pdx = dx.data_ptr<float>(), *pdw = dw.data_ptr<float>(), *pdb = dbias.data_ptr<float>();
  for_each_task(p, [&](int64_t b, int64_t e0, int64_t e1) {
    if (p.K == 4) backward_task<4>(p, pg, b, e0, e1, pdx, dx_b, dx_t, pdw, pdb);
    else backward_task<0>(p, pg, b, e0, e1, pdx, dx_b, dx_t, pdw, pdb);
  });
  return {dx_out.has_value() ? at::empty({0}, x.options()) : dx, dw.sum(0), dbias.sum(0)};
}

TORCH_LIBRARY_FRAGMENT(seq_arena_scan, m) {
  m.def("conv_silu_forward(Tensor x, Tensor w, Tensor? bias, Tensor? order=None) -> Tensor");
  m.def("conv_silu_backward(Tensor x, Tensor w, Tensor? bias, Tensor grad_y, Tensor? order=None, "
        "Tensor(a!)? dx_out=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seq_arena_scan, CPU, m) {
  m.impl("conv_silu_forward", &causal_conv1d_silu_forward);
  m.impl("conv_silu_backward", &causal_conv1d_silu_backward);
}
