// Helpers the CPU kernels of this folder share that are not arithmetic.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace seq_arena {

// The step order of a kernel: (batch, L) contiguous int64, each row a permutation of 0 .. L - 1
// (checked here: a wrong index would read or write out of bounds). Returns its data.
inline const int64_t* step_order(const at::Tensor& order, int64_t batch, int64_t L, const char* kernel) {
  TORCH_CHECK(order.scalar_type() == at::kLong && order.device().is_cpu() && order.dim() == 2 &&
                  order.size(0) == batch && order.size(1) == L && order.is_contiguous(),
              kernel, ": order must be a contiguous int64 (batch, L) tensor");
  const int64_t* p = order.data_ptr<int64_t>();
  std::vector<char> seen(L);
  for (int64_t b = 0; b < batch; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t t = 0; t < L; ++t) {
      const int64_t i = p[b * L + t];
      TORCH_CHECK(i >= 0 && i < L && !seen[i], kernel, ": order row ", b, " is not a permutation of 0 .. L - 1");
      seen[i] = 1;
    }
  }
  return p;
}

}  // namespace seq_arena
