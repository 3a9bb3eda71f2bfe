// Mamba's selective scan on CPU, fused: forward and backward touch only (batch, D, L)-sized tensors
// and B, C; the (N,)-sized state of one channel lives in a small local buffer, never in memory as a
// (batch, D, L, N) tensor. Built at first use by architectures/ssm_cpu.py (torch.utils.cpp_extension).
//
//   h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,   y_t = C_t . h_t                     (per channel d)
//
// Like mamba-ssm's CUDA kernel, the forward keeps the state entering every chunk of kChunk steps
// (batch, D, L / kChunk, N); the backward recomputes each chunk's states from it, then runs the
// adjoint recurrence backwards through the chunk:
//   lam_t = g_t C_t + exp(delta_{t+1} A) lam_{t+1}    (dL/dh_t, lam_{L-1} also gets dL/dh_last)
//   dL/dB_t += lam_t delta_t u_t,   dL/dC_t += g_t h_t,   dL/d(delta_t u_t) = lam_t . B_t
//   dL/d(delta_t A_n) = lam_t,n h_{t-1},n exp(delta_t A_n)
//
// Layouts (all fp32, contiguous): u, delta (batch, D, L); A (D, N); B, C (batch, G, L, N), time-major
// so that one step reads N contiguous floats; channel d uses group d / (D / G).
// Only ATen's per-operator headers and torch/library.h (no torch/extension.h, no pybind11): the
// build takes about a third of the time. The ops are registered as torch.ops.seq_arena_scan.*.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;  // steps per checkpoint: (kChunk + 1) * N floats stay in L1

// exp(x) for float (Cephes' expf polynomial, ~1 ulp on [-87, 88]); plain arithmetic, so the loops
// over the N state entries that call it vectorise (std::exp would be a scalar libm call).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;  // 2^fx
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// One (batch, channel) row forward: y (L), the chunk checkpoints (n_chunks, N) and the last state (N).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// Copies for AVX2 + FMA (x86-64-v3) and SSE4.1 (v2, which rounds in vector registers), picked at run time.
__attribute__((target_clones("arch=x86-64-v3", "arch=x86-64-v2", "default")))
#endif
void scan_row_forward(const float* u, const float* delta, const float* A, const float* B, const float* C,
                      int64_t L, int64_t N, float* y, float* checkpoints, float* h) {
  std::fill(h, h + N, 0.0f);
  for (int64_t t = 0; t < L; ++t) {
    if (t % kChunk == 0) std::copy(h, h + N, checkpoints + (t / kChunk) * N);
    const float dt = delta[t], du = dt * u[t];
    const float* Bt = B + t * N;
    const float* Ct = C + t * N;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      h[n] = fast_exp(dt * A[n]) * h[n] + du * Bt[n];
      acc += h[n] * Ct[n];
    }
    y[t] = acc;
  }
}

// One (batch, channel) row backward. Accumulates into dB, dC (L, N) and dA (N); writes du, ddelta (L).
// lam (N) holds dL/dh_last on entry; hbuf ((kChunk + 1) * N) and abuf (kChunk * N) are scratch.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "arch=x86-64-v2", "default")))
#endif
void scan_row_backward(const float* u, const float* delta, const float* A, const float* B, const float* C,
                       const float* grad_y, const float* checkpoints, int64_t L, int64_t N,
                       float* du_out, float* ddelta_out, float* dA, float* dB, float* dC,
                       float* lam, float* hbuf, float* abuf) {
  const int64_t n_chunks = (L + kChunk - 1) / kChunk;
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, T = std::min(kChunk, L - t0);
    std::copy(checkpoints + c * N, checkpoints + (c + 1) * N, hbuf);  // hbuf[k] = h_{t0 + k - 1}
    for (int64_t k = 0; k < T; ++k) {  // recompute the chunk's decays and states
      const float dt = delta[t0 + k], du = dt * u[t0 + k];
      const float* Bt = B + (t0 + k) * N;
      float* a = abuf + k * N;
      const float* hp = hbuf + k * N;
      float* hn = hbuf + (k + 1) * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        a[n] = fast_exp(dt * A[n]);
        hn[n] = a[n] * hp[n] + du * Bt[n];
      }
    }
    for (int64_t k = T - 1; k >= 0; --k) {  // the adjoint recurrence, backwards in time
      const int64_t t = t0 + k;
      const float dt = delta[t], ut = u[t], g = grad_y[t], du = dt * ut;
      const float* Bt = B + t * N;
      const float* Ct = C + t * N;
      float* dBt = dB + t * N;
      float* dCt = dC + t * N;
      const float* a = abuf + k * N;
      const float* hp = hbuf + k * N;
      const float* hn = hbuf + (k + 1) * N;
      float d_du = 0.0f, d_dtA = 0.0f;
#pragma omp simd reduction(+ : d_du, d_dtA)
      for (int64_t n = 0; n < N; ++n) {
        const float l = lam[n] + g * Ct[n];  // dL/dh_t
        dCt[n] += g * hn[n];
        dBt[n] += l * du;
        d_du += l * Bt[n];
        const float s = l * hp[n] * a[n];  // dL/d(delta_t A_n)
        d_dtA += s * A[n];
        dA[n] += s * dt;
        lam[n] = l * a[n];  // carried to h_{t-1}
      }
      du_out[t] = d_du * dt;
      ddelta_out[t] = d_du * ut + d_dtA;
    }
  }
}

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C) {
  for (const auto* t : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "selective_scan_cpu: inputs must be contiguous fp32 CPU tensors");
  }
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes() && A.dim() == 2 && A.size(0) == u.size(1),
              "selective_scan_cpu: u, delta (batch, D, L) and A (D, N) expected");
  TORCH_CHECK(B.dim() == 4 && B.sizes() == C.sizes() && B.size(0) == u.size(0) && B.size(2) == u.size(2) &&
                  B.size(3) == A.size(1) && u.size(1) % B.size(1) == 0,
              "selective_scan_cpu: B, C (batch, G, L, N) expected with G dividing D");
}

}  // namespace

