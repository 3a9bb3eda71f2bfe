// Mamba's selective scan on CPU, fused: forward and backward touch only (batch, L, D)-sized tensors
// and B, C; the (N,)-sized states live in a small local buffer, never in memory as a
// (batch, D, L, N) tensor. Built at first use by architectures/ssm_cpu.py (torch.utils.cpp_extension).
//
// The op is mamba-ssm's selective_scan_fn (delta bias and softplus, the D skip and the SiLU(z) gate
// included), per channel d:
//   dt_t = softplus(delta_t + bias_d)          (or delta_t + bias_d without softplus)
//   (with delta_proj W (D, R), delta_t = W dt_low_t from the rank-R input dt_low_t: Mamba's dt_proj)
//   h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,  y_t = C_t . h_t + D_d u_t,  out_t = y_t SiLU(z_t)
//
// Like mamba-ssm's CUDA kernel, the forward keeps the state entering every chunk of kChunk steps
// (batch, D, L / kChunk, N); the backward recomputes each chunk's states (and y, for the gate) from
// it, then runs the adjoint recurrence backwards through the chunk (g_t = dL/dy_t):
//   lam_t = g_t C_t + exp(dt_{t+1} A) lam_{t+1}    (dL/dh_t, lam_{L-1} also gets dL/dh_last)
//   dL/dB_t += lam_t dt_t u_t,   dL/dC_t += g_t h_t,   dL/d(dt_t u_t) = lam_t . B_t
//   dL/d(dt_t A_n) = lam_t,n h_{t-1},n exp(dt_t A_n)
//
// Vectorised over channels: a task owns a block of W adjacent channels of one batch row (W = 16
// where the channels of a group allow, else 1), and every per-step operation, the softplus and the
// gate included, runs on the W lanes at once; the state is (N, W). So u, delta, z are read and the
// outputs written channels-last: (batch, D, L) views of (batch, L, D) tensors (unit stride over D,
// any other strides), which is the layout the Mamba mixer has anyway. A is (D, N) contiguous; B, C
// are (batch, G, L, N) with unit stride over N and any other strides (channel d uses group
// d / (D / G); a stride of 0 broadcasts).
// Step order: with an optional order (batch, L) int64, step t of row b reads and writes position
// order[b, t] of every (batch, L)-indexed tensor; the bidirectional Mamba runs its reversed pass so
// (each sequence reversed within its real length) with no reversed copies of its activations.
// Only ATen's per-operator headers and torch/library.h (no torch/extension.h, no pybind11): the
// build takes about a third of the time. The ops are registered as torch.ops.seq_arena_scan.*.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "fast_math.h"
#include "step_order.h"

namespace {

using namespace seq_arena;

constexpr int64_t kChunk = 64;  // steps per checkpoint: (kChunk + 1) * N floats stay in L1
constexpr int64_t kLanes = 16;  // channels per task where the groups allow: two AVX2 vectors, one AVX-512

// The op's inputs. Element (b, d, t) of u is u[b * u_b + t * u_t + d]; likewise delta and z.
// With delta_proj, delta is dt_low instead, element (b, r, t) at delta[b * dl_b + t * dl_t + r].
struct Scan {
  int64_t batch, D, L, N, G, n_chunks, R;  // R: delta_proj's rank, 0 without it
  const float *u, *delta, *A, *B, *C, *Dskip, *z, *bias, *proj;  // Dskip, z, bias, proj may be null
  int64_t u_b, u_t, dl_b, dl_t, z_b, z_t;
  int64_t B_b, B_g, B_t, C_b, C_g, C_t;
  bool softplus;
  bool scalar_A;  // A[d, n] = A[d, 0] for every n (Mamba-2's SSD): one exp per channel and step
  const int64_t* order;  // (batch, L) positions of the steps, or null for t itself

  int64_t pos(int64_t b, int64_t t) const { return order ? order[b * L + t] : t; }

