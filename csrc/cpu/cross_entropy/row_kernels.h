// Row kernels of cross-entropy (inner == 1): one row of C contiguous logits, vectorised
// along the classes.
//
// Determinism. A row is cut into fixed chunks of kChunk classes (its unit of parallel
// work when rows are few) and each chunk into kBlock-sized blocks; partial results are
// always merged in the same order, so the bits do not depend on the thread count.
#pragma once

#include "common.h"
#include "logits.h"

namespace fused_loss::cpu {
inline namespace CPU_CAPABILITY {
namespace ce {


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

// Vector k of a line of cnt per-class values (class weights) in the accumulation type at p;
// the lanes past cnt are 0 and never read.
template <typename T>
inline AccVec<T> load_class_values(const acc_t<T>* p, int k, int64_t cnt) {
  const int64_t n = lanes_in<T>(cnt, k);
  if (n == kLanes<T>) return AccVec<T>::loadu(p + k * kLanes<T>);
  return n > 0 ? AccVec<T>::loadu(p + k * kLanes<T>, n) : AccVec<T>(0);
}

template <typename T>
inline void store_or_stream(T* p, const AccVec<T>* v, int64_t cnt) {
  if (cnt == kLine<T>) stream_line(p, v); else store_line(p, v, cnt);
}

// Statistics of part of a row: its max m, the sum s of exp(x - m), and what the target kind
// (`Terms`) gathers beside them: a linear sum `lin` = sum_c u_c (x_c - shift_of(m)) of weights
// u_c whose total is `mass` (label smoothing: the class weights; probability targets: the
// weighted smoothed targets). Sums are kept relative to the part's own max, never to a logit
// that may be far from it (a first logit of -1e9 would cancel every digit of the others), and
// are moved to the merged max exactly when parts merge: (shift_a - shift) * mass_a.
// Shaped logits (logits.h) also keep h = sum exp(z - m) (z - m) for the entropy, moved to a
// new max M as exp(m - M) (h + (m - M) s).
template <typename A>
struct Partial {
  A m = kNegInf<A>;
  A s = A(0);
  A lin = A(0);
  A mass = A(0);
  A h = A(0);
  A raw = kNegInf<A>;  // the max of the logits before shaping (for `correct`)

  void merge(const Partial& o) {
    if (!(o.raw <= raw)) raw = o.raw;  // NaN wins
    const A ref_a = shift_of(m), ref_b = shift_of(o.m);
    const A m_a = m, s_a = s;
    merge_max_sumexp(m, s, o.m, o.s, exp_scalar<A>);
    const A ref = shift_of(m);
    lin = (lin + (ref_a - ref) * mass) + (o.lin + (ref_b - ref) * o.mass);
    mass += o.mass;
    h = moved_h(h, m_a, s_a) + moved_h(o.h, o.m, o.s);
  }

 private:
  A moved_h(A h_p, A m_p, A s_p) const {
    if (s_p == A(0)) return A(0);  // an empty or all -inf part
    const A d = m_p - m;
    return exp_scalar(d) * (h_p + d * s_p);
  }
};

// Extra sums for class-index targets with label smoothing: lin = sum_c w_c (x_c - shift),
// mass = sum_c w_c (w = 1 without weights).
template <typename T, bool kWeighted>
struct SmoothingTerms {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* w;  // class weights at the chunk's first class
  CompensatedSum<A> acc;
  V wacc{0};

  // v: the logits of the line at `offset`, cnt of them valid; shift: the block's.
  void add(const V* v, int64_t offset, int64_t cnt, const V& shift) {
    for (int k = 0; k < kVecsPerLine<T>; ++k) {
      const int64_t n = lanes_in<T>(cnt, k);
      if (n == 0) break;
      V d = v[k] - shift;
      if constexpr (kWeighted) {
        const V wv = load_class_values<T>(w + offset, k, cnt);
        d = d * wv;
        wacc += wv;  // loadu(p, n) zero-fills the other lanes
      } else {
        wacc += keep_first(V(1), n, A(0));
      }
      acc.add(keep_first(d, n, A(0)));
    }
  }
  // The block's sums into its partial, then start the next block.
  void flush(Partial<A>& p) {
    p.lin = acc.total();
    p.mass = reduce_sum(wacc);
    acc = {}, wacc = V(0);
  }
};

// Extra sums for probability targets: mass = sum_c w_c t'_c, lin = sum_c w_c t'_c (x_c - shift).
template <typename T, bool kWeighted>
struct ProbTerms {
  using A = acc_t<T>;
  using V = AccVec<T>;
  const A* w;
  const T* t;  // targets at the chunk's first class
  A one_minus_eps, eps_over_c;
  V swt{0};
  CompensatedSum<A> swtx;

  void add(const V* v, int64_t offset, int64_t cnt, const V& shift) {
    V tv[kVecsPerLine<T>];
    load_line_n(t + offset, tv, cnt);
    for (int k = 0; k < kVecsPerLine<T>; ++k) {
      const int64_t n = lanes_in<T>(cnt, k);
      if (n == 0) break;
      V wt = ce_smoothed_target(tv[k], V(one_minus_eps), V(eps_over_c));
      if constexpr (kWeighted) wt = wt * load_class_values<T>(w + offset, k, cnt);
      wt = keep_first(wt, n, A(0));
      swt += wt;
      swtx.add(keep_first(wt * (v[k] - shift), n, A(0)));
    }
  }
  void flush(Partial<A>& p) {
    p.mass = reduce_sum(swt);
    p.lin = swtx.total();
    swt = V(0), swtx = {};
  }
};

// No extra sums (class-index targets without smoothing).
template <typename T>
struct NoTerms {
  void add(const AccVec<T>*, int64_t, int64_t, const AccVec<T>&) {}
  void flush(Partial<acc_t<T>>&) {}
};

// Accumulators per reduction: independent chains hide the latency of max and add.
constexpr int kAcc = 4;

// The max of the raw logits of one block; block_max: of z, the raw max mapped (the maps of
// logits.h are non-decreasing). Pass 1 of chunk_stats, and of a gradient that recomputes it.
template <typename T>
acc_t<T> block_max_raw(const T* xb, int64_t len) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int NV = kVecsPerLine<T>;
  const int64_t full = len / (kAcc * kLine<T>) * (kAcc * kLine<T>);  // lines in groups of kAcc
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
  return reduce_max(at::vec::maximum(at::vec::maximum(acc[0], acc[1]), at::vec::maximum(acc[2], acc[3])));
}

template <typename T, typename Logits>
acc_t<T> block_max(const T* xb, int64_t len, const Logits& logits) {
  return logits.scalar(block_max_raw(xb, len));
}

// What the statistics pass keeps of a chunk for its gradient (any may be null): each block's
// max of z (indexed by block), and per class e = exp(z - shift of its block) and, where it
// varies (softcap), dz/dx. The gradient then needs no exp (and no tanh) of its own: one per element.
template <typename A>
struct BlockOut {
  A* maxima = nullptr;
  A* e = nullptr;
  A* slope = nullptr;
};

// One chunk of a row, block by block: pass 1 streams the block from memory for its max,
// pass 2 re-reads it from L1 for the sums. One exp per element. `logits` maps the loaded
// logits (see logits.h); Terms see the mapped ones. `out`: see BlockOut.
// after_block(b, len): called when block [b, b + len) of the chunk is done (the one-pass
// forward writes the previous row's gradient there, see row_stats_and_grad).
struct NoHook {
  void operator()(int64_t, int64_t) const {}
};

template <typename T, typename Terms, typename Logits = PlainLogits<T>, typename AfterBlock = NoHook>
Partial<acc_t<T>> chunk_stats(const T* x, int64_t n, Terms terms, const Logits& logits = {},
                              BlockOut<acc_t<T>> out = {}, AfterBlock after_block = {}) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int NV = kVecsPerLine<T>;
  Partial<A> part;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const int64_t full = len / (kAcc * kLine<T>) * (kAcc * kLine<T>);  // lines in groups of kAcc
    const T* xb = x + b;
    const A raw = block_max_raw(xb, len), mb = logits.scalar(raw);
    if (out.maxima) out.maxima[b / kBlock] = mb;
    // Stores e (and dz/dx) of a line at class b + off for the gradient.
    auto keep = [&](int64_t off, const V* e, const V* slope) {
      if (!out.e) return;
      for (int k = 0; k < NV; ++k) e[k].store(out.e + b + off + k * kLanes<T>);
      if (out.slope) {
        for (int k = 0; k < NV; ++k) slope[k].store(out.slope + b + off + k * kLanes<T>);
      }
    };
    // z of a loaded line, with dz/dx when it is kept.
    auto map = [&](V* v, V* slope) {
      if constexpr (Logits::kShaped) {
        if (out.slope) logits.apply(v, slope); else logits.apply(v);
      }
    };
    V acc[kAcc];
    // One shift for the exp and the linear sums (see Partial): an all -inf block adds
    // exp(-inf) = 0; a block whose max is +inf or NaN makes its row NaN (row_lse) anyway.
    const V shift(shift_of(mb));
    for (auto& a : acc) a = V(0);
    V hacc(0);  // shaped logits: the entropy sum
    for (int64_t i = 0; i < full; i += kAcc * kLine<T>) {
      for (int u = 0; u < kAcc; ++u) {
        const int64_t off = i + u * kLine<T>;
        // Fetch the next block while this one is busy with exp, so that pass 1 of the
        // next block finds it in cache.
        prefetch_ahead(xb + off, kBlock * int64_t(sizeof(T)));
        V v[NV], e[NV], slope[NV];
        load_line(xb + off, v);
        map(v, slope);
        for (int k = 0; k < NV; ++k) {
          const V d = v[k] - shift;
          e[k] = d.exp_u20();
          acc[u] += e[k];
          if constexpr (Logits::kEntropy) hacc += entropy_term(e[k], d);
        }
        keep(off, e, slope);
        terms.add(v, b + off, kLine<T>, shift);
      }
    }
    for_each_line<T>(len - full, [&](int64_t i, int64_t cnt) {
      V v[NV], e[NV], slope[NV];
      load_line_n(xb + full + i, v, cnt);
      map(v, slope);
      for (int k = 0; k < NV; ++k) {
        const V d = v[k] - shift;
        e[k] = d.exp_u20();  // lanes past cnt are kept too (the scratch is padded), never summed
        const int64_t nk = lanes_in<T>(cnt, k);
        if (nk == 0) continue;
        const V ek = keep_first(e[k], nk, A(0));
        acc[0] += ek;
        if constexpr (Logits::kEntropy) hacc += keep_first(entropy_term(ek, d), nk, A(0));
      }
      keep(full + i, e, slope);
      terms.add(v, b + full + i, cnt, shift);
    });
    Partial<A> blk;
    blk.m = mb;
    blk.raw = raw;
    blk.s = reduce_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    blk.h = reduce_sum(hacc);
    terms.flush(blk);
    part.merge(blk);
    after_block(b, len);
  }
  return part;
}

