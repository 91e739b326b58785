// Fused elementwise losses on the CPU: BCE-with-logits, smooth L1, Huber and sigmoid focal
// loss, each one pass over input and target.
//
// Forward reads input and target once and writes either the per-element loss ('none') or
// nothing but per-chunk partial sums ('mean', 'sum'). Backward reads them once more and writes
// the gradients; no other tensor of the input's size is made. The per-element math lives in
// csrc/include/fused_loss/elementwise_math.h (shared with CUDA); this file only walks memory.
//
// Broadcast operands (weight, pos_weight) are read in place: for a contiguous input of n
// elements an operand broadcast to the input's shape is data[(i / repeat) % period], so a
// class weight (C,) is contiguous in runs of C and a per-row weight (N, 1) constant in runs
// of C. Sums are taken per fixed chunk and added in order: bitwise the same for any number
// of threads.
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fused_loss/common.h"
#include "vec_math.h"  // before elementwise_math.h: the vector primitives it calls
#include "fused_loss/elementwise_math.h"
#include "output_cache.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 16384;  // elements per parallel task and per partial sum

// A weight-like operand broadcast over the input (see the file comment); absent means 1.
template <typename T>
struct Operand {
  const T* data = nullptr;
  int64_t repeat = 1, period = 1;

  int64_t index(int64_t i) const { return (i / repeat) % period; }
  bool varies() const { return data && period > 1; }
  // First element after i where the operand's run (constant, or contiguous when repeat == 1) ends.
  int64_t run_end(int64_t i) const {
    if (!varies()) return std::numeric_limits<int64_t>::max();
    const int64_t unit = repeat > 1 ? repeat : period;
    return (i / unit + 1) * unit;
  }
};

// Keeps the operand's memory alive and describes it; `name` for error messages.
template <typename T>
Operand<T> make_operand(const std::optional<at::Tensor>& opt, const at::Tensor& input, at::Tensor& keep,
                        const char* name) {
  if (!opt.has_value() || !opt->defined()) return {};
  const at::Tensor& w = *opt;
  TORCH_CHECK(w.scalar_type() == input.scalar_type(), "fused_loss: ", name, " must have the input's dtype ",
              input.scalar_type(), ", got ", w.scalar_type());
  const auto sizes = input.sizes();
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
  Operand<T> op;
  keep = w.contiguous();
  if (a < 0) {  // a single value
    op.data = keep.template data_ptr<T>();
    return op;
  }
  bool block = true;  // do the varying dims form one block (no broadcast dim inside)?
  for (int64_t d = a; d <= b; ++d) block = block && (varies(d) || sizes[d] == 1);
  if (!block) {  // rare layouts, e.g. (N, 1, W) over (N, C, W): spell the operand out
    keep = w.expand(sizes).contiguous();
    a = 0, b = nd - 1;
  }
  op.data = keep.template data_ptr<T>();
  op.period = 1;
  for (int64_t d = a; d <= b; ++d) op.period *= sizes[d];
  for (int64_t d = b + 1; d < nd; ++d) op.repeat *= sizes[d];
  return op;
}

// Operand values for a segment in which it is constant or contiguous.
template <typename T>
struct SegmentOperand {
  const T* ptr = nullptr;  // contiguous values at the segment start, or null
  AccVec<T> value{1};      // the constant otherwise

  SegmentOperand(const Operand<T>& op, int64_t start) {
    if (!op.data) return;
    const int64_t idx = op.index(start);
    if (op.varies() && op.repeat == 1) ptr = op.data + idx;
    else value = AccVec<T>(static_cast<acc_t<T>>(op.data[idx]));
  }
  AccVec<T> at(int64_t off, int64_t cnt) const { return ptr ? load_vec(ptr + off, cnt) : value; }
};

// Walks [begin, end) in segments over which both operands are constant or contiguous and
// calls f(i, cnt, args) for each vector of `cnt` elements starting at element i.
template <typename T, typename F>
void for_each_vector(const T* x, const T* y, const Operand<T>& w, const Operand<T>& pw, int64_t begin, int64_t end,
                     F f) {
  using V = AccVec<T>;
  for (int64_t s = begin; s < end;) {
    const int64_t e = std::min({end, w.run_end(s), pw.run_end(s)});
    const SegmentOperand<T> ws(w, s), pws(pw, s);
    for (int64_t i = s; i < e; i += kLanes<T>) {
      const int64_t cnt = std::min(kLanes<T>, e - i);
      const ElemArgs<V> args{load_vec(x + i, cnt), load_vec(y + i, cnt), ws.at(i - s, cnt), pws.at(i - s, cnt)};
      f(i, cnt, args);
    }
    s = e;
  }
}