  int64_t group(int64_t d) const { return d / (D / G); }
  const float* B_row(int64_t b, int64_t d) const { return B + b * B_b + group(d) * B_g; }
  const float* C_row(int64_t b, int64_t d) const { return C + b * C_b + group(d) * C_g; }
};

// The per-lane inputs of step `step` (at position s.pos(b, step)) for channels d0 .. d0 + W: dt (after bias and softplus), its
// derivative dsp (1 without softplus), u and dt u. bias holds the W lanes' delta bias (or zeros);
// Pt the lanes' delta_proj rows, transposed to (R, W).
template <int64_t W>
SCAN_INLINE void load_step(const Scan& s, int64_t b, int64_t d0, int64_t step, const float* bias, const float* Pt,
                           float* dt, float* dsp, float* uu, float* du) {
  const int64_t t = s.pos(b, step);
  const float* u = s.u + b * s.u_b + t * s.u_t + d0;
  float x[W];
  if (s.proj) {  // delta = W dt_low, R multiply-adds per lane
    const float* low = s.delta + b * s.dl_b + t * s.dl_t;
    for (int64_t j = 0; j < W; ++j) x[j] = bias[j];
    for (int64_t r = 0; r < s.R; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) x[j] += low[r] * Pt[r * W + j];
    }
  } else {
    const float* delta = s.delta + b * s.dl_b + t * s.dl_t + d0;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) x[j] = delta[j] + bias[j];
  }
  if (s.softplus) {
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) softplus_and_grad(x[j], dt[j], dsp[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) dt[j] = x[j], dsp[j] = 1.0f;
  }
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) uu[j] = u[j], du[j] = dt[j] * u[j];
}

// The W lanes' delta bias and D skip (zeros where absent), and their delta_proj rows as Pt (R, W).
template <int64_t W>
SCAN_INLINE void load_lane_constants(const Scan& s, int64_t d0, float* bias, float* skip, float* Pt) {
  for (int64_t j = 0; j < W; ++j) {
    bias[j] = s.bias ? s.bias[d0 + j] : 0.0f;
    skip[j] = s.Dskip ? s.Dskip[d0 + j] : 0.0f;
    for (int64_t r = 0; r < s.R; ++r) Pt[r * W + j] = s.proj[(d0 + j) * s.R + r];
  }
}

// Forward of channels d0 .. d0 + W of batch row b: out (batch, L, D), the checkpoints (batch, D,
// n_chunks, N) and the last state (batch, D, N). Scratch: h and At, (N, W) each.
template <int64_t W, bool kScalarA>
SCAN_CLONES void forward_task(const Scan& s, int64_t b, int64_t d0, float* out, float* checkpoints, float* last,
                              float* h, float* At, float* Pt) {
  const int64_t N = s.N, D = s.D;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < W; ++j) At[n * W + j] = s.A[(d0 + j) * N + n], h[n * W + j] = 0.0f;
  const float *Bb = s.B_row(b, d0), *Cb = s.C_row(b, d0);  // the block lies in one group
  float bias[W], skip[W], dt[W], dsp[W], uu[W], du[W], acc[W];
  load_lane_constants<W>(s, d0, bias, skip, Pt);
  for (int64_t t = 0; t < s.L; ++t) {
    if (t % kChunk == 0)
      for (int64_t j = 0; j < W; ++j)
        for (int64_t n = 0; n < N; ++n) checkpoints[((b * D + d0 + j) * s.n_chunks + t / kChunk) * N + n] = h[n * W + j];
    load_step<W>(s, b, d0, t, bias, Pt, dt, dsp, uu, du);
    const int64_t p = s.pos(b, t);
    const float *Bt = Bb + p * s.B_t, *Ct = Cb + p * s.C_t;
    float decay[W];  // exp(dt A), the same for every n when A is scalar per channel
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) acc[j] = 0.0f, decay[j] = kScalarA ? fast_exp(dt[j] * At[j]) : 0.0f;
    for (int64_t n = 0; n < N; ++n) {
      float* hn = h + n * W;
      const float* An = At + n * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        hn[j] = (kScalarA ? decay[j] : fast_exp(dt[j] * An[j])) * hn[j] + du[j] * Bt[n];
        acc[j] += hn[j] * Ct[n];
      }
    }
    float* o = out + (b * s.L + p) * D + d0;
    if (s.z) {
      const float* z = s.z + b * s.z_b + p * s.z_t + d0;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) o[j] = (acc[j] + skip[j] * uu[j]) * z[j] * sigmoid(z[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) o[j] = acc[j] + skip[j] * uu[j];
    }
  }
  for (int64_t j = 0; j < W; ++j)
    for (int64_t n = 0; n < N; ++n) last[(b * D + d0 + j) * N + n] = h[n * W + j];
}

