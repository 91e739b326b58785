// Fused elementwise losses on the CPU: BCE-with-logits, smooth L1, Huber and sigmoid focal
// loss, each one pass over input and target.
//
// Forward reads input and target once and writes either the per-element loss ('none') or
// per-chunk partial sums ('mean', 'sum'); for those two, when the input will need a gradient,
// it also writes d loss / d input (upstream gradient 1) in the same pass, so that training
// reads the inputs once and writes the gradient once. Backward (any other upstream gradient,
// the target's gradient, 'none') reads them once more and writes the gradients; no other
// tensor of the input's size is made. The per-element math lives in
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

#include "fused_loss/broadcast.h"
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
  const BroadcastLayout layout = broadcast_layout(w, input.sizes(), keep);
  Operand<T> op;
  op.data = keep.template data_ptr<T>();
  op.repeat = layout.repeat;
  op.period = layout.period;
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
  AccVec<T> at(int64_t off, int64_t cnt) const { return ptr && cnt > 0 ? load_vec(ptr + off, cnt) : value; }
};

// Lanes of vector k of a line of `cnt` elements that hold data.
template <typename T>
inline int64_t lanes_in(int64_t cnt, int k) {
  return std::min<int64_t>(std::max<int64_t>(cnt - k * kLanes<T>, 0), kLanes<T>);
}

// Whether full lines of a gradient `out` of n elements are stored non-temporally: it is
// written once and not read back by this pass; streaming saves the read-for-ownership of
// each line. A small one is left in cache for whoever reads it next.
constexpr int64_t kStreamMinBytes = int64_t(4) << 20;

template <typename T>
bool streams(const T* out, int64_t n) {
  return out && n * int64_t(sizeof(T)) >= kStreamMinBytes && reinterpret_cast<uintptr_t>(out) % kLineBytes<T> == 0;
}

template <typename T>
inline void put_line(T* p, const AccVec<T>* v, int64_t cnt, bool stream) {
  if (stream && cnt == kLine<T>) stream_line(p, v); else store_line(p, v, cnt);
}

// Calls f(i, cnt, args) for [begin, end) line by line: args[k] holds vector k of the cnt
// elements from element i. Lines lie on a grid of kLine<T> elements from element 0, so the
// full lines of an aligned output are aligned for stream_line; a line across the end of an
// operand's run (a row of a class weight) is cut there into pieces of cnt < kLine<T>. The
// grid, not an address, decides the pieces, so sums do not depend on where memory lies.
template <typename T, typename F>
void for_each_line(const T* x, const T* y, const Operand<T>& w, const Operand<T>& pw, int64_t begin, int64_t end,
                   F f) {
  using V = AccVec<T>;
  constexpr int64_t L = kLine<T>;
  for (int64_t s = begin; s < end;) {
    const int64_t e = std::min({end, w.run_end(s), pw.run_end(s)});
    const SegmentOperand<T> ws(w, s), pws(pw, s);
    auto line = [&](int64_t i, int64_t cnt) {
      V xv[kVecsPerLine<T>], yv[kVecsPerLine<T>];
      if (cnt == L) {
        load_line(x + i, xv), load_line(y + i, yv);
      } else {
        load_line(x + i, xv, cnt), load_line(y + i, yv, cnt);
      }
      ElemArgs<V> args[kVecsPerLine<T>];
      for (int k = 0; k < kVecsPerLine<T>; ++k) {
        const int64_t off = i - s + k * kLanes<T>, nk = lanes_in<T>(cnt, k);
        args[k] = {xv[k], yv[k], ws.at(off, nk), pws.at(off, nk)};
      }
      f(i, cnt, args);
    };
    int64_t i = std::min(e, (s + L - 1) / L * L);  // first grid point
    if (i > s) line(s, i - s);
    for (; i + L <= e; i += L) line(i, L);  // (software prefetch measured no gain here)
    if (i < e) line(i, e - i);
    s = e;
  }
}

// Input, target and operands of one call, walked in fixed chunks of kChunk elements (the unit
// of parallel work and of partial sums): bitwise the same results for any number of threads.
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

  // f(chunk, begin, end) for every chunk, in parallel.
  template <typename F>
  void parallel_chunks(F f) const {
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) f(c, c * kChunk, std::min(n, (c + 1) * kChunk));
      stream_fence();  // this thread's streamed lines, before anyone reads the gradient
    });
  }
  // f(i, cnt, args) for the lines of [begin, end) in order (see for_each_line).
  template <typename F>
  void lines(int64_t begin, int64_t end, F f) const {
    for_each_line<T>(x.data_ptr<T>(), y.data_ptr<T>(), w, pw, begin, end, f);
  }
  // f(i, cnt, args) for every line, chunks in parallel.
  template <typename F>
  void parallel_lines(F f) const {
    parallel_chunks([&](int64_t, int64_t b, int64_t e) { lines(b, e, f); });
  }
};