// Input, target and operands of one call, walked chunk by chunk: f(chunk, i, cnt, args) for
// every vector, chunks in parallel, each chunk's vectors in order.
template <typename T>
struct ElementwiseInputs {
  at::Tensor x, y, keep_w, keep_pw;
  Operand<T> w, pw;
  int64_t n, chunks;

  ElementwiseInputs(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& pos_weight)
      : x(input.contiguous()), y(target.contiguous()) {
    w = make_operand<T>(weight, x, keep_w, "weight");
    pw = make_operand<T>(pos_weight, x, keep_pw, "pos_weight");
    n = x.numel();
    chunks = (n + kChunk - 1) / kChunk;
  }

  template <typename F>
  void parallel_chunks(F f) const {
    const T* xp = x.data_ptr<T>();
    const T* yp = y.data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        for_each_vector<T>(xp, yp, w, pw, c * kChunk, std::min(n, (c + 1) * kChunk),
                           [&](int64_t i, int64_t cnt, const ElemArgs<AccVec<T>>& a) { f(c, i, cnt, a); });
      }
    });
  }
};

template <typename T, typename Op>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& pos_weight, int64_t reduction, const Op& op) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const Reduction red = to_reduction(reduction);
  const ElementwiseInputs<T> in(input, target, weight, pos_weight);
  if (red == Reduction::None) {
    at::Tensor out = empty_cached(in.x.sizes(), in.x.options());
    T* op_out = out.data_ptr<T>();
    in.parallel_chunks([&](int64_t, int64_t i, int64_t cnt, const ElemArgs<V>& a) {
      store_vec(op_out + i, op.loss(a), cnt);
    });
    return out;
  }
  std::vector<V> acc(in.chunks, V(0));  // one accumulator per chunk: a fixed summation order
  in.parallel_chunks([&](int64_t c, int64_t, int64_t cnt, const ElemArgs<V>& a) {
    acc[c] += keep_first(op.loss(a), cnt, A(0));
  });
  double total = 0;
  for (const V& v : acc) total += double(reduce_sum(v));
  if (red == Reduction::Mean) total /= double(in.n);  // 0 / 0 is NaN, as in torch
  return at::scalar_tensor(total, input.options());
}

template <typename T, typename Op>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& input,
                                                 const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                 bool input_grad, bool target_grad, const Op& op) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const Reduction red = to_reduction(reduction);
  const ElementwiseInputs<T> in(input, target, weight, pos_weight);
  const at::Tensor& x = in.x;
  const at::Tensor& y = in.y;
  at::Tensor dx = input_grad ? empty_cached(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor dy = target_grad ? empty_cached(y.sizes(), y.options()) : at::empty({0}, y.options());
  if (!input_grad && !target_grad) return {dx, dy};
  // Upstream gradient: per element for 'none', else one scalar (divided by n for 'mean').
  at::Tensor g_elems;
  A g_all = A(0);
  if (red == Reduction::None) {
    TORCH_CHECK(grad.sizes() == x.sizes(), "fused_loss: expected a gradient of shape ", x.sizes(), ", got ", grad.sizes());
    g_elems = grad.to(x.scalar_type()).contiguous();
  } else {
    TORCH_CHECK(grad.numel() == 1, "fused_loss: expected a scalar gradient, got shape ", grad.sizes());
    double g = grad.item<double>();
    if (red == Reduction::Mean) g /= double(in.n);
    g_all = A(g);
  }
  const T* gp = g_elems.defined() ? g_elems.data_ptr<T>() : nullptr;
  T* dxp = input_grad ? dx.data_ptr<T>() : nullptr;
  T* dyp = target_grad ? dy.data_ptr<T>() : nullptr;
  in.parallel_chunks([&](int64_t, int64_t i, int64_t cnt, const ElemArgs<V>& a) {
    const V g = gp ? load_vec(gp + i, cnt) : V(g_all);
    if (dxp) store_vec(dxp + i, op.grad_input(a) * g, cnt);
    if (dyp) store_vec(dyp + i, op.grad_target(a) * g, cnt);
  });
  return {dx, dy};
}

