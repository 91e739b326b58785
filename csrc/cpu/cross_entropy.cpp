// Fused cross-entropy on the CPU: log-softmax and NLL (or soft-target CE) in one pass.
//
// Forward reads each row of logits once and keeps only its log-sum-exp (N floats) for
// the backward; backward reads the logits once more and writes
//   dx = (softmax(x) * a - target distribution) * scale
// directly. Nothing of size N x C is ever allocated besides the gradient itself.
//
// Layout. The input is viewed as (outer, C, inner): (N, C) has inner == 1 and its rows
// are contiguous ("row kernels", vectorised along the classes); (N, C, d1..dk) has
// inner = d1*..*dk and a sample's classes are inner apart ("column kernels",
// vectorised along the inner positions, one position per vector lane).
//
// Determinism. A row is cut into fixed chunks of kChunk classes (its unit of parallel
// work when rows are few) and each chunk into kBlock-sized blocks; partial results are
// always merged in the same order, so the bits do not depend on the thread count.
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fused_loss/common.h"
#include "fused_loss/cross_entropy_math.h"
#include "output_cache.h"
#include "vec_io.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBlock = 4096;        // classes kept in L1 between a block's two passes
constexpr int64_t kChunk = 8 * kBlock;  // classes per unit of parallel work within a row
constexpr int64_t kGrainElems = 32768;  // fewest elements worth a parallel task

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

template <typename A>
A exp_scalar(A v) { return std::exp(v); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tasks per at::parallel_for grain so that each grain covers about kGrainElems elements.
int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_task));
}

// ---------------------------------------------------------------------------------
// Shapes and argument checks

struct Geometry {
  int64_t outer;    // N
  int64_t classes;  // C
  int64_t inner;    // d1 * ... * dk (1 for (N, C))
  int64_t rows() const { return outer * inner; }
};

Geometry geometry(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "fused_loss.cross_entropy: expected input of shape (N, C) or (N, C, d1, ..., dk), got ",
              input.sizes());
  int64_t inner = 1;
  for (int64_t d = 2; d < input.dim(); ++d) inner *= input.size(d);
  return {input.size(0), input.size(1), inner};
}

void check_input(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "fused_loss.cross_entropy (CPU kernel): input must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "fused_loss.cross_entropy: expected a floating point input, got ", input.scalar_type());
}

// Class weights as a contiguous vector in the accumulation type (empty when absent).
template <typename A>
std::vector<A> class_weights(const std::optional<at::Tensor>& weight, const at::Tensor& input, int64_t classes) {
  if (!weight.has_value() || !weight->defined()) return {};
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == classes,
              "weight tensor should be defined either for all ", classes,
              " classes or no classes but got weight tensor of shape: ", weight->sizes());
  TORCH_CHECK(weight->scalar_type() == input.scalar_type(), "expected scalar type ", input.scalar_type(),
              " but found ", weight->scalar_type(), " for weight");
  auto w = weight->contiguous().to(c10::CppTypeToScalarType<A>::value);
  const A* wp = w.template data_ptr<A>();
  return std::vector<A>(wp, wp + classes);
}

// Class-index targets as contiguous int64, every one checked before any kernel reads
// through it (a bad target must raise, never index out of bounds).
at::Tensor class_targets(const at::Tensor& target, const at::Tensor& input, const Geometry& g, int64_t ignore_index) {
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte,
              "expected target dtype to be Long or Byte, but got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() >= 1 && target.size(0) == g.outer, "Expected input batch_size (", g.outer,
                    ") to match target batch_size (", target.dim() >= 1 ? target.size(0) : 0, ").");
  std::vector<int64_t> expected{input.size(0)};
  for (int64_t d = 2; d < input.dim(); ++d) expected.push_back(input.size(d));
  TORCH_CHECK(target.sizes() == at::IntArrayRef(expected), "Expected target size ", at::IntArrayRef(expected),
              ", got ", target.sizes());
  auto y = target.to(at::kLong).contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  const int64_t n = y.numel();
  // Find the first bad target in index order, whatever the thread count.
  const int64_t first_bad = at::parallel_reduce(
      0, n, 1 << 16, n,
      [&](int64_t b, int64_t e, int64_t ident) {
        for (int64_t i = b; i < e; ++i) {
          if (yp[i] != ignore_index && (yp[i] < 0 || yp[i] >= g.classes)) return i;
        }
        return ident;
      },
      [](int64_t a, int64_t b) { return std::min(a, b); });
  TORCH_CHECK_INDEX(first_bad == n, "Target ", first_bad < n ? yp[first_bad] : 0,
                    " is out of bounds: expected a class index in [0, ", g.classes, ") or ignore_index (",
                    ignore_index, ")");
  return y;
}

template <typename A>
CrossEntropyParams<A> make_params(double label_smoothing, int64_t classes, const std::vector<A>& w) {
  CrossEntropyParams<A> p;
  p.smooth = label_smoothing > 0.0;  // torch applies no smoothing for values <= 0
  p.eps = p.smooth ? A(label_smoothing) : A(0);
  p.eps_over_c = p.smooth ? A(label_smoothing / double(classes)) : A(0);
  double ws = double(classes);
  if (!w.empty()) {
    ws = 0;
    for (A v : w) ws += v;
  }
  p.w_sum = A(ws);
  return p;
}

