// Shared definitions for every loss: the reduction enum and argument checks.
#pragma once

#include <cstdint>

#include <c10/util/Exception.h>

namespace fused_loss {

// Same numbering as at::Reduction, so Python passes torch's own enum values.
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

inline Reduction to_reduction(int64_t r) {
  TORCH_CHECK_VALUE(r >= 0 && r <= 2,
                    "fused_loss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", r);
  return static_cast<Reduction>(r);
}

}  // namespace fused_loss