// The gradients a backward task writes: du, ddelta (batch, L, D), dz (added into; element (b, t, d)
// at dz[b * dz_b + t * dz_t + d]: it may be a slice of a wider tensor); the per-row sums dA
// (batch, D, N), dD and dbias (batch, D); dB, dC ((L, N) rows of this task's own copy). With
// delta_proj, ddelta is not written; dlow ((L, R) rows of the task's own copy) and dproj (batch,
// D, R) are.
struct Grads {
  float *du, *ddelta, *dz, *dA, *dD, *dbias, *dB, *dC, *dlow, *dproj;
  int64_t dz_b, dz_t;
};

// Scratch of a backward task: per chunk step and lane, dt, dsp, u, dt u, dL/dy (kChunk * W each);
// the states ((kChunk + 1) * N * W, h_{t0 + k - 1} in row k), decays (kChunk * N * W), the adjoint
// lam, At and dA ((N, W) each).
struct Scratch {
  std::vector<float> dt, dsp, uu, du, g, h, a, lam, At, dA, Pt, dPt;
  Scratch(int64_t N, int64_t R)
      : dt(kChunk * kLanes), dsp(kChunk * kLanes), uu(kChunk * kLanes), du(kChunk * kLanes), g(kChunk * kLanes),
        h((kChunk + 1) * N * kLanes), a(kChunk * N * kLanes), lam(N * kLanes), At(N * kLanes), dA(N * kLanes),
        Pt(R * kLanes), dPt(R * kLanes) {}
};

