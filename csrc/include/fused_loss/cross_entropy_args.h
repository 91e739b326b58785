// Cross-entropy's arguments, checked alike by every backend (csrc/cpu/cross_entropy,
// csrc/cuda/cross_entropy): shapes, dtypes, the LLM options and the statistics a backward takes.
// What reads tensor values (the targets' range) is each backend's own.
#pragma once

#include <cmath>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "common.h"

namespace fused_loss::ce_args {

// The input viewed as (outer, C, inner): (N, C) has inner == 1; (N, C, d1..dk) has
// inner = d1*..*dk, and a sample's classes are inner apart.
struct Geometry {
  int64_t outer;    // N
  int64_t classes;  // C
  int64_t inner;    // d1 * ... * dk (1 for (N, C))
  int64_t rows() const { return outer * inner; }
};

inline Geometry geometry(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "fused_loss.cross_entropy: expected input of shape (N, C) or (N, C, d1, ..., dk), got ",
              input.sizes());
  int64_t inner = 1;
  for (int64_t d = 2; d < input.dim(); ++d) inner *= input.size(d);
  return {input.size(0), input.size(1), inner};
}

// The device and dtype of the input a backend's kernel takes.
inline void check_input(const at::Tensor& input, c10::DeviceType device, const char* backend) {
  TORCH_CHECK(input.device().type() == device, "fused_loss.cross_entropy (", backend, " kernel): input must be a ",
              backend, " tensor, got one on ", input.device());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "fused_loss.cross_entropy: expected a floating point input, got ", input.scalar_type());
}

// Another tensor argument must be on the input's device.
inline void check_same_device(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "fused_loss.cross_entropy: ", name, " must be on the input's device ",
              input.device(), ", got ", t.device());
}

// Class weights: one per class, in the input's dtype (torch's messages).
inline void check_class_weight(const std::optional<at::Tensor>& weight, const at::Tensor& input, int64_t classes) {
  if (!weight.has_value() || !weight->defined()) return;
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == classes,
              "weight tensor should be defined either for all ", classes,
              " classes or no classes but got weight tensor of shape: ", weight->sizes());
  TORCH_CHECK(weight->scalar_type() == input.scalar_type(), "expected scalar type ", input.scalar_type(),
              " but found ", weight->scalar_type(), " for weight");
  check_same_device(*weight, input, "weight");
}

// The rows' shape of an (N, C, d1, ..., dk) input: (N, d1, ..., dk), a class target's and a loss's.
inline std::vector<int64_t> row_shape(const at::Tensor& input) {
  std::vector<int64_t> shape{input.size(0)};
  for (int64_t d = 2; d < input.dim(); ++d) shape.push_back(input.size(d));
  return shape;
}

// Class weights checked and in the accumulation type, on the input's device (undefined when absent).
inline at::Tensor acc_weights(const std::optional<at::Tensor>& weight, const at::Tensor& input, int64_t classes) {
  check_class_weight(weight, input, classes);
  if (!weight.has_value() || !weight->defined()) return {};
  return weight->contiguous().to(at::toOpMathType(input.scalar_type()));
}

// Class-index targets: dtype and shape (torch's messages). Their values are checked by each
// backend before any kernel indexes through them.
inline void check_class_target(const at::Tensor& target, const at::Tensor& input, const Geometry& g) {
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte,
              "expected target dtype to be Long or Byte, but got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() >= 1 && target.size(0) == g.outer, "Expected input batch_size (", g.outer,
                    ") to match target batch_size (", target.dim() >= 1 ? target.size(0) : 0, ").");
  const std::vector<int64_t> expected = row_shape(input);
  TORCH_CHECK(target.sizes() == at::IntArrayRef(expected), "Expected target size ", at::IntArrayRef(expected),
              ", got ", target.sizes());
  check_same_device(target, input, "target");
}

inline void check_prob_target(const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK(target.sizes() == input.sizes(), "fused_loss.cross_entropy: probability targets must have the input's shape ",
              input.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == input.scalar_type(), "fused_loss.cross_entropy: probability targets must have the input's dtype ",
              input.scalar_type(), ", got ", target.scalar_type());
  check_same_device(target, input, "target");
}

inline void check_smoothing(double label_smoothing) {
  // NaN passes, as in torch, which then applies no smoothing.
  TORCH_CHECK(!(label_smoothing > 1.0), "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
}

// The LLM options of class-index cross-entropy, checked:
//   z = softcap * tanh(x / softcap) / temperature      (either part optional)
// z_loss adds z_loss * w_y * lse(z)^2 per row. They are fused into the (N, C) row kernels; the
// Python layer composes softcap, temperature and statistics around the kernels for other layouts.
struct RowOptions {
  std::optional<double> softcap;
  double temperature = 1.0;
  double z_loss = 0.0;
  bool return_stats = false;  // stats gain entropy, correct (0/1) and z-loss term per row

  bool shaped() const { return softcap.has_value() || temperature != 1.0 || return_stats; }
  bool any() const { return shaped() || z_loss != 0.0; }
  int64_t stats_parts() const { return return_stats ? 5 : 2; }
};

inline RowOptions row_options(std::optional<double> softcap, double temperature, double z_loss, bool return_stats) {
  TORCH_CHECK(!softcap.has_value() || (std::isfinite(*softcap) && *softcap > 0),
              "fused_loss.cross_entropy: softcap must be a positive finite number or None, got ", *softcap);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "fused_loss.cross_entropy: temperature must be a positive finite number, got ", temperature);
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0,
              "fused_loss.cross_entropy: z_loss must be a non-negative finite number, got ", z_loss);
  return {softcap, temperature, z_loss, return_stats};
}

// Shaped logits are fused for (N, C) input only (see RowOptions).
inline void check_options_layout(const RowOptions& opts, const Geometry& g) {
  TORCH_CHECK(!opts.shaped() || g.inner == 1, "fused_loss.cross_entropy: softcap, temperature and return_stats are "
              "fused for (N, C) input; fused_loss.cross_entropy composes them for other shapes");
}

// stats: `parts` x rows in the accumulation type (the forward's own output). Returns it contiguous.
inline at::Tensor check_stats(const at::Tensor& s, const char* name, int64_t parts, const Geometry& g,
                              at::ScalarType acc) {
  TORCH_CHECK(s.dim() == 2 && s.size(0) == parts && s.size(1) == g.rows() && s.scalar_type() == acc,
              "fused_loss.cross_entropy backward: ", name, " must be the forward's ", acc, " tensor of shape (",
              parts, ", ", g.rows(), "), got ", s.scalar_type(), " of shape ", s.sizes());
  return s.contiguous();
}

// The in-place forward takes contiguous (N, C) logits and a reduced loss.
inline void check_in_place(const at::Tensor& input, int64_t reduction) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous() && reduction != 0,
              "fused_loss.cross_entropy_forward_grad_in_place: expected contiguous (N, C) logits and reduction 'mean' "
              "or 'sum', got shape ", input.sizes(), (input.is_contiguous() ? "" : " (not contiguous)"),
              " and reduction ", reduction);
}

// A backward's upstream gradient: one per row ('none'), else a scalar.
inline void check_upstream(const at::Tensor& grad_loss, Reduction red, int64_t rows) {
  if (red == Reduction::None) {
    TORCH_CHECK(grad_loss.numel() == rows, "fused_loss.cross_entropy backward: expected a gradient with ", rows,
                " elements for reduction='none', got shape ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "fused_loss.cross_entropy backward: expected a scalar gradient, got shape ",
                grad_loss.sizes());
  }
}

}  // namespace fused_loss::ce_args