// Log-sum-exp of a row from its max and sum of exp(x - max). A row holding NaN or +inf
// gets NaN, as torch's log_softmax gives; the backward turns a NaN lse into NaN
// gradients explicitly, because exp_u20 clamps NaN arguments instead of propagating them.
template <typename A>
A row_lse(A m, A s) {
  if (m == std::numeric_limits<A>::infinity()) return std::numeric_limits<A>::quiet_NaN();
  return m + std::log(s);
}

// Shift for the one-pass class sums: the row's first logit when finite, else 0.
template <typename A>
A row_shift(A x0) { return std::isfinite(x0) ? x0 : A(0); }

// ---------------------------------------------------------------------------------
// Row kernels (inner == 1): one row of C contiguous logits, vectorised along classes.

// Per-line loop over [0, n): f(offset, count), count == kLine<T> except maybe the last.
template <typename T, typename F>
inline void for_each_line(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + kLine<T> <= n; i += kLine<T>) f(i, kLine<T>);
  if (i < n) f(i, n - i);
}

// Same, but the first (partial) line ends where `out + offset` is aligned for
// stream_line, so every full line can be stored non-temporally.
template <typename T, typename F>
inline void for_each_aligned_line(const T* out, int64_t n, F&& f) {
  const auto addr = reinterpret_cast<uintptr_t>(out);
  int64_t head = int64_t((kLineBytes<T> - addr % kLineBytes<T>) % kLineBytes<T>) / int64_t(sizeof(T));
  if (addr % sizeof(T) != 0) head = n;  // misaligned element type: no streaming at all
  head = std::min(head, n);
  if (head > 0) f(int64_t(0), head);
  for_each_line<T>(n - head, [&](int64_t i, int64_t cnt) { f(head + i, cnt); });
}

template <typename T>
inline void load_line_n(const T* p, AccVec<T>* v, int64_t cnt) {
  if (cnt == kLine<T>) load_line(p, v); else load_line(p, v, cnt);
}

// Lanes of vector k of a line of `cnt` elements that hold data.
template <typename T>
inline int64_t lanes_in(int64_t cnt, int k) {
  return std::min<int64_t>(std::max<int64_t>(cnt - k * kLanes<T>, 0), kLanes<T>);
}

template <typename T>
inline void store_or_stream(T* p, const AccVec<T>* v, int64_t cnt) {
  if (cnt == kLine<T>) stream_line(p, v); else store_line(p, v, cnt);
}

// Statistics of one chunk of a row: max, sum of exp(x - max), and up to two extra sums
// that the target kind (`Terms`) gathers in the same pass.
template <typename A>
struct Partial {
  A m = kNegInf<A>;
  A s = A(0);
  A t1 = A(0);
  A t2 = A(0);

  void merge(const Partial& o) {
    merge_max_sumexp(m, s, o.m, o.s, exp_scalar<A>);
    t1 += o.t1;
    t2 += o.t2;
  }
};

// Extra sums for class-index targets with label smoothing: t1 = sum_c w_c (x_c - r).
template <typename T, bool kWeighted>
struct SmoothingTerms {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* w;  // class weights at the chunk's first class
  A r;
  V acc{0};

  // v: the logits of the line at `offset`, cnt of them valid.
  void add(const V* v, int64_t offset, int64_t cnt) {
    for (int k = 0; k < kVecsPerLine<T>; ++k) {
      const int64_t n = lanes_in<T>(cnt, k);
      if (n == 0) break;
      V d = v[k] - V(r);
      if constexpr (kWeighted) d = d * (n == kLanes<T> ? V::loadu(w + offset + k * kLanes<T>) : V::loadu(w + offset + k * kLanes<T>, n));
      acc += keep_first(d, n, A(0));
    }
  }
  void finish(Partial<A>& p) const { p.t1 = reduce_sum(acc); }
};

// Extra sums for probability targets: t1 = sum_c w_c t'_c, t2 = sum_c w_c t'_c (x_c - r).
template <typename T, bool kWeighted>
struct ProbTerms {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* w;
  const T* t;  // targets at the chunk's first class
  A r, one_minus_eps, eps_over_c;
  V swt{0}, swtx{0};

  void add(const V* v, int64_t offset, int64_t cnt) {
    V tv[kVecsPerLine<T>];
    load_line_n(t + offset, tv, cnt);
    for (int k = 0; k < kVecsPerLine<T>; ++k) {
      const int64_t n = lanes_in<T>(cnt, k);
      if (n == 0) break;
      V wt = ce_smoothed_target(tv[k], V(one_minus_eps), V(eps_over_c));
      if constexpr (kWeighted) wt = wt * (n == kLanes<T> ? V::loadu(w + offset + k * kLanes<T>) : V::loadu(w + offset + k * kLanes<T>, n));
      wt = keep_first(wt, n, A(0));
      swt += wt;
      swtx += keep_first(wt * (v[k] - V(r)), n, A(0));
    }
  }
  void finish(Partial<A>& p) const {
    p.t1 = reduce_sum(swt);
    p.t2 = reduce_sum(swtx);
  }
};