// Backward of channels d0 .. d0 + W of batch row b, chunk by chunk from the end.
template <int64_t W, bool kScalarA>
SCAN_CLONES void backward_task(const Scan& s, int64_t b, int64_t d0, const float* grad_out, int64_t go_b,
                               int64_t go_t, const float* grad_last, const float* checkpoints, Grads gr,
                               Scratch& sc) {
  const int64_t N = s.N, D = s.D, NW = N * W;
  float *At = sc.At.data(), *lam = sc.lam.data(), *dA = sc.dA.data();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < W; ++j) {
      At[n * W + j] = s.A[(d0 + j) * N + n];
      lam[n * W + j] = grad_last[(b * D + d0 + j) * N + n];
      dA[n * W + j] = 0.0f;
    }
  const float *Bb = s.B_row(b, d0), *Cb = s.C_row(b, d0);
  float bias[W], skip[W], dD[W] = {}, dbias[W] = {};
  float *Pt = sc.Pt.data(), *dPt = sc.dPt.data();  // delta_proj's rows (R, W) and their gradient
  load_lane_constants<W>(s, d0, bias, skip, Pt);
  std::fill(dPt, dPt + s.R * W, 0.0f);
  for (int64_t c = s.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, T = std::min(kChunk, s.L - t0);
    float *h = sc.h.data(), *a = sc.a.data();
    for (int64_t j = 0; j < W; ++j)
      for (int64_t n = 0; n < N; ++n) h[n * W + j] = checkpoints[((b * D + d0 + j) * s.n_chunks + c) * N + n];
    for (int64_t k = 0; k < T; ++k) {  // recompute the chunk's decays and states
      float *dt = sc.dt.data() + k * W, *du = sc.du.data() + k * W;
      load_step<W>(s, b, d0, t0 + k, bias, Pt, dt, sc.dsp.data() + k * W, sc.uu.data() + k * W, du);
      const float* Bt = Bb + s.pos(b, t0 + k) * s.B_t;
      float decay[W];
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) decay[j] = kScalarA ? fast_exp(dt[j] * At[j]) : 0.0f;
      for (int64_t n = 0; n < N; ++n) {
        float* ak = a + k * NW + n * W;
        const float *hp = h + k * NW + n * W, *An = At + n * W;
        float* hn = h + (k + 1) * NW + n * W;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) {
          ak[j] = kScalarA ? decay[j] : fast_exp(dt[j] * An[j]);
          hn[j] = ak[j] * hp[j] + du[j] * Bt[n];
        }
      }
    }
    for (int64_t k = 0; k < T; ++k) {  // dL/dy, and dL/dz through the gate from the recomputed y
      const int64_t p = s.pos(b, t0 + k);
      const float* go = grad_out + b * go_b + p * go_t + d0;
      float* g = sc.g.data() + k * W;
      if (!s.z) {
        for (int64_t j = 0; j < W; ++j) g[j] = go[j];
        continue;
      }
      const float* Ct = Cb + p * s.C_t;
      const float* z = s.z + b * s.z_b + p * s.z_t + d0;
      const float* uu = sc.uu.data() + k * W;
      float y[W];
      for (int64_t j = 0; j < W; ++j) y[j] = skip[j] * uu[j];
      for (int64_t n = 0; n < N; ++n) {
        const float* hn = h + (k + 1) * NW + n * W;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) y[j] += hn[j] * Ct[n];
      }
      float* dz = gr.dz + b * gr.dz_b + p * gr.dz_t + d0;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        const float sg = sigmoid(z[j]);
        g[j] = go[j] * z[j] * sg;                                     // dL/dy
        dz[j] += go[j] * y[j] * sg * (1.0f + z[j] * (1.0f - sg));  // SiLU'(z) = s (1 + z (1 - s))
      }
    }
    for (int64_t k = T - 1; k >= 0; --k) {  // the adjoint recurrence, backwards in time
      const int64_t t = s.pos(b, t0 + k);  // the step's position
      const float *dt = sc.dt.data() + k * W, *du = sc.du.data() + k * W, *g = sc.g.data() + k * W;
      const float *uu = sc.uu.data() + k * W, *dsp = sc.dsp.data() + k * W;
      const float *Bt = Bb + t * s.B_t, *Ct = Cb + t * s.C_t;
      float* dBt = gr.dB + t * N;
      float* dCt = gr.dC + t * N;
      float d_du[W] = {}, d_dtA[W] = {};
      for (int64_t n = 0; n < N; ++n) {
        float* ln = lam + n * W;
        const float *ak = a + k * NW + n * W, *hp = h + k * NW + n * W, *hn = h + (k + 1) * NW + n * W;
        const float *An = At + n * W;
        float* dAn = dA + n * W;
        float sum_dB = 0.0f, sum_dC = 0.0f;
#pragma omp simd reduction(+ : sum_dB, sum_dC)
        for (int64_t j = 0; j < W; ++j) {
          const float l = ln[j] + g[j] * Ct[n];  // dL/dh_t
          sum_dC += g[j] * hn[j];
          sum_dB += l * du[j];
          d_du[j] += l * Bt[n];
          const float sa = l * hp[j] * ak[j];  // dL/d(dt_t A_n)
          d_dtA[j] += sa * An[j];
          dAn[j] += sa * dt[j];
          ln[j] = l * ak[j];  // carried to h_{t-1}
        }
        dBt[n] += sum_dB;
        dCt[n] += sum_dC;
      }
      float* dur = gr.du + (b * s.L + t) * D + d0;
      float ddt[W];
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        ddt[j] = (d_du[j] * uu[j] + d_dtA[j]) * dsp[j];  // through softplus to delta + bias
        dur[j] = d_du[j] * dt[j] + g[j] * skip[j];
        dD[j] += g[j] * uu[j];
        dbias[j] += ddt[j];
      }
      if (s.proj) {  // delta = W dt_low: dL/ddt_low_r = sum_j ddt_j W_jr, dL/dW_jr = ddt_j dt_low_r
        const float* low = s.delta + b * s.dl_b + t * s.dl_t;
        float* dlow = gr.dlow + t * s.R;
        for (int64_t r = 0; r < s.R; ++r) {
          const float* Pr = Pt + r * W;
          float* dPr = dPt + r * W;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < W; ++j) {
            sum += ddt[j] * Pr[j];
            dPr[j] += ddt[j] * low[r];
          }
          dlow[r] += sum;
        }
      } else {
        float* ddr = gr.ddelta + (b * s.L + t) * D + d0;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) ddr[j] = ddt[j];
      }
    }
  }
  for (int64_t j = 0; j < W; ++j) {
    gr.dD[b * D + d0 + j] = dD[j];
    gr.dbias[b * D + d0 + j] = dbias[j];
    for (int64_t r = 0; r < s.R; ++r) gr.dproj[(b * D + d0 + j) * s.R + r] = dPt[r * W + j];
    for (int64_t n = 0; n < N; ++n) gr.dA[(b * D + d0 + j) * N + n] = dA[n * W + j];
  }
}

