// Shared definitions for every loss: the reduction enum and argument checks.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fused_loss {

// Same numbering as at::Reduction, so Python passes torch's own enum values.
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

inline Reduction to_reduction(int64_t r) {
  TORCH_CHECK_VALUE(r >= 0 && r <= 2,
                    "fused_loss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", r);
  return static_cast<Reduction>(r);
}

// The buffer of a <op>_backward_into: the forward's in-pass gradient of the input (contiguous,
// the input's shape, dtype and device), for reductions 'mean' and 'sum', with a scalar upstream
// gradient on the input's device. The errors name fused_loss.<loss><op>.
inline void check_in_pass_buffer(const char* loss, const char* op, const at::Tensor& buffer, const at::Tensor& grad,
                                 const at::Tensor& input, int64_t reduction) {
  TORCH_CHECK(reduction != 0 && buffer.is_contiguous() && buffer.sizes() == input.sizes() &&
                  buffer.scalar_type() == input.scalar_type() && buffer.device() == input.device(),
              "fused_loss.", loss, op, ": expected the forward's gradient (contiguous, of the input's shape, dtype and "
              "device) and reduction 'mean' or 'sum', got ", buffer.scalar_type(), " of shape ", buffer.sizes(),
              " on ", buffer.device(), " and reduction ", reduction);
  TORCH_CHECK(grad.numel() == 1 && grad.device() == input.device(), "fused_loss.", loss, op,
              ": expected a scalar upstream gradient on ", input.device(), ", got shape ", grad.sizes(), " on ",
              grad.device());
}

}  // namespace fused_loss
