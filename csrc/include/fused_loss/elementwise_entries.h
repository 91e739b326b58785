// The entry points of the elementwise losses' ops, shared by the CPU and CUDA files: each file
// defines forward_entry, backward_entry and backward_into_entry (its kernels) and then includes
// this header inside its own (anonymous) namespace, and registers the ops with
// FUSED_LOSS_REGISTER_ELEMENTWISE(m).
// No include guard: it is meant to be included once per backend.

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
constexpr auto kNone = std::nullopt;

SmoothL1 smooth_l1(double beta) {
  TORCH_CHECK(beta >= 0, "smooth_l1_loss does not support negative values for beta.");
  return SmoothL1::with_beta(beta);
}

Huber huber(double delta) {
  TORCH_CHECK(delta > 0, "huber_loss does not support non-positive values for delta.");
  return {delta};
}

// ---------------------------------------------------------------------------------
// Operator entry points

constexpr const char* kBce = "binary_cross_entropy_with_logits";

TensorPair bce_forward(const Tensor& x, const Tensor& y, const OptTensor& w, const OptTensor& pw, int64_t red,
                       bool grad) {
  return forward_entry(kBce, BceWithLogits{pw.has_value()}, x, y, w, pw, red, grad);
}
TensorPair bce_backward(const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w, const OptTensor& pw,
                        int64_t red, bool dx, bool dy) {
  return backward_entry(kBce, BceWithLogits{pw.has_value()}, g, x, y, w, pw, red, dx, dy);
}
void bce_backward_into(Tensor& buffer, const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w,
                       const OptTensor& pw, int64_t red) {
  check_in_pass_buffer(kBce, "_backward_into", buffer, g, x, red);
  backward_into_entry(kBce, BceWithLogits{pw.has_value()}, buffer, g, x, y, w, pw, red);
}
TensorPair smooth_l1_forward(const Tensor& x, const Tensor& y, int64_t red, double beta, bool grad) {
  return forward_entry("smooth_l1_loss", smooth_l1(beta), x, y, kNone, kNone, red, grad);
}
TensorPair smooth_l1_backward(const Tensor& g, const Tensor& x, const Tensor& y, int64_t red, double beta, bool dx,
                              bool dy) {
  return backward_entry("smooth_l1_loss", smooth_l1(beta), g, x, y, kNone, kNone, red, dx, dy);
}
void smooth_l1_backward_into(Tensor& buffer, const Tensor& g, const Tensor& x, const Tensor& y, int64_t red,
                             double beta) {
  check_in_pass_buffer("smooth_l1_loss", "_backward_into", buffer, g, x, red);
  backward_into_entry("smooth_l1_loss", smooth_l1(beta), buffer, g, x, y, kNone, kNone, red);
}
TensorPair huber_forward(const Tensor& x, const Tensor& y, const OptTensor& w, int64_t red, double delta, bool grad) {
  return forward_entry("huber_loss", huber(delta), x, y, w, kNone, red, grad);
}
TensorPair huber_backward(const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w, int64_t red,
                          double delta, bool dx, bool dy) {
  return backward_entry("huber_loss", huber(delta), g, x, y, w, kNone, red, dx, dy);
}
void huber_backward_into(Tensor& buffer, const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w,
                         int64_t red, double delta) {
  check_in_pass_buffer("huber_loss", "_backward_into", buffer, g, x, red);
  backward_into_entry("huber_loss", huber(delta), buffer, g, x, y, w, kNone, red);
}
TensorPair focal_forward(const Tensor& x, const Tensor& y, int64_t red, double alpha, double gamma, bool grad) {
  return forward_entry("sigmoid_focal_loss", SigmoidFocal{alpha, gamma}, x, y, kNone, kNone, red, grad);
}
TensorPair focal_backward(const Tensor& g, const Tensor& x, const Tensor& y, int64_t red, double alpha, double gamma,
                          bool dx, bool dy) {
  return backward_entry("sigmoid_focal_loss", SigmoidFocal{alpha, gamma}, g, x, y, kNone, kNone, red, dx, dy);
}

void focal_backward_into(Tensor& buffer, const Tensor& g, const Tensor& x, const Tensor& y, int64_t red, double alpha,
                         double gamma) {
  check_in_pass_buffer("sigmoid_focal_loss", "_backward_into", buffer, g, x, red);
  backward_into_entry("sigmoid_focal_loss", SigmoidFocal{alpha, gamma}, buffer, g, x, y, kNone, kNone, red);
}

#define FUSED_LOSS_REGISTER_ELEMENTWISE(m)                                    \
  do {                                                                        \
    m.impl("binary_cross_entropy_with_logits_forward", &bce_forward);         \
    m.impl("binary_cross_entropy_with_logits_backward", &bce_backward);       \
    m.impl("smooth_l1_loss_forward", &smooth_l1_forward);                     \
    m.impl("smooth_l1_loss_backward", &smooth_l1_backward);                   \
    m.impl("huber_loss_forward", &huber_forward);                             \
    m.impl("huber_loss_backward", &huber_backward);                           \
    m.impl("sigmoid_focal_loss_forward", &focal_forward);                     \
    m.impl("sigmoid_focal_loss_backward", &focal_backward);                   \
    m.impl("binary_cross_entropy_with_logits_backward_into", &bce_backward_into); \
    m.impl("smooth_l1_loss_backward_into", &smooth_l1_backward_into);         \
    m.impl("huber_loss_backward_into", &huber_backward_into);                 \
    m.impl("sigmoid_focal_loss_backward_into", &focal_backward_into);         \
  } while (0)