Scan describe(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const std::optional<at::Tensor>& Dskip, const std::optional<at::Tensor>& z,
              const std::optional<at::Tensor>& bias, bool softplus, const std::optional<at::Tensor>& proj,
              const std::optional<at::Tensor>& order) {
  for (const auto* t : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "selective_scan_cpu: fp32 CPU tensors expected");
  }
  const int64_t R = proj.has_value() ? proj->size(1) : 0;
  TORCH_CHECK(!proj.has_value() || (proj->dim() == 2 && proj->size(0) == u.size(1) && proj->is_contiguous() &&
                                    proj->scalar_type() == at::kFloat),
              "selective_scan_cpu: delta_proj must be contiguous fp32 (D, R)");
  TORCH_CHECK(u.dim() == 3 && u.stride(1) == 1 && delta.dim() == 3 && delta.stride(1) == 1 &&
                  delta.size(0) == u.size(0) && delta.size(1) == (proj.has_value() ? R : u.size(1)) &&
                  delta.size(2) == u.size(2) && A.dim() == 2 && A.size(0) == u.size(1) && A.is_contiguous(),
              "selective_scan_cpu: u, delta (batch, D, L) (delta (batch, R, L) with delta_proj) with unit stride "
              "over D and contiguous A (D, N) expected");
  TORCH_CHECK(B.dim() == 4 && B.sizes() == C.sizes() && B.size(0) == u.size(0) && B.size(2) == u.size(2) &&
                  B.size(3) == A.size(1) && u.size(1) % B.size(1) == 0 && B.stride(3) == 1 && C.stride(3) == 1,
              "selective_scan_cpu: B, C (batch, G, L, N) with unit stride over N expected, G dividing D");
  Scan s{};
  s.batch = u.size(0), s.D = u.size(1), s.L = u.size(2), s.N = A.size(1), s.G = B.size(1), s.R = R;
  s.proj = proj.has_value() ? proj->data_ptr<float>() : nullptr;
  s.n_chunks = (s.L + kChunk - 1) / kChunk;
  s.u = u.data_ptr<float>(), s.delta = delta.data_ptr<float>(), s.A = A.data_ptr<float>();
  s.B = B.data_ptr<float>(), s.C = C.data_ptr<float>();
  s.u_b = u.stride(0), s.u_t = u.stride(2), s.dl_b = delta.stride(0), s.dl_t = delta.stride(2);
  s.B_b = B.stride(0), s.B_g = B.stride(1), s.B_t = B.stride(2);
  s.C_b = C.stride(0), s.C_g = C.stride(1), s.C_t = C.stride(2);
  for (const auto* t : {&Dskip, &bias}) {
    TORCH_CHECK(!t->has_value() || ((*t)->dim() == 1 && (*t)->size(0) == s.D && (*t)->is_contiguous() &&
                                    (*t)->scalar_type() == at::kFloat),
                "selective_scan_cpu: D and delta_bias must be contiguous fp32 (D,)");
  }
  s.Dskip = Dskip.has_value() ? Dskip->data_ptr<float>() : nullptr;
  s.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (z.has_value()) {
    TORCH_CHECK(z->sizes() == u.sizes() && z->scalar_type() == at::kFloat && z->stride(1) == 1,
                "selective_scan_cpu: z like u (unit stride over D) expected");
    s.z = z->data_ptr<float>(), s.z_b = z->stride(0), s.z_t = z->stride(2);
  }
  s.softplus = softplus;
  s.order = order.has_value() ? step_order(*order, s.batch, s.L, "selective_scan_cpu") : nullptr;
  s.scalar_A = true;
  for (int64_t d = 0; d < s.D && s.scalar_A; ++d)
    for (int64_t n = 1; n < s.N; ++n) s.scalar_A = s.scalar_A && s.A[d * s.N + n] == s.A[d * s.N];
  return s;
}