// No extra sums (class-index targets without smoothing).
template <typename T>
struct NoTerms {
  void add(const AccVec<T>*, int64_t, int64_t) {}
  void finish(Partial<acc_t<T>>&) const {}
};

// Accumulators per reduction: independent chains hide the latency of max and add.
constexpr int kAcc = 4;

// One chunk of a row, block by block: pass 1 streams the block from memory for its max,
// pass 2 re-reads it from L1 for the sums. One exp per element.
template <typename T, typename Terms>
Partial<acc_t<T>> chunk_stats(const T* x, int64_t n, Terms terms) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int NV = kVecsPerLine<T>;
  Partial<A> part;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const int64_t full = len / (kAcc * kLine<T>) * (kAcc * kLine<T>);  // lines in groups of kAcc
    const T* xb = x + b;
    V acc[kAcc];
    for (auto& a : acc) a = V(kNegInf<A>);
    for (int64_t i = 0; i < full; i += kAcc * kLine<T>) {
      for (int u = 0; u < kAcc; ++u) {
        prefetch(xb + i + u * kLine<T>);
        V v[NV];
        load_line(xb + i + u * kLine<T>, v);
        for (int k = 0; k < NV; ++k) acc[u] = at::vec::maximum(acc[u], v[k]);
      }
    }
    for_each_line<T>(len - full, [&](int64_t i, int64_t cnt) {
      V v[NV];
      load_line_n(xb + full + i, v, cnt);
      for (int k = 0; k < NV; ++k) {
        const int64_t nk = lanes_in<T>(cnt, k);
        if (nk > 0) acc[0] = at::vec::maximum(acc[0], keep_first(v[k], nk, kNegInf<A>));
      }
    });
    const A mb = reduce_max(at::vec::maximum(at::vec::maximum(acc[0], acc[1]), at::vec::maximum(acc[2], acc[3])));
    const V shift(mb == kNegInf<A> ? A(0) : mb);  // an all -inf block adds exp(-inf) = 0
    for (auto& a : acc) a = V(0);
    for (int64_t i = 0; i < full; i += kAcc * kLine<T>) {
      for (int u = 0; u < kAcc; ++u) {
        const int64_t off = i + u * kLine<T>;
        // Fetch the next block while this one is busy with exp, so that pass 1 of the
        // next block finds it in cache.
        prefetch_ahead(xb + off, kBlock * int64_t(sizeof(T)));
        V v[NV];
        load_line(xb + off, v);
        for (int k = 0; k < NV; ++k) acc[u] += (v[k] - shift).exp_u20();
        terms.add(v, b + off, kLine<T>);
      }
    }
    for_each_line<T>(len - full, [&](int64_t i, int64_t cnt) {
      V v[NV];
      load_line_n(xb + full + i, v, cnt);
      for (int k = 0; k < NV; ++k) {
        const int64_t nk = lanes_in<T>(cnt, k);
        if (nk > 0) acc[0] += keep_first((v[k] - shift).exp_u20(), nk, A(0));
      }
      terms.add(v, b + full + i, cnt);
    });
    Partial<A> blk;
    blk.m = mb;
    blk.s = reduce_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    part.merge(blk);
  }
  terms.finish(part);
  return part;
}

// Runs chunk_stats over every (row, chunk) in parallel, then merges each row's chunks in
// order and hands (row, merged partial) to `finish`.
template <typename T, typename MakeTerms, typename Skip, typename Finish>
void row_stats(const T* x, int64_t rows, int64_t classes, MakeTerms make_terms, Skip skip, Finish finish) {
  using A = acc_t<T>;
  const int64_t nchunks = std::max<int64_t>(1, ceil_div(classes, kChunk));
  std::vector<Partial<A>> parts(rows * nchunks);
  at::parallel_for(0, rows * nchunks, grain_for(std::min(classes, kChunk)), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nchunks, c0 = (task % nchunks) * kChunk;
      if (skip(row) || c0 >= classes) continue;
      const T* xr = x + row * classes;
      const A r = row_shift(static_cast<A>(xr[0]));
      parts[task] = chunk_stats<T>(xr + c0, std::min(kChunk, classes - c0), make_terms(row, c0, r));
    }
  });
  at::parallel_for(0, rows, grain_for(nchunks * 8), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (skip(row)) {
        finish(row, Partial<A>{}, A(0));
        continue;
      }
      Partial<A> p = parts[row * nchunks];
      for (int64_t k = 1; k < nchunks; ++k) p.merge(parts[row * nchunks + k]);
      finish(row, p, row_shift(static_cast<A>(x[row * classes])));
    }
  });
}