inline int64_t blocks_of(int64_t classes) { return ceil_div(classes, kBlock); }

// Runs chunk_stats over every (row, chunk) in parallel, then merges each row's chunks in
// order and hands (row, merged partial) to `finish`.
// maxima: null, or rows x blocks_of(classes) block maxima kept for a gradient (BlockOut).
template <typename T, typename MakeTerms, typename Skip, typename Finish, typename Logits = PlainLogits<T>>
void row_stats(const T* x, int64_t rows, int64_t classes, MakeTerms make_terms, Skip skip, Finish finish,
               const Logits& logits = {}, acc_t<T>* maxima = nullptr) {
  using A = acc_t<T>;
  const int64_t nchunks = std::max<int64_t>(1, ceil_div(classes, kChunk)), nblocks = blocks_of(classes);
  std::vector<Partial<A>> parts(rows * nchunks);
  at::parallel_for(0, rows * nchunks, grain_for(std::min(classes, kChunk)), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nchunks, c0 = (task % nchunks) * kChunk;
      if (skip(row) || c0 >= classes) continue;
      BlockOut<A> out;
      if (maxima) out.maxima = maxima + row * nblocks + c0 / kBlock;
      parts[task] =
          chunk_stats<T>(x + row * classes + c0, std::min(kChunk, classes - c0), make_terms(row, c0), logits, out);
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
      finish(row, p, shift_of(p.m));
    }
  });
}