// Channels per task: kLanes where the blocks tile the groups, else 1.
int64_t lanes(const Scan& s) { return (s.D / s.G) % kLanes == 0 ? kLanes : 1; }

// A (batch, L, D) tensor, returned as its (batch, D, L) view.
at::Tensor channels_last(const at::Tensor& u) {
  return at::empty({u.size(0), u.size(2), u.size(1)}, u.options()).transpose(1, 2);
}

}  // namespace

// Returns out (batch, D, L; a view of a (batch, L, D) tensor), the last state (batch, D, N) and
// the chunk checkpoints (batch, D, n_chunks, N).
std::vector<at::Tensor> selective_scan_forward(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B,
                                                  at::Tensor C, std::optional<at::Tensor> Dskip,
                                                  std::optional<at::Tensor> z, std::optional<at::Tensor> bias,
                                                  bool softplus, std::optional<at::Tensor> delta_proj,
                                                  std::optional<at::Tensor> order) {
  const Scan s = describe(u, delta, A, B, C, Dskip, z, bias, softplus, delta_proj, order);
  const int64_t W = lanes(s), n_blocks = s.D / W;
  auto out = channels_last(u);
  auto last = at::empty({s.batch, s.D, s.N}, u.options());
  auto checkpoints = at::empty({s.batch, s.D, s.n_chunks, s.N}, u.options());
  float *pout = out.data_ptr<float>(), *pck = checkpoints.data_ptr<float>(), *plast = last.data_ptr<float>();
  at::parallel_for(0, s.batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(s.N * kLanes), At(s.N * kLanes), Pt(s.R * kLanes);
    for (int64_t task = begin; task < end; ++task) {  // task = b * n_blocks + block
      const int64_t b = task / n_blocks, d0 = (task % n_blocks) * W;
      if (W == 1) forward_task<1, false>(s, b, d0, pout, pck, plast, h.data(), At.data(), Pt.data());
      else if (s.scalar_A) forward_task<kLanes, true>(s, b, d0, pout, pck, plast, h.data(), At.data(), Pt.data());
      else forward_task<kLanes, false>(s, b, d0, pout, pck, plast, h.data(), At.data(), Pt.data());
    }
  });
  return {out, last, checkpoints};
}

// The backward's nine gradients as a tuple, not a list: torch.compile functionalizes an op that
// writes into an argument (dz_out) only when each of its outputs is a single tensor.
using ScanGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor>;