void check_pair(const at::Tensor& input, const at::Tensor& target, const char* name) {
  TORCH_CHECK(input.device().is_cpu(), "fused_loss.", name, " (CPU kernel): input must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fused_loss.", name, ": expected a floating point input, got ",
              input.scalar_type());
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "Target size (", target.sizes(), ") must be the same as input size (",
                    input.sizes(), ")");
  TORCH_CHECK(target.scalar_type() == input.scalar_type(), "fused_loss.", name, ": target must have the input's dtype ",
              input.scalar_type(), ", got ", target.scalar_type());
}

// Checks, dtype dispatch and the kernel of one loss `op`; `name` for error messages.
template <typename Op>
at::Tensor forward_entry(const char* name, const Op& op, const at::Tensor& input, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                         int64_t reduction) {
  check_pair(input, target, name);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_elementwise", [&] {
    return forward_impl<scalar_t>(input, target, weight, pos_weight, reduction, op);
  });
}

template <typename Op>
std::tuple<at::Tensor, at::Tensor> backward_entry(const char* name, const Op& op, const at::Tensor& grad,
                                                  const at::Tensor& input, const at::Tensor& target,
                                                  const std::optional<at::Tensor>& weight,
                                                  const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                  bool input_grad, bool target_grad) {
  check_pair(input, target, name);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_elementwise", [&] {
    return backward_impl<scalar_t>(grad, input, target, weight, pos_weight, reduction, input_grad, target_grad, op);
  });
}

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

Tensor bce_forward(const Tensor& x, const Tensor& y, const OptTensor& w, const OptTensor& pw, int64_t red) {
  return forward_entry(kBce, BceWithLogits{pw.has_value()}, x, y, w, pw, red);
}
TensorPair bce_backward(const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w, const OptTensor& pw,
                        int64_t red, bool dx, bool dy) {
  return backward_entry(kBce, BceWithLogits{pw.has_value()}, g, x, y, w, pw, red, dx, dy);
}
Tensor smooth_l1_forward(const Tensor& x, const Tensor& y, int64_t red, double beta) {
  return forward_entry("smooth_l1_loss", smooth_l1(beta), x, y, kNone, kNone, red);
}
TensorPair smooth_l1_backward(const Tensor& g, const Tensor& x, const Tensor& y, int64_t red, double beta, bool dx,
                              bool dy) {
  return backward_entry("smooth_l1_loss", smooth_l1(beta), g, x, y, kNone, kNone, red, dx, dy);
}
Tensor huber_forward(const Tensor& x, const Tensor& y, const OptTensor& w, int64_t red, double delta) {
  return forward_entry("huber_loss", huber(delta), x, y, w, kNone, red);
}
TensorPair huber_backward(const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w, int64_t red,
                          double delta, bool dx, bool dy) {
  return backward_entry("huber_loss", huber(delta), g, x, y, w, kNone, red, dx, dy);
}
Tensor focal_forward(const Tensor& x, const Tensor& y, int64_t red, double alpha, double gamma) {
  return forward_entry("sigmoid_focal_loss", SigmoidFocal{alpha, gamma}, x, y, kNone, kNone, red);
}
TensorPair focal_backward(const Tensor& g, const Tensor& x, const Tensor& y, int64_t red, double alpha, double gamma,
                          bool dx, bool dy) {
  return backward_entry("sigmoid_focal_loss", SigmoidFocal{alpha, gamma}, g, x, y, kNone, kNone, red, dx, dy);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu

TORCH_LIBRARY_IMPL(fused_loss, CPU, m) {
  using namespace fused_loss::cpu;
  m.impl("binary_cross_entropy_with_logits_forward", &bce_forward);
  m.impl("binary_cross_entropy_with_logits_backward", &bce_backward);
  m.impl("smooth_l1_loss_forward", &smooth_l1_forward);
  m.impl("smooth_l1_loss_backward", &smooth_l1_backward);
  m.impl("huber_loss_forward", &huber_forward);
  m.impl("huber_loss_backward", &huber_backward);
  m.impl("sigmoid_focal_loss_forward", &focal_forward);
  m.impl("sigmoid_focal_loss_backward", &focal_backward);
}
