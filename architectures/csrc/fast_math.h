// Float math for the CPU kernels of this folder, as plain arithmetic (no libm calls), so that loops
// calling it vectorise. Functions are force-inlined into the callers, which are compiled once per
// instruction set (SCAN_CLONES): x86-64-v3 (AVX2 + FMA), v2 (SSE4.1, which rounds in vector
// registers: std::floor in fast_exp) and the baseline, picked at run time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SCAN_CLONES __attribute__((target_clones("arch=x86-64-v3", "arch=x86-64-v2", "default")))
#else
#define SCAN_CLONES
#endif
#define SCAN_INLINE inline __attribute__((always_inline))

namespace seq_arena {

// exp(x) for float (Cephes' expf polynomial, ~1 ulp on [-87, 88]); plain arithmetic, so the loops
// over the N state entries that call it vectorise (std::exp would be a scalar libm call).
SCAN_INLINE float fast_exp(float x) {
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

// log(w) for w in [1, 2] (Cephes' logf polynomial, ~1 ulp).
SCAN_INLINE float log_1_to_2(float w) {
  const float e = w > 1.41421356f ? 1.0f : 0.0f;
  const float x = (e > 0.0f ? 0.5f * w : w) - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z - 2.12194440e-4f * e - 0.5f * z;
  return x + y + 0.693359375f * e;
}

// softplus(x) = log(1 + e^x), as torch's (x itself above 20), and its derivative sigmoid(x).
// log1p(v) for v = e^-|x| in (0, 1] is log(w) v / (w - 1) with w = 1 + v (exact to rounding even
// where w rounds to 1). Branch-free, so that loops over lanes vectorise.
SCAN_INLINE void softplus_and_grad(float x, float& value, float& grad) {
  const float v = fast_exp(-std::fabs(x)), w = 1.0f + v;
  const float log1p_v = w == 1.0f ? v : log_1_to_2(w) * v / (w - 1.0f);
  value = x > 20.0f ? x : std::max(x, 0.0f) + log1p_v;
  grad = (x >= 0.0f ? 1.0f : v) / w;
}

SCAN_INLINE float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

}  // namespace seq_arena