// Returns du, ddelta, dz (batch, D, L; views of (batch, L, D) tensors; dz empty without z, and
// zero-size when dz_out is given: a (batch, D, L) view with unit stride over D that dz is added
// into, as the bidirectional Mamba sums both passes' gradients; an op's output may not alias its
// input), dA
// (D, N), dB, dC (batch, G, L, N), dD and ddelta_bias (D,), and d delta_proj (D, R) (zero-size
// without it). With delta_proj, ddelta is the gradient of dt_low, (batch, R, L).
ScanGrads selective_scan_backward(at::Tensor grad_out, at::Tensor grad_last, at::Tensor u,
                                                   at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C,
                                                   std::optional<at::Tensor> Dskip, std::optional<at::Tensor> z,
                                                   std::optional<at::Tensor> bias, bool softplus,
                                                   at::Tensor checkpoints, std::optional<at::Tensor> delta_proj,
                                                   std::optional<at::Tensor> order, std::optional<at::Tensor> dz_out) {
  const Scan s = describe(u, delta, A, B, C, Dskip, z, bias, softplus, delta_proj, order);
  TORCH_CHECK(grad_out.sizes() == u.sizes() && grad_out.stride(1) == 1 && grad_last.is_contiguous() &&
                  checkpoints.is_contiguous(),
              "selective_scan_cpu: gradient of out like u and contiguous grad_last expected");
  const int64_t N = s.N, G = s.G, L = s.L, batch = s.batch, W = lanes(s), blocks_per_group = s.D / G / W;
  // Channel blocks of one group add into the same dB, dC rows, so one task owns a (batch, group,
  // split) and the splits of a group get their own dB, dC copies, summed at the end. Enough splits
  // to keep every thread busy when batch * G is small.
  const int64_t threads = at::get_num_threads();
  const int64_t splits =
      std::min(blocks_per_group, std::max<int64_t>(1, (2 * threads + batch * G - 1) / (batch * G)));
  auto du = channels_last(u);
  auto ddelta = s.proj ? at::empty({0}, u.options()) : channels_last(u);
  auto dlow = s.proj ? at::zeros({splits, batch, G, L, s.R}, u.options()) : at::empty({0}, u.options());
  auto dproj = at::empty({batch, s.D, s.R}, u.options());
  if (dz_out.has_value())
    TORCH_CHECK(s.z && dz_out->sizes() == u.sizes() && dz_out->stride(1) == 1 && dz_out->scalar_type() == at::kFloat,
                "selective_scan_cpu: dz_out (batch, D, L) with unit stride over D expected, and z");
  auto dz = dz_out.has_value() ? *dz_out : s.z ? channels_last(u).zero_() : at::empty({0}, u.options());
  auto dA = at::empty({batch, s.D, N}, u.options());
  auto dD = at::empty({batch, s.D}, u.options());
  auto dbias = at::empty({batch, s.D}, u.options());
  auto dB = at::zeros({splits, batch, G, L, N}, u.options());
  auto dC = at::zeros({splits, batch, G, L, N}, u.options());
  const Grads grads{du.data_ptr<float>(),    s.proj ? nullptr : ddelta.data_ptr<float>(),
                    s.z ? dz.data_ptr<float>() : nullptr, dA.data_ptr<float>(),
                    dD.data_ptr<float>(),    dbias.data_ptr<float>(),
                    dB.data_ptr<float>(),    dC.data_ptr<float>(),
                    s.proj ? dlow.data_ptr<float>() : nullptr, dproj.data_ptr<float>(),
                    s.z ? dz.stride(0) : 0,  s.z ? dz.stride(2) : 0};
  const float *pg = grad_out.data_ptr<float>(), *pgl = grad_last.data_ptr<float>(), *pck = checkpoints.data_ptr<float>();
  const int64_t go_b = grad_out.stride(0), go_t = grad_out.stride(2);
  at::parallel_for(0, splits * batch * G, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(N, s.R);
    for (int64_t task = begin; task < end; ++task) {  // task = (split * batch + b) * G + group
      const int64_t grp = task % G, b = (task / G) % batch, split = task / (G * batch);
      Grads mine = grads;  // this task's own dB, dC copy
      mine.dB += task * L * N;
      mine.dC += task * L * N;
      if (s.proj) mine.dlow += task * L * s.R;
      const int64_t first = split * blocks_per_group / splits, stop = (split + 1) * blocks_per_group / splits;
      for (int64_t block = first; block < stop; ++block) {
        const int64_t d0 = (grp * blocks_per_group + block) * W;
        if (W == 1) backward_task<1, false>(s, b, d0, pg, go_b, go_t, pgl, pck, mine, scratch);
        else if (s.scalar_A) backward_task<kLanes, true>(s, b, d0, pg, go_b, go_t, pgl, pck, mine, scratch);
        else backward_task<kLanes, false>(s, b, d0, pg, go_b, go_t, pgl, pck, mine, scratch);
      }
    }
  });
  // With delta_proj, ddelta is dL/d dt_low, (batch, R, L) as a view of (batch, L, R).
  if (s.proj) ddelta = dlow.sum({0, 2}).transpose(1, 2);
  if (dz_out.has_value()) dz = at::empty({0}, u.options());
  return {du, ddelta, dz, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0), dbias.sum(0), dproj.sum(0)};
}

// A CPU kernel under a declared schema (not a catch-all), so that Python can register the ops'
// output shapes for torch.compile (torch.library.register_fake in ssm_cpu.py).
TORCH_LIBRARY(seq_arena_scan, m) {
  m.def("forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
        "bool softplus, Tensor? delta_proj=None, Tensor? order=None) -> Tensor[]");
  m.def("backward(Tensor grad_out, Tensor grad_last, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? delta_bias, bool softplus, Tensor checkpoints, Tensor? delta_proj=None, "
        "Tensor? order=None, Tensor(a!)? dz_out=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seq_arena_scan, CPU, m) {
  m.impl("forward", &selective_scan_forward);
  m.impl("backward", &selective_scan_backward);
}