// Computes a row's gradient chunk by chunk over all (row, chunk) tasks in parallel.
// make_line(row, c0) returns, once per chunk, a functor line(i, v, cnt) that turns the
// logits v of the line at class c0 + i into its gradient, which is stored to `out`
// unless out is null (a line functor may also write other outputs itself). A row for
// which zero(row) holds gets zeros in `out` without its logits being read. `align` is
// the output whose alignment decides which lines are streamed; every output is a fresh
// contiguous tensor of the input's shape, so all share that alignment.
template <typename T, typename Zero, typename MakeLine>
void row_grad(const T* x, T* out, const T* align, int64_t rows, int64_t classes, Zero zero, MakeLine make_line) {
  using V = AccVec<T>;
  const int64_t nchunks = std::max<int64_t>(1, ceil_div(classes, kChunk));
  at::parallel_for(0, rows * nchunks, grain_for(std::min(classes, kChunk)), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nchunks, c0 = (task % nchunks) * kChunk;
      if (c0 >= classes) continue;
      const int64_t n = std::min(kChunk, classes - c0), off = row * classes + c0;
      if (zero(row)) {
        const V zeros[kVecsPerLine<T>] = {};
        for_each_aligned_line(align + off, n, [&](int64_t i, int64_t cnt) { store_or_stream(out + off + i, zeros, cnt); });
        continue;
      }
      auto line = make_line(row, c0);
      for_each_aligned_line(align + off, n, [&](int64_t i, int64_t cnt) {
        prefetch(x + off + i);
        V v[kVecsPerLine<T>];
        load_line_n(x + off + i, v, cnt);
        line(i, v, cnt);
        if (out) store_or_stream(out + off + i, v, cnt);
      });
    }
    stream_fence();
  });
}

// Subtracts `value` at position `lane` of a line held as vectors.
template <typename T>
inline void sub_at(AccVec<T>* v, int64_t lane, acc_t<T> value) {
  using A = acc_t<T>;
  __at_align__ A tmp[kLanes<T>];
  const int k = int(lane / kLanes<T>);
  v[k].store(tmp);
  tmp[lane % kLanes<T>] -= value;
  v[k] = AccVec<T>::loadu(tmp);
}

// ---------------------------------------------------------------------------------
// Column kernels (inner > 1): position j of sample n holds its C logits inner apart;
// a vector covers kLanes consecutive positions, each lane an independent row.

template <typename T, typename Body>
void for_each_column_tile(const Geometry& g, Body body) {
  const int64_t tiles = ceil_div(g.inner, kLanes<T>);
  at::parallel_for(0, g.outer * tiles, grain_for(g.classes * kLanes<T>), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, j0 = (task % tiles) * kLanes<T>;
      body(n, j0, std::min(kLanes<T>, g.inner - j0));
    }
  });
}

// Per-lane max and, with the max known, sum of exp and the extra sums; `terms(c, v, r)`
// adds class c's contribution. Returns lane arrays through the callbacks' captures.
template <typename T, typename Terms>
void column_stats(const T* xb, const Geometry& g, int64_t nl, AccVec<T>& vmax, AccVec<T>& vsum, AccVec<T>& r,
                  Terms terms) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  vmax = V(kNegInf<A>);
  for (int64_t c = 0; c < g.classes; ++c) vmax = at::vec::maximum(vmax, load_vec(xb + c * g.inner, nl));
  const V shift = V::blendv(vmax, V(0), vmax == V(kNegInf<A>));
  const V x0 = g.classes > 0 ? load_vec(xb, nl) : V(0);
  r = V::blendv(V(0), x0, (x0 - x0) == V(0));  // finite lanes keep x0 (inf - inf and NaN are NaN)
  vsum = V(0);
  for (int64_t c = 0; c < g.classes; ++c) {
    const V v = load_vec(xb + c * g.inner, nl);
    vsum += (v - shift).exp_u20();
    terms(c, v, r);
  }
}

// ---------------------------------------------------------------------------------
// Class-index targets

enum class Smooth { kNone, kUniform, kWeighted };