// Loss of one call. With compute_grad and reduction 'mean' or 'sum', also d loss / d input for
// an upstream gradient of 1, written in the same pass (input and target read once, the
// gradient written once, the exp/log shared with the loss: Op::loss_and_grad); its bits are
// those the backward computes for an upstream gradient of 1. Otherwise the gradient is empty.
template <typename T, typename Op>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                bool compute_grad, const Op& op) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int P = kVecsPerLine<T>;
  const Reduction red = to_reduction(reduction);
  const ElementwiseInputs<T> in(input, target, weight, pos_weight);
  if (red == Reduction::None) {
    at::Tensor out = empty_cached(in.x.sizes(), in.x.options());
    T* op_out = out.data_ptr<T>();
    in.parallel_lines([&](int64_t i, int64_t cnt, const ElemArgs<V>* a) {
      V v[P];
      for (int k = 0; k < P; ++k) v[k] = op.loss(a[k]);
      store_line(op_out + i, v, cnt);  // read back soon by the caller: not streamed
    });
    return {out, at::empty({0}, in.x.options())};
  }
  at::Tensor dx = compute_grad ? empty_cached(in.x.sizes(), in.x.options()) : at::empty({0}, in.x.options());
  T* dxp = compute_grad ? dx.data_ptr<T>() : nullptr;
  const bool stream = streams(dxp, in.n);
  const V scale(A(red == Reduction::Mean ? 1.0 / double(in.n) : 1.0));  // as the backward's upstream 1
  std::vector<V> acc(in.chunks, V(0));  // one sum per chunk: a fixed summation order
  in.parallel_chunks([&](int64_t c, int64_t begin, int64_t end) {
    V sum(0);
    in.lines(begin, end, [&](int64_t i, int64_t cnt, const ElemArgs<V>* a) {
      if (dxp) {
        V g[P];
        for (int k = 0; k < P; ++k) {
          const ElemLossGrad<V> r = op.loss_and_grad(a[k]);
          sum += cnt == kLine<T> ? r.loss : keep_first(r.loss, lanes_in<T>(cnt, k), A(0));
          g[k] = r.dx * scale;
        }
        put_line(dxp + i, g, cnt, stream);
      } else {
        for (int k = 0; k < P; ++k) {
          const V l = op.loss(a[k]);
          sum += cnt == kLine<T> ? l : keep_first(l, lanes_in<T>(cnt, k), A(0));
        }
      }
    });
    acc[c] = sum;
  });
  double total = 0;
  for (const V& v : acc) total += double(reduce_sum(v));
  if (red == Reduction::Mean) total /= double(in.n);  // 0 / 0 is NaN, as in torch
  return {at::scalar_tensor(total, input.options()), dx};
}

template <typename T, typename Op>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& input,
                                                 const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                 bool input_grad, bool target_grad, const Op& op) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int P = kVecsPerLine<T>;
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
  const bool stream_x = streams(dxp, in.n), stream_y = streams(dyp, in.n);
  in.parallel_lines([&](int64_t i, int64_t cnt, const ElemArgs<V>* a) {
    V g[P], o[P];
    if (gp) {
      if (cnt == kLine<T>) load_line(gp + i, g); else load_line(gp + i, g, cnt);
    } else {
      for (int k = 0; k < P; ++k) g[k] = V(g_all);
    }
    if (dxp) {
      for (int k = 0; k < P; ++k) o[k] = op.grad_input(a[k]) * g[k];
      put_line(dxp + i, o, cnt, stream_x);
    }
    if (dyp) {
      for (int k = 0; k < P; ++k) o[k] = op.grad_target(a[k]) * g[k];
      put_line(dyp + i, o, cnt, stream_y);
    }
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
std::tuple<at::Tensor, at::Tensor> forward_entry(const char* name, const Op& op, const at::Tensor& input,
                                                 const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                 bool compute_grad) {
  check_pair(input, target, name);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_elementwise", [&] {
    return forward_impl<scalar_t>(input, target, weight, pos_weight, reduction, compute_grad, op);
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

// The backward into the forward's in-pass gradient: on the CPU reading the upstream gradient costs
// nothing, and the buffer is recomputed only when it is not exactly 1.
template <typename Op>
void backward_into_entry(const char* name, const Op& op, at::Tensor& buffer, const at::Tensor& grad,
                         const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  check_pair(input, target, name);
  if (grad.item<double>() == 1.0) return;
  buffer.copy_(std::get<0>(backward_entry(name, op, grad, input, target, weight, pos_weight, reduction, true, false)));
}

#include "fused_loss/elementwise_entries.h"  // the ops' entry points, over forward_entry/backward_entry

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu

TORCH_LIBRARY_IMPL(fused_loss, CPU, m) {
  using namespace fused_loss::cpu;
  FUSED_LOSS_REGISTER_ELEMENTWISE(m);
}
