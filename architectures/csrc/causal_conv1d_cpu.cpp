// Mamba's causal depthwise convolution followed by SiLU, fused, on CPU (mamba-ssm's causal-conv1d
// kernel plays this part on CUDA), channels-last:
//   c[b, t, e] = bias[e] + sum_k w[e, k] x[b, t - (K - 1) + k, e]   (zero before the start)
//   y = SiLU(c)
// The backward recomputes c (K multiply-adds) instead of keeping it, and writes dx, dw and dbias in
// one pass; in PyTorch the K shifted multiply-adds and their backward took a third of a Mamba
// training step at 4K tokens. x is (batch, L, C) with unit stride over C and any other strides (the
// Mamba mixer passes a slice of in_proj's output); w is (C, K) contiguous. Built with
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
#include <vector>

#include "fast_math.h"

namespace {

using namespace seq_arena;

constexpr int64_t kChannels = 64;  // channels per task
constexpr int64_t kMaxWidth = 8;   // the largest K (Mamba uses 4)

struct Conv {
  int64_t batch, L, C, K, x_b, x_t;
  const float *x, *w, *bias;  // bias may be null
};

// c at step t for channels [e0, e1) of batch row b; wt holds the taps (load_taps).
SCAN_INLINE void pre_activation(const Conv& p, int64_t b, int64_t t, int64_t e0, int64_t e1, const float* wt, float* c) {
  const int64_t n = e1 - e0;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) c[j] = p.bias ? p.bias[e0 + j] : 0.0f;
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t s = t - (p.K - 1) + k;
    if (s < 0) continue;
    const float* xs = p.x + b * p.x_b + s * p.x_t + e0;
    const float* wk = wt + k * kChannels;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) c[j] += wk[j] * xs[j];
  }
}

// w for channels [e0, e1), transposed to (K, kChannels) so that a tap reads contiguous lanes.
SCAN_INLINE void load_taps(const Conv& p, int64_t e0, int64_t e1, float* wt) {
  for (int64_t k = 0; k < p.K; ++k)
    for (int64_t j = 0; j < e1 - e0; ++j) wt[k * kChannels + j] = p.w[(e0 + j) * p.K + k];
}

SCAN_CLONES
void forward_task(const Conv& p, int64_t b, int64_t e0, int64_t e1, float* y) {
  float wt[kMaxWidth * kChannels], c[kChannels];
  load_taps(p, e0, e1, wt);
  const int64_t n = e1 - e0;
  for (int64_t t = 0; t < p.L; ++t) {
    pre_activation(p, b, t, e0, e1, wt, c);
    float* yt = y + (b * p.L + t) * p.C + e0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yt[j] = c[j] * sigmoid(c[j]);
  }
}

// dx (batch, L, C) of this task's rows and channels; dw (C, K) and dbias (C,) of batch row b.
SCAN_CLONES
void backward_task(const Conv& p, const float* grad_y, int64_t b, int64_t e0, int64_t e1, float* dx, float* dw,
                   float* dbias) {
  float wt[kMaxWidth * kChannels], c[kChannels], gc[kChannels], dwt[kMaxWidth * kChannels] = {}, db[kChannels] = {};
  load_taps(p, e0, e1, wt);
  const int64_t n = e1 - e0;
  for (int64_t t = 0; t < p.L; ++t) {
    float* dxt = dx + (b * p.L + t) * p.C + e0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dxt[j] = 0.0f;
  }
  for (int64_t t = 0; t < p.L; ++t) {
    pre_activation(p, b, t, e0, e1, wt, c);
    const float* gy = grad_y + (b * p.L + t) * p.C + e0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float s = sigmoid(c[j]);
      gc[j] = gy[j] * s * (1.0f + c[j] * (1.0f - s));  // SiLU'(c) = s (1 + c (1 - s))
      db[j] += gc[j];
    }
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t s = t - (p.K - 1) + k;
      if (s < 0) continue;
      const float* xs = p.x + b * p.x_b + s * p.x_t + e0;
      float* dxs = dx + (b * p.L + s) * p.C + e0;
      const float* wk = wt + k * kChannels;
      float* dwk = dwt + k * kChannels;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        dxs[j] += wk[j] * gc[j];
        dwk[j] += gc[j] * xs[j];
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    dbias[b * p.C + e0 + j] = db[j];
    for (int64_t k = 0; k < p.K; ++k) dw[(b * p.C + e0 + j) * p.K + k] = dwt[k * kChannels + j];
  }
}

Conv describe(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  x.dim() == 3 && x.stride(2) == 1,
              "causal_conv1d_cpu: x must be fp32 CPU (batch, L, C) with unit stride over C");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(2) && w.size(1) <= kMaxWidth && w.is_contiguous(),
              "causal_conv1d_cpu: w must be contiguous (C, K) with K <= 8");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == x.size(2) && bias->is_contiguous() &&
                                    bias->scalar_type() == at::kFloat),
              "causal_conv1d_cpu: bias must be contiguous fp32 (C,)");
  return {x.size(0), x.size(1), x.size(2), w.size(1), x.stride(0), x.stride(1), x.data_ptr<float>(),
          w.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr};
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
at::Tensor causal_conv1d_silu_forward(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias) {
  const Conv p = describe(x, w, bias);
  auto y = at::empty({p.batch, p.L, p.C}, x.options());
  float* py = y.data_ptr<float>();
  for_each_task(p, [&](int64_t b, int64_t e0, int64_t e1) { forward_task(p, b, e0, e1, py); });
  return y;
}

// Returns dx (batch, L, C) contiguous, dw (C, K) and dbias (C,).
std::vector<at::Tensor> causal_conv1d_silu_backward(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias,
                                                       at::Tensor grad_y) {
  const Conv p = describe(x, w, bias);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous(), "causal_conv1d_cpu: contiguous grad_y like x expected");
  auto dx = at::empty({p.batch, p.L, p.C}, x.options());
  auto dw = at::empty({p.batch, p.C, p.K}, x.options());  // per batch row, summed below
  auto dbias = at::empty({p.batch, p.C}, x.options());
  const float* pg = grad_y.data_ptr<float>();
  float *pdx = dx.data_ptr<float>(), *pdw = dw.data_ptr<float>(), *pdb = dbias.data_ptr<float>();
  for_each_task(p, [&](int64_t b, int64_t e0, int64_t e1) { backward_task(p, pg, b, e0, e1, pdx, pdw, pdb); });
  return {dx, dw.sum(0), dbias.sum(0)};
}

TORCH_LIBRARY_FRAGMENT(seq_arena_scan, m) {
  m.def("conv_silu_forward(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("conv_silu_backward(Tensor x, Tensor w, Tensor? bias, Tensor grad_y) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(seq_arena_scan, CPU, m) {
  m.impl("conv_silu_forward", &causal_conv1d_silu_forward);
  m.impl("conv_silu_backward", &causal_conv1d_silu_backward);
}