// Zeros for n classes of `out` (ignored rows), streamed where aligned.
template <typename T>
inline void zero_fill(T* out, int64_t n) {
  const AccVec<T> zeros[kVecsPerLine<T>] = {};
  for_each_aligned_line(out, n, [&](int64_t i, int64_t cnt) { store_or_stream(out + i, zeros, cnt); });
}

// ---------------------------------------------------------------------------------
// Gradients from block-relative exponentials
//
// A block's softmax is e_c * f with e_c = exp(z_c - shift of the block's max mb) and one
// factor f = exp(mb - m) * (the row's coefficient) per block: e_c is what the statistics pass
// already computed, so the one-pass forward keeps it (L2) and spends one exp per element.
// Every path computes e_c the same way (kept, or recomputed from the logits with the block's
// max kept or found again), so the bits do not depend on the path or the thread count.

// Where a gradient takes each block's e (and dz/dx) from: all null, it recomputes them from
// the logits, finding each block's max with a pass of its own.
template <typename A>
struct BlockIn {
  const A* maxima = nullptr;  // per block of the row
  const A* e = nullptr;       // per class of the row
  const A* slope = nullptr;   // per class; null with e: shaped logits' constant slope
};

// The gradient of classes [c0, c0 + n) of one row (x and out at the row's start; c0 a
// multiple of kBlock). make_block(c, mb) returns, for the block at class c with max mb, a
// functor line(i, e, slope, cnt) that turns the e of the line at class c + i into its
// gradient (the functor may also write other outputs itself). ahead: prefetch distance
// (elements) in the logits: by default a little way along the row; in the one-pass forward,
// the same place in the next row, which the next statistics pass then finds in cache while
// this row's gradient is being written; 0: none (the pipelined forward, whose statistics pass
// reads ahead itself).
// flatten: GCC otherwise stops inlining Vectorized::exp_u20 into this loop (a call per vector
// costs a third of the pass).
template <typename T, typename Logits, typename MakeBlock>
FL_FLATTEN inline void grad_blocks(const T* x, T* out, int64_t c0, int64_t n, BlockIn<acc_t<T>> in,
                                                 const Logits& logits, const MakeBlock& make_block, int64_t ahead) {
  using A = acc_t<T>;
  using V = AccVec<T>;
  constexpr int NV = kVecsPerLine<T>;
  for (int64_t b = c0; b < c0 + n; b += kBlock) {
    const int64_t len = std::min(kBlock, c0 + n - b);
    const A mb = in.maxima ? in.maxima[b / kBlock] : block_max(x + b, len, logits);
    const V shift(shift_of(mb));
    const auto line = make_block(b, mb);
    for_each_aligned_line(out + b, len, [&](int64_t i, int64_t cnt) {
      if (ahead != 0) __builtin_prefetch(x + b + i + ahead, 0, 3);
      V e[NV], slope[NV];
      if (in.e) {
        for (int k = 0; k < NV; ++k) e[k] = V::loadu(in.e + b + i + k * kLanes<T>);
        if constexpr (Logits::kShaped) {
          for (int k = 0; k < NV; ++k) slope[k] = in.slope ? V::loadu(in.slope + b + i + k * kLanes<T>) : V(logits.inv_t);
        }
      } else {
        load_line_n(x + b + i, e, cnt);
        if constexpr (Logits::kShaped) logits.apply(e, slope);
        for (int k = 0; k < NV; ++k) e[k] = (e[k] - shift).exp_u20();
      }
      line(i, e, slope, cnt);
      store_or_stream(out + b + i, e, cnt);
    });
  }
}