template <typename T, Smooth S>
void class_forward_impl(const T* x, const int64_t* y, const std::vector<acc_t<T>>& w, const Geometry& g,
                        int64_t ignore_index, const CrossEntropyParams<acc_t<T>>& p, acc_t<T>* lse, acc_t<T>* loss) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* wp = w.empty() ? nullptr : w.data();
  auto w_of = [&](int64_t c) { return wp ? wp[c] : A(1); };
  auto finish_row = [&](int64_t row, A m, A s, A r, A sx, A x_y, int64_t yc) {
    lse[row] = row_lse(m, s);
    loss[row] = ce_class_row_loss(p, lse[row], x_y, w_of(yc), r, sx);
  };
  if (g.inner == 1) {
    auto skip = [&](int64_t row) { return y[row] == ignore_index; };
    auto finish = [&](int64_t row, const Partial<A>& pt, A r) {
      if (skip(row)) {
        lse[row] = A(0);
        loss[row] = A(0);
      } else {
        finish_row(row, pt.m, pt.s, r, pt.t1, static_cast<A>(x[row * g.classes + y[row]]), y[row]);
      }
    };
    if constexpr (S == Smooth::kNone) {
      row_stats<T>(x, g.outer, g.classes, [](int64_t, int64_t, A) { return NoTerms<T>{}; }, skip, finish);
    } else {
      row_stats<T>(
          x, g.outer, g.classes,
          [&](int64_t, int64_t c0, A r) { return SmoothingTerms<T, S == Smooth::kWeighted>{wp ? wp + c0 : nullptr, r}; },
          skip, finish);
    }
    return;
  }
  for_each_column_tile<T>(g, [&](int64_t n, int64_t j0, int64_t nl) {
    const T* xb = x + n * g.classes * g.inner + j0;
    V vmax, vsum, r, vx(0);
    column_stats<T>(xb, g, nl, vmax, vsum, r, [&](int64_t c, const V& v, const V& rr) {
      if constexpr (S == Smooth::kUniform) vx += v - rr;
      if constexpr (S == Smooth::kWeighted) vx += (v - rr) * V(wp[c]);
    });
    __at_align__ A am[kLanes<T>], as[kLanes<T>], ar[kLanes<T>], ax[kLanes<T>];
    vmax.store(am), vsum.store(as), r.store(ar), vx.store(ax);
    for (int64_t j = 0; j < nl; ++j) {
      const int64_t row = n * g.inner + j0 + j;
      if (y[row] == ignore_index) {
        lse[row] = A(0);
        loss[row] = A(0);
      } else {
        finish_row(row, am[j], as[j], ar[j], ax[j], static_cast<A>(xb[y[row] * g.inner + j]), y[row]);
      }
    }
  });
}

template <typename T, Smooth S>
void class_backward_impl(const T* x, const int64_t* y, const std::vector<acc_t<T>>& w, const Geometry& g,
                         int64_t ignore_index, const CrossEntropyParams<acc_t<T>>& p, const acc_t<T>* lse,
                         const acc_t<T>* grad_rows, acc_t<T> grad_all, T* dx) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* wp = w.empty() ? nullptr : w.data();
  // g: this row's share of the upstream gradient; 0 for an ignored row.
  auto coefs = [&](int64_t row) {
    if (y[row] == ignore_index) return CrossEntropyClassGrad<A>{A(0), A(0), A(0)};
    auto cf = ce_class_grad_coefs(p, grad_rows ? grad_rows[row] : grad_all, wp ? wp[y[row]] : A(1));
    if (std::isnan(lse[row])) cf.a = lse[row];  // see row_lse
    return cf;
  };
  if (g.inner == 1) {
    auto ignored = [&](int64_t row) { return y[row] == ignore_index; };
    row_grad<T>(x, dx, dx, g.outer, g.classes, ignored, [&](int64_t row, int64_t c0) {
      const auto cf = coefs(row);
      const V vl(lse[row]), va(cf.a), vb(cf.b);
      const A* wc = wp ? wp + c0 : nullptr;
      const int64_t ty = y[row] - c0;  // target position within the chunk
      return [=](int64_t i, V* v, int64_t cnt) {
        for (int k = 0; k < kVecsPerLine<T>; ++k) {
          V o = (v[k] - vl).exp_u20() * va;
          if constexpr (S == Smooth::kUniform) o = o - vb;
          if constexpr (S == Smooth::kWeighted) {
            const int64_t n = lanes_in<T>(cnt, k), c = i + k * kLanes<T>;
            if (n > 0) o = o - vb * (n == kLanes<T> ? V::loadu(wc + c) : V::loadu(wc + c, n));
          }
          v[k] = o;
        }
        if (ty >= i && ty < i + cnt) sub_at<T>(v, ty - i, cf.t_y);
      };
    });
    return;
  }
  for_each_column_tile<T>(g, [&](int64_t n, int64_t j0, int64_t nl) {
    __at_align__ A a[kLanes<T>] = {}, b[kLanes<T>] = {}, ty[kLanes<T>] = {}, yf[kLanes<T>], l[kLanes<T>] = {};
    for (int64_t j = 0; j < kLanes<T>; ++j) {
      yf[j] = A(-1);
      if (j >= nl) continue;
      const int64_t row = n * g.inner + j0 + j;
      const auto cf = coefs(row);
      a[j] = cf.a, b[j] = cf.b, ty[j] = cf.t_y, l[j] = lse[row];
      if (y[row] != ignore_index) yf[j] = A(y[row]);
    }
    const V va = V::loadu(a), vb = V::loadu(b), vty = V::loadu(ty), vy = V::loadu(yf), vl = V::loadu(l);
    const V ignored = vy == V(A(-1));
    const T* xb = x + n * g.classes * g.inner + j0;
    T* ob = dx + n * g.classes * g.inner + j0;
    for (int64_t c = 0; c < g.classes; ++c) {
      const V v = load_vec(xb + c * g.inner, nl);
      V o = (v - vl).exp_u20() * va;
      if constexpr (S == Smooth::kUniform) o = o - vb;
      if constexpr (S == Smooth::kWeighted) o = o - vb * V(wp[c]);
      o = o - V::blendv(V(0), vty, vy == V(A(c)));
      store_vec(ob + c * g.inner, V::blendv(o, V(0), ignored), nl);
    }
  });
}

// ---------------------------------------------------------------------------------
// Probability targets

