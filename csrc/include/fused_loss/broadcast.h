// How an operand that broadcasts over the input (a weight, BCE's pos_weight) is read, shared by
// the CPU and CUDA elementwise kernels (host code).
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

namespace fused_loss {

// Element i of the input (row-major) takes the operand's value (i / repeat) % period of `keep`,
// the operand's contiguous values. A single value: repeat = period = 1.
struct BroadcastLayout {
  int64_t repeat = 1, period = 1;
};

// Checks that w broadcasts to exactly `sizes` (torch's errors) and lays it out. The dims where w
// varies must form one block with no broadcast dim inside (the usual cases: a per-class weight
// over (N, C), a full-shape weight); other layouts, e.g. (N, 1, W) over (N, C, W), are expanded
// into a contiguous copy of the input's size.
inline BroadcastLayout broadcast_layout(const at::Tensor& w, at::IntArrayRef sizes, at::Tensor& keep) {
  const auto shape = at::infer_size(w.sizes(), sizes);  // torch's error when they cannot broadcast
  TORCH_CHECK(at::IntArrayRef(shape) == sizes, "output with shape ", sizes, " doesn't match the broadcast shape ",
              at::IntArrayRef(shape));
  const int64_t nd = int64_t(sizes.size()), off = nd - w.dim();
  auto varies = [&](int64_t d) { return d >= off && w.size(d - off) != 1; };
  int64_t a = -1, b = -1;
  for (int64_t d = 0; d < nd; ++d) {
    if (varies(d)) {
      if (a < 0) a = d;
      b = d;
    }
  }
  BroadcastLayout layout;
  keep = w.contiguous();
  if (a < 0) return layout;  // a single value
  bool block = true;  // do the varying dims form one block (no broadcast dim inside)?
  for (int64_t d = a; d <= b; ++d) block = block && (varies(d) || sizes[d] == 1);
  if (!block) {
    keep = w.expand(sizes).contiguous();
    a = 0, b = nd - 1;
  }
  for (int64_t d = a; d <= b; ++d) layout.period *= sizes[d];
  for (int64_t d = b + 1; d < nd; ++d) layout.repeat *= sizes[d];
  return layout;
}

}  // namespace fused_loss