// Every row's gradient, (row, chunk) tasks in parallel, e recomputed; maxima: the forward's
// block maxima (rows x blocks_of(classes)) or null to find them again.
template <typename T, typename Zero, typename MakeBlock, typename Logits>
void row_block_grad(const T* x, T* out, int64_t rows, int64_t classes, Zero zero, const MakeBlock& make_block,
                    const Logits& logits, const acc_t<T>* maxima = nullptr) {
  const int64_t nchunks = std::max<int64_t>(1, ceil_div(classes, kChunk)), nblocks = blocks_of(classes);
  at::parallel_for(0, rows * nchunks, grain_for(std::min(classes, kChunk)), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nchunks, c0 = (task % nchunks) * kChunk;
      if (c0 >= classes) continue;
      const int64_t n = std::min(kChunk, classes - c0);
      if (zero(row)) {
        zero_fill(out + row * classes + c0, n);
        continue;
      }
      BlockIn<acc_t<T>> in;
      if (maxima) in.maxima = maxima + row * nblocks;
      grad_blocks(x + row * classes, out + row * classes, c0, n, in, logits,
                  [&](int64_t c, acc_t<T> mb) { return make_block(row, c, mb); },
                  kPrefetchBytes / int64_t(sizeof(T)));
    }
    stream_fence();
  });
}