// Returns y (batch, D, L), the last state (batch, D, N) and the chunk checkpoints (batch, D, n_chunks, N).
std::vector<at::Tensor> selective_scan_forward(at::Tensor u, at::Tensor delta, at::Tensor A,
                                                  at::Tensor B, at::Tensor C) {
  check_inputs(u, delta, A, B, C);
  const int64_t batch = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1), G = B.size(1);
  const int64_t n_chunks = (L + kChunk - 1) / kChunk, per_group = D / G;
  auto y = at::empty_like(u);
  auto last = at::empty({batch, D, N}, u.options());
  auto checkpoints = at::empty({batch, D, n_chunks, N}, u.options());
  const float *pu = u.data_ptr<float>(), *pd = delta.data_ptr<float>(), *pA = A.data_ptr<float>();
  const float *pB = B.data_ptr<float>(), *pC = C.data_ptr<float>();
  float *py = y.data_ptr<float>(), *plast = last.data_ptr<float>(), *pck = checkpoints.data_ptr<float>();
  at::parallel_for(0, batch * D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = b * D + d
      const int64_t b = row / D, d = row % D, bg = b * G + d / per_group;
      scan_row_forward(pu + row * L, pd + row * L, pA + d * N, pB + bg * L * N, pC + bg * L * N, L, N,
                       py + row * L, pck + row * n_chunks * N, plast + row * N);
    }
  });
  return {y, last, checkpoints};
}

// Returns du, ddelta (batch, D, L), dA (D, N), dB, dC (batch, G, L, N).
std::vector<at::Tensor> selective_scan_backward(at::Tensor grad_y, at::Tensor grad_last, at::Tensor u,
                                                   at::Tensor delta, at::Tensor A, at::Tensor B,
                                                   at::Tensor C, at::Tensor checkpoints) {
  check_inputs(u, delta, A, B, C);
  TORCH_CHECK(grad_y.sizes() == u.sizes() && grad_y.is_contiguous() && grad_last.is_contiguous(),
              "selective_scan_cpu: contiguous gradients expected");
  const int64_t batch = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1), G = B.size(1);
  const int64_t n_chunks = (L + kChunk - 1) / kChunk, per_group = D / G;
  // Channels of one group add into the same dB, dC rows, so one task owns a (batch, group, split)
  // and the splits of a group get their own dB, dC copies, summed at the end. Enough splits to
  // keep every thread busy when batch * G is small.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min(per_group, std::max<int64_t>(1, (2 * threads + batch * G - 1) / (batch * G)));
  auto du = at::empty_like(u);
  auto ddelta = at::empty_like(u);
  auto dA = at::zeros({batch, D, N}, u.options());
  auto dB = at::zeros({splits, batch, G, L, N}, u.options());
  auto dC = at::zeros({splits, batch, G, L, N}, u.options());
  const float *pu = u.data_ptr<float>(), *pd = delta.data_ptr<float>(), *pA = A.data_ptr<float>();
  const float *pB = B.data_ptr<float>(), *pC = C.data_ptr<float>(), *pg = grad_y.data_ptr<float>();
  const float *pgl = grad_last.data_ptr<float>(), *pck = checkpoints.data_ptr<float>();
  float *pdu = du.data_ptr<float>(), *pdd = ddelta.data_ptr<float>(), *pdA = dA.data_ptr<float>();
  float *pdB = dB.data_ptr<float>(), *pdC = dC.data_ptr<float>();
  at::parallel_for(0, splits * batch * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lam(N), hbuf((kChunk + 1) * N), abuf(kChunk * N);
    for (int64_t task = begin; task < end; ++task) {  // task = (s * batch + b) * G + g
      const int64_t g = task % G, b = (task / G) % batch, s = task / (G * batch), bg = b * G + g;
      const int64_t d0 = g * per_group + s * per_group / splits, d1 = g * per_group + (s + 1) * per_group / splits;
      for (int64_t d = d0; d < d1; ++d) {
        const int64_t row = b * D + d;
        std::copy(pgl + row * N, pgl + (row + 1) * N, lam.begin());
        scan_row_backward(pu + row * L, pd + row * L, pA + d * N, pB + bg * L * N, pC + bg * L * N, pg + row * L,
                          pck + row * n_chunks * N, L, N, pdu + row * L, pdd + row * L, pdA + row * N,
                          pdB + task * L * N, pdC + task * L * N, lam.data(), hbuf.data(), abuf.data());
      }
    }
  });
  return {du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0)};
}

// A CPU kernel under a declared schema (not a catch-all), so that Python can register the ops'
// output shapes for torch.compile (torch.library.register_fake in ssm_cpu.py).
TORCH_LIBRARY(seq_arena_scan, m) {
  m.def("forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C) -> Tensor[]");
  m.def("backward(Tensor grad_y, Tensor grad_last, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
        "Tensor checkpoints) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(seq_arena_scan, CPU, m) {
  m.impl("forward", &selective_scan_forward);
  m.impl("backward", &selective_scan_backward);
}