template <typename T, bool kWeighted>
void prob_forward_impl(const T* x, const T* t, const std::vector<acc_t<T>>& w, const Geometry& g,
                       const CrossEntropyParams<acc_t<T>>& p, acc_t<T>* lse, acc_t<T>* swt_out, acc_t<T>* loss) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* wp = w.empty() ? nullptr : w.data();
  const A ome = A(1) - p.eps;
  auto finish_row = [&](int64_t row, A m, A s, A r, A swt, A swtx) {
    lse[row] = row_lse(m, s);
    swt_out[row] = swt;
    loss[row] = ce_prob_row_loss(lse[row], r, swt, swtx);
  };
  if (g.inner == 1) {
    row_stats<T>(
        x, g.outer, g.classes,
        [&](int64_t row, int64_t c0, A r) {
          return ProbTerms<T, kWeighted>{wp ? wp + c0 : nullptr, t + row * g.classes + c0, r, ome, p.eps_over_c};
        },
        [](int64_t) { return false; },
        [&](int64_t row, const Partial<A>& pt, A r) { finish_row(row, pt.m, pt.s, r, pt.t1, pt.t2); });
    return;
  }
  for_each_column_tile<T>(g, [&](int64_t n, int64_t j0, int64_t nl) {
    const int64_t off = n * g.classes * g.inner + j0;
    V vmax, vsum, r, vswt(0), vswtx(0);
    column_stats<T>(x + off, g, nl, vmax, vsum, r, [&](int64_t c, const V& v, const V& rr) {
      V wt = ce_smoothed_target(load_vec(t + off + c * g.inner, nl), V(ome), V(p.eps_over_c));
      if constexpr (kWeighted) wt = wt * V(wp[c]);
      vswt += wt;
      vswtx += wt * (v - rr);
    });
    __at_align__ A am[kLanes<T>], as[kLanes<T>], ar[kLanes<T>], a1[kLanes<T>], a2[kLanes<T>];
    vmax.store(am), vsum.store(as), r.store(ar), vswt.store(a1), vswtx.store(a2);
    for (int64_t j = 0; j < nl; ++j) finish_row(n * g.inner + j0 + j, am[j], as[j], ar[j], a1[j], a2[j]);
  });
}

// dx_c = g (p_c S - w_c t'_c),  dt_c = g (1 - eps) w_c (lse - x_c).
template <typename T, bool kWeighted>
void prob_backward_impl(const T* x, const T* t, const std::vector<acc_t<T>>& w, const Geometry& g,
                        const CrossEntropyParams<acc_t<T>>& p, const acc_t<T>* lse, const acc_t<T>* swt,
                        const acc_t<T>* grad_rows, acc_t<T> grad_all, T* dx, T* dt) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* wp = w.empty() ? nullptr : w.data();
  const A ome = A(1) - p.eps;
  auto grad_of = [&](int64_t row) { return grad_rows ? grad_rows[row] : grad_all; };
  if (g.inner == 1) {
    // One pass writes both gradients: the input's through row_grad, the target's beside it.
    row_grad<T>(x, dx, dx ? dx : dt, g.outer, g.classes, [](int64_t) { return false; }, [&](int64_t row, int64_t c0) {
      const A gr = grad_of(row);
      const A gs = std::isnan(lse[row]) ? lse[row] : gr * swt[row];  // see row_lse
      const V vl(lse[row]), vgs(gs), vg(gr), vgo(gr * ome), vome(ome), veps(p.eps_over_c);
      const A* wc = wp ? wp + c0 : nullptr;
      const T* tc = t + row * g.classes + c0;
      T* dtc = dt ? dt + row * g.classes + c0 : nullptr;
      return [=](int64_t i, V* v, int64_t cnt) {
        V tv[kVecsPerLine<T>], gt[kVecsPerLine<T>];
        if (dx) load_line_n(tc + i, tv, cnt);
        for (int k = 0; k < kVecsPerLine<T>; ++k) {
          V wv(1);
          if constexpr (kWeighted) {
            const int64_t n = lanes_in<T>(cnt, k), c = i + k * kLanes<T>;
            if (n > 0) wv = n == kLanes<T> ? V::loadu(wc + c) : V::loadu(wc + c, n);
          }
          if (dtc) gt[k] = vgo * wv * (vl - v[k]);
          if (dx) v[k] = (v[k] - vl).exp_u20() * vgs - vg * ce_smoothed_target(tv[k], vome, veps) * wv;
        }
        if (dtc) store_or_stream(dtc + i, gt, cnt);
      };
    });
    return;
  }
  for_each_column_tile<T>(g, [&](int64_t n, int64_t j0, int64_t nl) {
    __at_align__ A gl[kLanes<T>] = {}, gs[kLanes<T>] = {}, l[kLanes<T>] = {};
    for (int64_t j = 0; j < nl; ++j) {
      const int64_t row = n * g.inner + j0 + j;
      gl[j] = grad_of(row), gs[j] = std::isnan(lse[row]) ? lse[row] : gl[j] * swt[row], l[j] = lse[row];
    }
    const V vg = V::loadu(gl), vgs = V::loadu(gs), vl = V::loadu(l), vgo = vg * V(ome);
    const int64_t base = n * g.classes * g.inner + j0;
    for (int64_t c = 0; c < g.classes; ++c) {
      const int64_t off = base + c * g.inner;
      const V v = load_vec(x + off, nl);
      const V wv(wp ? wp[c] : A(1));
      if (dx) {
        const V wt = ce_smoothed_target(load_vec(t + off, nl), V(ome), V(p.eps_over_c)) * wv;
        store_vec(dx + off, (v - vl).exp_u20() * vgs - vg * wt, nl);
      }
      if (dt) store_vec(dt + off, vgo * wv * (vl - v), nl);
    }
  });
}