// row_stats, then the gradient, in one pass when rows are many: each task takes whole rows and
// computes a row's gradient from the block maxima and e that its statistics pass kept in a
// per-task scratch (a row's e fits in L2: 128 KB for 32k float classes): one read of the
// logits from memory, one exp per element, one write of the gradient. Rows are pipelined:
// block b of row r's gradient is written right after block b of row r + 1's statistics, so
// that the exps of one keep the core busy while the stores of the other drain (two scratch
// rows). Too few rows to share out: row_stats keeps the block maxima and row_block_grad
// recomputes e from them. `finish` must have stored what make_block(row, ...) reads.
template <typename T, typename MakeTerms, typename Skip, typename Finish, typename MakeBlock,
          typename Logits = PlainLogits<T>>
void row_stats_and_grad(const T* x, T* out, int64_t rows, int64_t classes, MakeTerms make_terms, Skip skip,
                        Finish finish, const MakeBlock& make_block, const Logits& logits = {}) {
  using A = acc_t<T>;
  const int64_t nblocks = blocks_of(classes);
  if (rows < 4 * int64_t(at::get_num_threads()) || classes == 0) {  // too few rows to share out: split them
    std::vector<A> maxima(std::max<int64_t>(1, rows * nblocks));
    row_stats<T>(x, rows, classes, make_terms, skip, finish, logits, maxima.data());
    row_block_grad<T>(x, out, rows, classes, skip, make_block, logits, maxima.data());
    return;
  }
  at::parallel_for(0, rows, grain_for(classes), [&](int64_t begin, int64_t end) {
    const int64_t padded = classes + kLine<T>;  // whole vectors are kept, past the row's end too
    const bool varies = logits.slope_varies();
    // Two of each: the row whose statistics are being computed and the row before it.
    std::vector<A> maxima(2 * nblocks), e(2 * padded), slope(varies ? 2 * padded : 0);
    auto out_of = [&](int k) {  // scratch k, from class 0
      return BlockOut<A>{maxima.data() + k * nblocks, e.data() + k * padded, varies ? slope.data() + k * padded : nullptr};
    };
    auto in_of = [&](int k) {
      const BlockOut<A> o = out_of(k);
      return BlockIn<A>{o.maxima, o.e, o.slope};
    };
    int64_t prev = -1;  // the row whose gradient is pending
    int k = 0;          // the scratch of the current row; prev's is 1 - k
    // The gradient of prev's classes [c, c + n); ahead: prefetch distance (see grad_blocks).
    auto prev_grad = [&](int64_t c, int64_t n, int64_t ahead) {
      if (prev < 0) return;
      const int64_t row = prev;
      grad_blocks(x + row * classes, out + row * classes, c, n, in_of(1 - k), logits,
                  [&](int64_t cb, A mb) { return make_block(row, cb, mb); }, ahead);
    };
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * classes;
      if (skip(row)) {
        prev_grad(0, classes, kPrefetchBytes / int64_t(sizeof(T)));
        prev = -1;
        finish(row, Partial<A>{}, A(0));
        zero_fill(out + row * classes, classes);
        continue;
      }
      const BlockOut<A> cur = out_of(k);
      Partial<A> p;
      for (int64_t c0 = 0; c0 < classes; c0 += kChunk) {
        const BlockOut<A> kept{cur.maxima + c0 / kBlock, cur.e + c0, cur.slope ? cur.slope + c0 : nullptr};
        // The previous row's gradient of each block once this row's block is read: its stores
        // overlap the next block's exps; nothing to prefetch (this row's statistics read ahead).
        auto after = [&](int64_t b, int64_t len) { prev_grad(c0 + b, len, 0); };
        const Partial<A> q = chunk_stats<T>(xr + c0, std::min(kChunk, classes - c0), make_terms(row, c0), logits,
                                            kept, after);
        if (c0 == 0) p = q; else p.merge(q);
      }
      finish(row, p, shift_of(p.m));
      prev = row;
      k = 1 - k;
    }
    prev_grad(0, classes, kPrefetchBytes / int64_t(sizeof(T)));
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

}  // namespace ce
}  // namespace CPU_CAPABILITY
}  // namespace fused_loss::cpu