// ---------------------------------------------------------------------------------
// Operator entry points

template <typename F>
void dispatch_smooth(bool smooth, bool weighted, F f) {
  if (!smooth) {
    f(std::integral_constant<Smooth, Smooth::kNone>{});
  } else if (weighted) {
    f(std::integral_constant<Smooth, Smooth::kWeighted>{});
  } else {
    f(std::integral_constant<Smooth, Smooth::kUniform>{});
  }
}

template <typename F>
void dispatch_bool(bool b, F f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

at::ScalarType acc_type_of(const at::Tensor& input) { return at::toOpMathType(input.scalar_type()); }

// An output of the input's shape, contiguous; large ones come from the output cache.
at::Tensor new_like(const at::Tensor& input) { return empty_cached(input.sizes(), input.options()); }

// Sum of per-row losses in row order (deterministic), in double.
template <typename A>
double sum_rows(const A* v, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(v[i]);
  return s;
}

// 'mean' divides by the summed weight of the non-ignored targets (their count unweighted).
template <typename A>
double class_mean_denominator(const int64_t* y, int64_t n, const std::vector<A>& w, int64_t ignore_index) {
  double d = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] != ignore_index) d += w.empty() ? 1.0 : double(w[y[i]]);
  }
  return d;
}

// Reduced loss from per-row losses: 'none' keeps the rows in `shape`, the others a scalar.
at::Tensor reduce_loss(const at::Tensor& rows, Reduction red, double denominator, at::IntArrayRef shape,
                       const at::Tensor& input) {
  if (red == Reduction::None) return rows.view(shape).to(input.scalar_type());
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "fused_loss_sum_rows",
                             [&] { total = sum_rows(rows.data_ptr<scalar_t>(), rows.numel()); });
  if (red == Reduction::Mean) total /= denominator;  // 0 / 0 is NaN, as in torch
  return at::scalar_tensor(total, input.options());
}

// The upstream gradient: one per row ('none') or one for all rows, already divided by
// the 'mean' denominator.
struct UpstreamGrad {
  at::Tensor rows;  // acc type, contiguous, or undefined
  double all = 0;
};

UpstreamGrad upstream_grad(const at::Tensor& grad_loss, Reduction red, int64_t rows, at::ScalarType acc,
                           double denominator) {
  UpstreamGrad u;
  if (red == Reduction::None) {
    TORCH_CHECK(grad_loss.numel() == rows, "fused_loss.cross_entropy backward: expected a gradient with ", rows,
                " elements for reduction='none', got shape ", grad_loss.sizes());
    u.rows = grad_loss.reshape(-1).to(acc).contiguous();
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "fused_loss.cross_entropy backward: expected a scalar gradient, got shape ",
                grad_loss.sizes());
    u.all = grad_loss.item<double>();
    if (red == Reduction::Mean) u.all /= denominator;
  }
  return u;
}

void check_stats(const at::Tensor& s, const char* name, const Geometry& g, at::ScalarType acc) {
  TORCH_CHECK(s.dim() == 1 && s.size(0) == g.rows() && s.scalar_type() == acc,
              "fused_loss.cross_entropy backward: ", name, " must be a ", acc, " vector of ", g.rows(),
              " elements, got ", s.scalar_type(), " of shape ", s.sizes());
}

void check_smoothing(double label_smoothing) {
  TORCH_CHECK(label_smoothing <= 1.0, "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight,
                                                             int64_t reduction, int64_t ignore_index,
                                                             double label_smoothing) {
  check_input(input);
  check_smoothing(label_smoothing);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  const at::Tensor y = class_targets(target, input, g, ignore_index);
  const at::Tensor x = input.contiguous();
  const auto acc = acc_type_of(input);
  at::Tensor lse = at::empty({g.rows()}, input.options().dtype(acc));
  at::Tensor rows = at::empty({g.rows()}, input.options().dtype(acc));
  double denominator = 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_forward", [&] {
    using A = acc_t<scalar_t>;
    const auto w = class_weights<A>(weight, input, g.classes);
    const auto p = make_params<A>(label_smoothing, g.classes, w);
    dispatch_smooth(p.smooth, !w.empty(), [&](auto S) {
      class_forward_impl<scalar_t, decltype(S)::value>(x.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), w, g,
                                                       ignore_index, p, lse.data_ptr<A>(), rows.data_ptr<A>());
    });
    if (red == Reduction::Mean) denominator = class_mean_denominator(y.data_ptr<int64_t>(), g.rows(), w, ignore_index);
  });
  return {reduce_loss(rows, red, denominator, target.sizes(), input), lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                      int64_t reduction, int64_t ignore_index, double label_smoothing) {
  check_input(input);
  check_smoothing(label_smoothing);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  const at::Tensor y = class_targets(target, input, g, ignore_index);
  const auto acc = acc_type_of(input);
  check_stats(lse, "lse", g, acc);
  const at::Tensor x = input.contiguous();
  const at::Tensor l = lse.contiguous();
  at::Tensor dx = new_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_backward", [&] {
    using A = acc_t<scalar_t>;
    const auto w = class_weights<A>(weight, input, g.classes);
    const auto p = make_params<A>(label_smoothing, g.classes, w);
    const double denominator =
        red == Reduction::Mean ? class_mean_denominator(y.data_ptr<int64_t>(), g.rows(), w, ignore_index) : 1.0;
    const UpstreamGrad u = upstream_grad(grad_loss, red, g.rows(), acc, denominator);
    dispatch_smooth(p.smooth, !w.empty(), [&](auto S) {
      class_backward_impl<scalar_t, decltype(S)::value>(
          x.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), w, g, ignore_index, p, l.data_ptr<A>(),
          u.rows.defined() ? u.rows.data_ptr<A>() : nullptr, A(u.all), dx.data_ptr<scalar_t>());
    });
  });
  return dx;
}

void check_prob_target(const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK(target.sizes() == input.sizes(), "fused_loss.cross_entropy: probability targets must have the input's shape ",
              input.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == input.scalar_type(), "fused_loss.cross_entropy: probability targets must have the input's dtype ",
              input.scalar_type(), ", got ", target.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_forward_cpu(const at::Tensor& input,
                                                                              const at::Tensor& target,
                                                                              const std::optional<at::Tensor>& weight,
                                                                              int64_t reduction,
                                                                              double label_smoothing) {
  check_input(input);
  check_smoothing(label_smoothing);
  check_prob_target(input, target);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  const auto acc = acc_type_of(input);
  at::Tensor lse = at::empty({g.rows()}, input.options().dtype(acc));
  at::Tensor swt = at::empty({g.rows()}, input.options().dtype(acc));
  at::Tensor rows = at::empty({g.rows()}, input.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_prob_forward", [&] {
    using A = acc_t<scalar_t>;
    const auto w = class_weights<A>(weight, input, g.classes);
    const auto p = make_params<A>(label_smoothing, g.classes, w);
    dispatch_bool(!w.empty(), [&](auto W) {
      prob_forward_impl<scalar_t, decltype(W)::value>(x.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), w, g, p,
                                                      lse.data_ptr<A>(), swt.data_ptr<A>(), rows.data_ptr<A>());
    });
  });
  std::vector<int64_t> shape{input.size(0)};
  for (int64_t d = 2; d < input.dim(); ++d) shape.push_back(input.size(d));
  // 'mean' averages over rows, whatever the weights (torch's rule for probability targets).
  return {reduce_loss(rows, red, double(g.rows()), shape, input), lse, swt};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_prob_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& swt, int64_t reduction,
    double label_smoothing, bool input_grad, bool target_grad) {
  check_input(input);
  check_smoothing(label_smoothing);
  check_prob_target(input, target);
  const Reduction red = to_reduction(reduction);
  const Geometry g = geometry(input);
  const auto acc = acc_type_of(input);
  check_stats(lse, "lse", g, acc);
  check_stats(swt, "swt", g, acc);
  const at::Tensor x = input.contiguous(), t = target.contiguous(), l = lse.contiguous(), s = swt.contiguous();
  at::Tensor dx = input_grad ? new_like(input) : at::empty({0}, input.options());
  at::Tensor dt = target_grad ? new_like(target) : at::empty({0}, target.options());
  const UpstreamGrad u = upstream_grad(grad_loss, red, g.rows(), acc, double(g.rows()));
  if (!input_grad && !target_grad) return {dx, dt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_loss_cross_entropy_prob_backward", [&] {
    using A = acc_t<scalar_t>;
    const auto w = class_weights<A>(weight, input, g.classes);
    const auto p = make_params<A>(label_smoothing, g.classes, w);
    dispatch_bool(!w.empty(), [&](auto W) {
      prob_backward_impl<scalar_t, decltype(W)::value>(
          x.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), w, g, p, l.data_ptr<A>(), s.data_ptr<A>(),
          u.rows.defined() ? u.rows.data_ptr<A>() : nullptr, A(u.all),
          input_grad ? dx.data_ptr<scalar_t>() : nullptr, target_grad ? dt.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {dx, dt};
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu

TORCH_LIBRARY_IMPL(fused_loss, CPU, m) {
  using namespace fused_loss::cpu;
  m.impl("cross_entropy_forward", &cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
  m.impl("cross_entropy_prob_forward", &cross_entropy_prob_forward_cpu);
  m.impl("cross_entropy_prob_backward", &cross_entropy_prob_backward_cpu);
}
