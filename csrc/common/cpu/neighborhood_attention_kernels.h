// Neighborhood-attention CPU kernels (torch-free: raw pointers, sizes and a thread pool passed
// in). The torch launchers, argument checks and op registration live in
// csrc/pytorch/cpu/neighborhood_attention_cpu.cpp; the window rule in ../neighborhood_attention.h
// (shared with the CUDA kernels); the per-slot-list primitives in
// neighborhood_attention_primitives.h.
//
// Every problem is seen as 3-D (1-D and 2-D inputs get leading axes of size 1). One query at a
// time: the keys of its window are listed once as offsets, then logits (dot products over
// head_dim), softmax and the weighted sum run over that list. float32 with head_dim % 8 == 0
// uses AVX2+FMA kernels chosen at run time (8 slots' dot products reduced together, the
// weighted sum in registers, the polynomial exp of avx2_math.h); everything else runs
// generic loops with float32 (float64 for float64) accumulation.
//
// Backward (flash style): p is recomputed from the saved log-sum-exp. Race freedom and
// determinism come from the task layout: tasks are blocks of 2k-2 rows of one dilation group
// along the outermost non-trivial axis, and blocks of even then odd index run in two phases,
// so two tasks that run together never touch the same key. The rpb gradient is accumulated
// per task and summed in task order. A task walks its query rows in pieces (kPieceRows rows,
// strips of 64 columns on wide maps to stay in L2) and does each piece in two passes: query
// by query (logits and dO . V in one sweep over the window, p, ds, dQ), then key by key (dK
// and dV of every key the piece reaches, summed over the contiguous run of each query row's
// queries whose windows hold it, so each key's gradient rows are read and written once per
// piece; the AVX2 path takes keys in pairs so that a query row loaded once feeds both).
// When the last axis is not causal, every query of a row shares one slot list and a table of
// its rpb values (FixedRow), so the per-query work is only the dot products and sums.
// dK and dV are not zero-filled first: a per-key flag says whether its rows were written yet,
// and the first write stores instead of adding.
//
// Threads: every kernel takes the launcher's pool as `par` (csrc/pytorch/cpu/aten_parallel.h
// wraps at::parallel_for): par.for_range(begin, end, grain, f) runs f(b, e) on disjoint chunks
// of [begin, end), par.num_threads() and par.thread_num() give the pool size and the calling
// worker's index (per-thread scratch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/avx2_math.h"
#include "cpu/neighborhood_attention_primitives.h"
#include "neighborhood_attention.h"

namespace mmboat {
namespace cpu {
namespace na {

using ::mmboat::na::AxisWindow;
using ::mmboat::na::Shape3d;
using ::mmboat::na::axis_window;

// Key rows (fixed leading coordinates) one window may span: prod(kernel_size[:-1]) <= this.
constexpr int kMaxWindowRows = 512;

// ------------------------------------------------------------------------------------------
// Problem description and the window of one query.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
struct Problem {
  using acc_t = typename AccType<scalar_t>::type;
  Shape3d s;
  acc_t scale = 1;
  const scalar_t* rpb = nullptr;  // [heads, bias extents...]
  int64_t bstride[3] = {0, 0, 0};  // rpb strides of the three axes
};

// Slot lists of the queries in one row (fixed first two coordinates).
struct RowWindow {
  int nrows = 0;
  int64_t row_off[kMaxWindowRows];   // token offset of each valid (axis0, axis1) key row
  int64_t row_bias[kMaxWindowRows];  // rpb offset of each valid key row (within one head)
  int row_slot[kMaxWindowRows];  // full-layout slot of the row's first key (a * k1 + b) * k2
};

template <typename scalar_t>
MMBOAT_INLINE void build_row(const Problem<scalar_t>& P, int64_t t, int64_t h, RowWindow& rw) {
  const Shape3d& s = P.s;
  const AxisWindow w0 = axis_window(int(t), int(s.size[0]), s.kernel[0], s.dilation[0],
                                    s.causal[0]);
  const AxisWindow w1 = axis_window(int(h), int(s.size[1]), s.kernel[1], s.dilation[1],
                                    s.causal[1]);
  rw.nrows = 0;
  for (int a = 0; a < w0.count; ++a) {
    for (int b = 0; b < w1.count; ++b) {
      const int64_t kt = w0.start + int64_t(a) * s.dilation[0];
      const int64_t kh = w1.start + int64_t(b) * s.dilation[1];
      rw.row_off[rw.nrows] = (kt * s.size[1] + kh) * s.size[2];
      rw.row_bias[rw.nrows] =
          (w0.bias_start + a) * P.bstride[0] + (w1.bias_start + b) * P.bstride[1];
      rw.row_slot[rw.nrows] = (a * s.kernel[1] + b) * s.kernel[2];
      ++rw.nrows;
    }
  }
}

// Element offsets (relative to the (b, head) base) and rpb offsets of the valid slots of query
// column w; returns their count. `slot` receives full-layout slot indices when not null.
template <typename scalar_t>
MMBOAT_INLINE int build_slots(const Problem<scalar_t>& P, const RowWindow& rw, int64_t w,
                              int64_t* __restrict off, int64_t* __restrict bias,
                              int* __restrict slot) {
  const Shape3d& s = P.s;
  const AxisWindow w2 = axis_window(int(w), int(s.size[2]), s.kernel[2], s.dilation[2],
                                    s.causal[2]);
  const int64_t dim = s.dim;
  const int64_t step = int64_t(s.dilation[2]) * dim;
  int n = 0;
  for (int r = 0; r < rw.nrows; ++r) {
    int64_t o = (rw.row_off[r] + w2.start) * dim;
    const int64_t bo = rw.row_bias[r] + w2.bias_start;
    for (int c = 0; c < w2.count; ++c, ++n, o += step) {
      off[n] = o;
      bias[n] = bo + c;
      if (slot) slot[n] = rw.row_slot[r] + c;
    }
  }
  return n;
}

// Slot lists shared by every query of one (axis0, axis1) row when the last axis is not causal
// (all windows then have the same shape): element offsets relative to the window's first key,
// rpb indices relative to the window's bias start, and the rpb values of every possible bias
// start (0 .. k2 - 1) laid out per slot, so a query adds its bias with one contiguous read.
template <typename acc_t>
struct FixedRow {
  int n = 0;
  std::vector<int64_t> off, bidx;
  std::vector<acc_t> bias;  // [k2][n]
};

template <typename scalar_t, typename acc_t>
MMBOAT_INLINE void build_fixed(const Problem<scalar_t>& P, const RowWindow& rw,
                               const scalar_t* rpb, FixedRow<acc_t>& fr) {
  const Shape3d& s = P.s;
  const int k2 = s.kernel[2];
  const int64_t d2 = s.dilation[2];
  fr.n = rw.nrows * k2;
  fr.off.resize(fr.n);
  fr.bidx.resize(fr.n);
  for (int r = 0; r < rw.nrows; ++r)
    for (int c = 0; c < k2; ++c) {
      fr.off[r * k2 + c] = (rw.row_off[r] + c * d2) * s.dim;
      fr.bidx[r * k2 + c] = rw.row_bias[r] + c;
    }
  if (rpb) {
    fr.bias.resize(int64_t(k2) * fr.n + 8);
    for (int bs = 0; bs < k2; ++bs)
      for (int j = 0; j < fr.n; ++j)
        fr.bias[bs * fr.n + j] = static_cast<acc_t>(rpb[fr.bidx[j] + bs]);
  }
}

// ------------------------------------------------------------------------------------------
// Task layout of the scatter (backward) kernels.
// ------------------------------------------------------------------------------------------
struct TaskGrid {
  int axis = 0;       // blocked axis
  int64_t block = 1;  // in-group indices per block
  int64_t groups = 1, blocks = 1;  // per (b, head)
  int64_t per_bh() const { return groups * blocks; }
};

inline TaskGrid make_grid(const Shape3d& s) {
  TaskGrid g;
  g.axis = s.size[0] > 1 ? 0 : (s.size[1] > 1 ? 1 : 2);
  const int k = s.kernel[g.axis];
  const int d = s.dilation[g.axis];
  g.block = std::max(2 * k - 2, 1);
  g.groups = d;
  const int64_t max_group_len = (s.size[g.axis] + d - 1) / d;
  g.blocks = (max_group_len + g.block - 1) / g.block;
  return g;
}

// Runs fn(task, bh, t, h, nh, w_begin, w_end, w_step) over every query row piece of each
// task, in two phases (even blocks, then odd blocks) so concurrently running tasks write
// disjoint keys. `task` indexes [0, batch * heads * per_bh). A piece blocked along axis 1
// covers nh <= piece_rows rows of the task's group: h, h + dilation, ...; otherwise nh is 1.
template <class Parallel, typename Fn>
void run_phased(const Parallel& par, const Shape3d& s, const TaskGrid& g, int piece_rows,
                const Fn& fn) {
  const int64_t bh_count = s.batch * s.heads;
  const int64_t half = (g.blocks + 1) / 2;
  for (int phase = 0; phase < 2; ++phase) {
    const int64_t nblocks = phase == 0 ? half : g.blocks / 2;
    const int64_t ntasks = bh_count * g.groups * nblocks;
    if (ntasks == 0) continue;
    par.for_range(0, ntasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / (g.groups * nblocks);
        const int64_t rem = i % (g.groups * nblocks);
        const int64_t grp = rem / nblocks;
        const int64_t blk = 2 * (rem % nblocks) + phase;
        const int64_t task = (bh * g.groups + grp) * g.blocks + blk;
        const int d = s.dilation[g.axis];
        const int64_t first = (blk * g.block) * d + grp;
        const int64_t last = std::min(((blk + 1) * g.block) * d + grp, s.size[g.axis]);
        if (first >= s.size[g.axis]) continue;
        // Wide maps are walked in strips of kStrip columns so that the keys (and their
        // gradient rows) of consecutive query rows stay in the L2 cache.
        constexpr int64_t kStrip = 64;
        const int one = 1;
        if (g.axis == 2) {
          fn(task, bh, int64_t(0), int64_t(0), one, first, last, int64_t(d));
        } else if (g.axis == 1) {
          const int64_t hstep = int64_t(piece_rows) * d;
          for (int64_t ws = 0; ws < s.size[2]; ws += kStrip)
            for (int64_t h = first; h < last; h += hstep) {
              const int nh = int(std::min<int64_t>(piece_rows, (last - h + d - 1) / d));
              fn(task, bh, int64_t(0), h, nh, ws, std::min(ws + kStrip, s.size[2]),
                 int64_t(1));
            }
        } else {
          for (int64_t ws = 0; ws < s.size[2]; ws += kStrip)
            for (int64_t t = first; t < last; t += d)
              for (int64_t h = 0; h < s.size[1]; ++h)
                fn(task, bh, t, h, one, ws, std::min(ws + kStrip, s.size[2]), int64_t(1));
        }
      }
    });
  }
}

// Sums per-task rpb partials [tasks, bias_size] into [heads, bias_size] in task order.
template <typename acc_t>
void reduce_bias(const Shape3d& s, const TaskGrid& g, const std::vector<acc_t>& part,
                 acc_t* out) {
  const int64_t bs = s.bias_size();
  std::fill(out, out + s.heads * bs, acc_t(0));
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t t = 0; t < g.per_bh(); ++t) {
        const acc_t* src = part.data() + ((b * s.heads + h) * g.per_bh() + t) * bs;
        acc_t* dst = out + h * bs;
        for (int64_t i = 0; i < bs; ++i) dst[i] += src[i];
      }
}

// Query rows per piece of the fused backward (pass 2 then reads and writes each key's gradient
// rows once for all of them).
constexpr int kPieceRows = 4;

// Thread scratch sized for one query; the backward adds the per-piece buffers.
template <typename acc_t>
struct Scratch {
  std::vector<int64_t> off, bias;
  std::vector<int> slot;
  std::vector<acc_t> a, b, q, acc;
  FixedRow<acc_t> fixed[kPieceRows];
  // Backward piece: p and ds per query (rows of pstride), q * scale and grad_out per query,
  // window start / end (in dilation-group units) and size per query, per-query offsets of a
  // key row's coefficients, ds row sums per rpb start.
  int64_t pstride = 0;
  std::vector<acc_t> pp, pds, pq, pg, dsum;
  std::vector<int64_t> su, eu, coff;
  std::vector<int> cnt, lo, hi;  // lo / hi: run of queries holding each key of a group
  std::vector<int64_t> shift;    // key_row: query-index shift of each row segment
  std::vector<char> bs_used;
  Scratch(int64_t slots, int64_t dim)
      : off(slots), bias(slots), slot(slots), a(slots + 8), b(slots + 8), q(dim), acc(dim),
        pstride(slots + 8) {}
  void piece(int64_t n, int64_t dim) {
    if (int64_t(cnt.size()) >= n) return;
    pp.resize(n * pstride);
    pds.resize(n * pstride);
    pq.resize(n * dim);
    pg.resize(n * dim);
    su.resize(n);
    eu.resize(n);
    coff.resize(n);
    cnt.resize(n);
  }
  void runs(int nu) {
    if (int(lo.size()) < nu) {
      lo.resize(nu);
      hi.resize(nu);
    }
  }
};

// ------------------------------------------------------------------------------------------
// Fused forward.
// ------------------------------------------------------------------------------------------
template <class Ops, typename scalar_t>
MMBOAT_INLINE void fused_forward_range(const Problem<scalar_t>& P, const scalar_t* q,
                                       const scalar_t* k, const scalar_t* v, scalar_t* out,
                                       typename AccType<scalar_t>::type* lse, int64_t begin,
                                       int64_t end, int64_t wchunk) {
  using acc_t = typename AccType<scalar_t>::type;
  const Shape3d& s = P.s;
  const int dim = int(s.dim);
  const int64_t hw = s.size[1] * s.size[2];
  const int64_t bh_stride = s.tokens() * s.dim;
  const int64_t nchunks = (s.size[2] + wchunk - 1) / wchunk;
  Scratch<acc_t> sc(s.slots(), s.dim);
  RowWindow rw;
  FixedRow<acc_t> fr;
  const bool fixed = !s.causal[2];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task % nchunks;
    const int64_t row = task / nchunks;  // (bh, t, h)
    const int64_t bh = row / (s.size[0] * s.size[1]);
    const int64_t th = row % (s.size[0] * s.size[1]);
    const int64_t t = th / s.size[1], h = th % s.size[1];
    build_row(P, t, h, rw);
    const scalar_t* kb = k + bh * bh_stride;
    const scalar_t* vb = v + bh * bh_stride;
    const scalar_t* rpb = P.rpb ? P.rpb + (bh % s.heads) * s.bias_size() : nullptr;
    if (fixed) build_fixed(P, rw, rpb, fr);
    const int64_t w_end = std::min((chunk + 1) * wchunk, s.size[2]);
    for (int64_t w = chunk * wchunk; w < w_end; ++w) {
      const int64_t tok = bh * s.tokens() + t * hw + h * s.size[2] + w;
      const scalar_t* qi = q + tok * s.dim;
      for (int d = 0; d < dim; ++d) sc.q[d] = static_cast<acc_t>(qi[d]) * P.scale;
      acc_t* logit = sc.a.data();
      int n;
      const scalar_t *kq = kb, *vq = vb;
      const int64_t* offp = sc.off.data();
      if (fixed) {
        const AxisWindow w2 = axis_window(int(w), int(s.size[2]), s.kernel[2], s.dilation[2],
                                          false);
        n = fr.n;
        kq = kb + w2.start * s.dim;
        vq = vb + w2.start * s.dim;
        offp = fr.off.data();
        Ops::dots(sc.q.data(), kq, offp, n, dim, logit,
                  rpb ? fr.bias.data() + int64_t(w2.bias_start) * n : nullptr);
      } else {
        n = build_slots(P, rw, w, sc.off.data(), sc.bias.data(), nullptr);
        Ops::dots(sc.q.data(), kb, offp, n, dim, logit);
        if (rpb)
          for (int j = 0; j < n; ++j) logit[j] += static_cast<acc_t>(rpb[sc.bias[j]]);
      }
      const acc_t m = Ops::max_of(logit, n);
      Ops::exp_shift(logit, n, m);
      const acc_t sum = Ops::sum_of(logit, n);
      const acc_t inv = acc_t(1) / sum;  // normalise the output, not the n weights
      std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
      Ops::weighted_sum(logit, vq, offp, n, dim, sc.acc.data());
      scalar_t* oi = out + tok * s.dim;
      for (int d = 0; d < dim; ++d) oi[d] = static_cast<scalar_t>(sc.acc[d] * inv);
      lse[tok] = m + std::log(sum);
    }
  }
}

#if MMBOAT_X86
// The AVX2 instance: the same loop with Avx2Ops, flattened into one AVX2 function.
MMBOAT_AVX2 MMBOAT_FLATTEN inline void fused_forward_range_avx2(
    const Problem<float>& P, const float* q, const float* k, const float* v, float* out,
    float* lse, int64_t begin, int64_t end, int64_t wchunk) {
  fused_forward_range<Avx2Ops, float>(P, q, k, v, out, lse, begin, end, wchunk);
}
#endif

template <typename scalar_t>
Problem<scalar_t> make_problem(const Shape3d& s, double scale, const scalar_t* rpb) {
  Problem<scalar_t> P;
  P.s = s;
  P.scale = static_cast<typename Problem<scalar_t>::acc_t>(scale);
  P.rpb = rpb;
  P.bstride[2] = 1;
  P.bstride[1] = s.bias_extent(2);
  P.bstride[0] = s.bias_extent(1) * s.bias_extent(2);
  return P;
}

// Whether the AVX2 instances run: float32, head_dim % 8 == 0, a CPU with AVX2 + FMA.
template <typename scalar_t>
bool use_avx2(const Shape3d& s) {
  return std::is_same<scalar_t, float>::value && s.dim % 8 == 0 && simd::cpu_has_avx2();
}

// out = softmax(q k^T * scale + rpb) v per query, lse its log-sum-exp ([B, heads, *spatial],
// acc_t). Tasks: chunks of 64 queries of one (b, head, axis0, axis1) row.
template <typename scalar_t, class Parallel>
void fused_forward(const Parallel& par, const Problem<scalar_t>& P, const scalar_t* q,
                   const scalar_t* k, const scalar_t* v, scalar_t* out,
                   typename AccType<scalar_t>::type* lse) {
  const Shape3d& s = P.s;
  const int64_t wchunk = 64;
  const int64_t ntasks = s.batch * s.heads * s.size[0] * s.size[1] *
                         ((s.size[2] + wchunk - 1) / wchunk);
  const bool avx2 = use_avx2<scalar_t>(s);
  par.for_range(0, ntasks, 1, [&](int64_t begin, int64_t end) {
#if MMBOAT_X86
    if constexpr (std::is_same<scalar_t, float>::value) {
      if (avx2) return fused_forward_range_avx2(P, q, k, v, out, lse, begin, end, wchunk);
    }
#endif
    fused_forward_range<GenericOps<scalar_t>, scalar_t>(P, q, k, v, out, lse, begin, end,
                                                        wchunk);
  });
  (void)avx2;
}

// ------------------------------------------------------------------------------------------
// Fused backward.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t *dout, *q, *k, *v, *out;
  const acc_t* lse;
  scalar_t* dq;
  acc_t *dk, *dv;    // accumulation buffers, key layout, uninitialised until first written
  acc_t* dbias;      // [tasks, bias_size] or null
  uint8_t* seen;     // per key token: dk / dv rows written yet
};

// One piece of nq <= kPieceRows query rows (the queries w0, w0 + wstep, ... < w1 of each,
// taken per dilation group of the last axis), in two passes:
//  1. query by query: logits and dO . V over the window, p from the saved log-sum-exp,
//     ds = p * (dO . V - delta) and dQ; p and ds of every query of the piece are kept;
//  2. key by key, for each key row the piece reaches: dK += sum ds * q * scale and
//     dV += sum p * dO over the piece's queries whose window holds the key. Window starts and
//     ends grow with the query, so in each query row these queries are a contiguous run of
//     the group (found by two pointers, the same in every row), and the key's gradient rows
//     are read and written once per piece, for all its query rows together.
template <class Ops, typename scalar_t>
MMBOAT_INLINE void fused_backward_row(const Problem<scalar_t>& P, const BackwardArgs<scalar_t>& A,
                                      Scratch<typename AccType<scalar_t>::type>& sc,
                                      RowWindow* rws, int64_t task, int64_t bh, int64_t t,
                                      int64_t h, int nq, int64_t w0, int64_t w1,
                                      int64_t wstep) {
  using acc_t = typename AccType<scalar_t>::type;
  const Shape3d& s = P.s;
  const int dim = int(s.dim);
  const int64_t bh_stride = s.tokens() * s.dim;
  int64_t hq[kPieceRows];  // query rows
  for (int j = 0; j < nq; ++j) hq[j] = h + int64_t(j) * s.dilation[1];
  const scalar_t* kb = A.k + bh * bh_stride;
  const scalar_t* vb = A.v + bh * bh_stride;
  acc_t* dkb = A.dk + bh * bh_stride;
  acc_t* dvb = A.dv + bh * bh_stride;
  uint8_t* seenb = A.seen + bh * s.tokens();
  const scalar_t* rpb = P.rpb ? P.rpb + (bh % s.heads) * s.bias_size() : nullptr;
  acc_t* dbias = A.dbias ? A.dbias + task * s.bias_size() : nullptr;
  const bool fixed = !s.causal[2];
  const int d2 = s.dilation[2];
  const int k2 = s.kernel[2];
  const int64_t ngroups = wstep == d2 ? 1 : std::min<int64_t>(d2, w1 - w0);
  const int64_t gstep = wstep == d2 ? wstep : d2;
  // Queries of group grp in one row of the piece.
  const auto group_len = [&](int64_t grp) {
    return w0 + grp < w1 ? (w1 - (w0 + grp) + gstep - 1) / gstep : int64_t(0);
  };
  int64_t m_row = 0;  // queries per row; row j's are the piece's [j * m_row, (j + 1) * m_row)
  for (int64_t grp = 0; grp < ngroups; ++grp) m_row += group_len(grp);
  const int64_t ps = sc.pstride;
  sc.piece(nq * m_row, dim);

  // Pass 1.
  for (int j = 0; j < nq; ++j) {
    RowWindow& rw = rws[j];
    FixedRow<acc_t>& fr = sc.fixed[j];
    build_row(P, t, hq[j], rw);
    if (fixed) build_fixed(P, rw, rpb, fr);
    // Row sums of ds per window bias start (fixed rows): the rpb gradient is scattered once
    // per row and bias start instead of once per query.
    const bool bias_sums = dbias && fixed;
    const int nfix = fixed ? fr.n : 0;
    if (bias_sums) {
      sc.dsum.assign(int64_t(k2) * nfix, acc_t(0));
      sc.bs_used.assign(k2, 0);
    }
    int64_t idx = j * m_row;
    for (int64_t grp = 0; grp < ngroups; ++grp) {
      for (int64_t w = w0 + grp; w < w1; w += gstep, ++idx) {
        const AxisWindow win = axis_window(int(w), int(s.size[2]), k2, d2, s.causal[2]);
        sc.su[idx] = win.start / d2;
        sc.eu[idx] = win.start / d2 + win.count - 1;
        sc.cnt[idx] = win.count;
        const int64_t tok = bh * s.tokens() + (t * s.size[1] + hq[j]) * s.size[2] + w;
        int n;
        const scalar_t *kq = kb, *vq = vb;
        const int64_t* offp = sc.off.data();
        if (fixed) {
          n = fr.n;
          kq = kb + win.start * s.dim;
          vq = vb + win.start * s.dim;
          offp = fr.off.data();
        } else {
          n = build_slots(P, rw, w, sc.off.data(), sc.bias.data(), nullptr);
        }
        const scalar_t* qi = A.q + tok * s.dim;
        const scalar_t* gi = A.dout + tok * s.dim;
        const scalar_t* oi = A.out + tok * s.dim;
        acc_t* qv = sc.pq.data() + idx * dim;  // q * scale
        acc_t* gv = sc.pg.data() + idx * dim;
        acc_t delta;
        if constexpr (std::is_same<scalar_t, acc_t>::value) {
          for (int d = 0; d < dim; ++d) qv[d] = qi[d] * P.scale;
          std::copy(gi, gi + dim, gv);
          delta = Ops::dot(gi, oi, dim);
        } else {
          delta = 0;
          for (int d = 0; d < dim; ++d) {
            qv[d] = static_cast<acc_t>(qi[d]) * P.scale;
            gv[d] = static_cast<acc_t>(gi[d]);
            delta += gv[d] * static_cast<acc_t>(oi[d]);
          }
        }
        acc_t* p = sc.pp.data() + idx * ps;
        acc_t* ds = sc.pds.data() + idx * ps;
        Ops::dots2(qv, gv, kq, vq, offp, n, dim, p, ds,
                   fixed && rpb ? fr.bias.data() + int64_t(win.bias_start) * n : nullptr);
        if (!fixed && rpb)
          for (int jj = 0; jj < n; ++jj) p[jj] += static_cast<acc_t>(rpb[sc.bias[jj]]);
        Ops::exp_shift(p, n, A.lse[tok]);
        for (int jj = 0; jj < n; ++jj) ds[jj] = p[jj] * (ds[jj] - delta);
        if (bias_sums) {
          acc_t* db = sc.dsum.data() + int64_t(win.bias_start) * n;
          for (int jj = 0; jj < n; ++jj) db[jj] += ds[jj];
          sc.bs_used[win.bias_start] = 1;
        } else if (dbias) {
          for (int jj = 0; jj < n; ++jj) dbias[sc.bias[jj]] += ds[jj];
        }
        std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
        Ops::weighted_sum(ds, kq, offp, n, dim, sc.acc.data());
        scalar_t* dqi = A.dq + tok * s.dim;
        for (int d = 0; d < dim; ++d) dqi[d] = static_cast<scalar_t>(sc.acc[d] * P.scale);
      }
    }
    if (bias_sums)
      for (int bs = 0; bs < k2; ++bs) {
        if (!sc.bs_used[bs]) continue;
        const acc_t* src = sc.dsum.data() + int64_t(bs) * nfix;
        for (int jj = 0; jj < nfix; ++jj) dbias[fr.bidx[jj] + bs] += src[jj];
      }
  }

  // Pass 2. Key rows of the piece: row_off ascending in each query row's window, merged;
  // kr[j] is the key row's index in query row j's window (-1 when it is not there).
  sc.shift.resize(kPieceRows);
  const auto key_runs = [&](int64_t a, int64_t b, int64_t res) {
    if (a >= b) return;
    const int64_t u0 = sc.su[a];
    const int nu = int(sc.eu[b - 1] - u0 + 1);
    sc.runs(nu);
    int64_t lo = a, hi = a;
    for (int c = 0; c < nu; ++c) {  // queries lo <= i < hi hold key u0 + c
      while (hi < b && sc.su[hi] <= u0 + c) ++hi;
      while (lo < hi && sc.eu[lo] < u0 + c) ++lo;
      sc.lo[c] = int(lo);
      sc.hi[c] = int(hi);
    }
    constexpr int64_t kEnd = std::numeric_limits<int64_t>::max();
    int r[kPieceRows] = {};
    for (;;) {
      int64_t row = kEnd;
      for (int j = 0; j < nq; ++j)
        if (r[j] < rws[j].nrows) row = std::min(row, rws[j].row_off[r[j]]);
      if (row == kEnd) break;
      int kr[kPieceRows];
      for (int j = 0; j < nq; ++j)
        kr[j] = r[j] < rws[j].nrows && rws[j].row_off[r[j]] == row ? r[j]++ : -1;
      int nseg = 0;
      for (int j = 0; j < nq; ++j) {
        if (kr[j] < 0) continue;
        const int64_t sh = j * m_row;
        for (int64_t i = a + sh; i < b + sh; ++i)
          sc.coff[i] = i * ps + kr[j] * sc.cnt[i] - sc.su[i];
        sc.shift[nseg++] = sh;
      }
      const int64_t key = row + res + u0 * d2;  // token
      Ops::key_row(sc.pds.data(), sc.pp.data(), sc.coff.data(), sc.lo.data(), sc.hi.data(),
                   sc.shift.data(), nseg, u0, nu, sc.pq.data(), sc.pg.data(),
                   dkb + key * s.dim, dvb + key * s.dim, int64_t(d2) * s.dim, dim,
                   seenb + key, d2);
    }
  };
  int64_t first = 0;
  for (int64_t grp = 0; grp < ngroups; ++grp) {
    const int64_t last = first + group_len(grp);
    const int64_t res = (w0 + grp) % d2;  // every window of the group starts in this residue
    key_runs(first, last, res);
    first = last;
  }
}


#if MMBOAT_X86
// The AVX2 instance: the same piece with Avx2Ops, flattened into one AVX2 function.
MMBOAT_AVX2 MMBOAT_FLATTEN inline void fused_backward_row_avx2(
    const Problem<float>& P, const BackwardArgs<float>& A, Scratch<float>& sc, RowWindow* rws,
    int64_t task, int64_t bh, int64_t t, int64_t h, int nh, int64_t w0, int64_t w1,
    int64_t wstep) {
  fused_backward_row<Avx2Ops, float>(P, A, sc, rws, task, bh, t, h, nh, w0, w1, wstep);
}
#endif

// Gradients of fused_forward: dq (query layout, scalar_t), dk and dv (acc_t, key layout; their
// initial contents are ignored), drpb (acc_t [heads, bias extents], written; null without rpb).
template <typename scalar_t, class Parallel>
void fused_backward(const Parallel& par, const Problem<scalar_t>& P, const scalar_t* dout,
                    const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* out,
                    const typename AccType<scalar_t>::type* lse, scalar_t* dq,
                    typename AccType<scalar_t>::type* dk, typename AccType<scalar_t>::type* dv,
                    typename AccType<scalar_t>::type* drpb) {
  using acc_t = typename AccType<scalar_t>::type;
  const Shape3d& s = P.s;
  const TaskGrid g = make_grid(s);
  std::vector<acc_t> dbias;
  if (drpb) dbias.assign(s.batch * s.heads * g.per_bh() * s.bias_size(), acc_t(0));
  std::vector<uint8_t> seen(s.batch * s.heads * s.tokens(), 0);
  const BackwardArgs<scalar_t> A{dout, q,  k,  v,  out, lse, dq,
                                 dk,   dv, drpb ? dbias.data() : nullptr, seen.data()};
  const bool avx2 = use_avx2<scalar_t>(s);
  // One scratch per thread, reused across tasks.
  std::vector<std::unique_ptr<Scratch<acc_t>>> scratch(par.num_threads() + 1);
  std::vector<std::unique_ptr<RowWindow[]>> rows(par.num_threads() + 1);
  run_phased(par, s, g, kPieceRows, [&](int64_t task, int64_t bh, int64_t t, int64_t h, int nh,
                                        int64_t w0, int64_t w1, int64_t wstep) {
    const int tid = std::min<int>(par.thread_num(), int(scratch.size()) - 1);
    if (!scratch[tid]) {
      scratch[tid] = std::make_unique<Scratch<acc_t>>(s.slots(), s.dim);
      rows[tid] = std::make_unique<RowWindow[]>(kPieceRows);
    }
#if MMBOAT_X86
    if constexpr (std::is_same<scalar_t, float>::value) {
      if (avx2)
        return fused_backward_row_avx2(P, A, *scratch[tid], rows[tid].get(), task, bh, t, h, nh,
                                       w0, w1, wstep);
    }
#endif
    fused_backward_row<GenericOps<scalar_t>, scalar_t>(P, A, *scratch[tid], rows[tid].get(),
                                                       task, bh, t, h, nh, w0, w1, wstep);
  });
  (void)avx2;
  if (drpb) reduce_bias(s, g, dbias, drpb);
  // Every key lies in its own query's window, so every flag is set by now; a key that no
  // window reached would get zero gradients.
  for (int64_t tok = 0; tok < int64_t(seen.size()); ++tok)
    if (!seen[tok]) {
      std::fill_n(dk + tok * s.dim, s.dim, acc_t(0));
      std::fill_n(dv + tok * s.dim, s.dim, acc_t(0));
    }
}

// ------------------------------------------------------------------------------------------
// Unfused ops (generic loops; they serve attention maps and NATTEN<=0.17-style code). The
// attention map has one column per window slot (prod(kernel_size) of them).
// ------------------------------------------------------------------------------------------
// One query of the unfused loops: its window's n slots are listed in sc (off, bias, slot).
template <typename acc_t>
struct QueryTask {
  Scratch<acc_t>& sc;
  int n;
  int64_t task;  // the phased task that runs it (for_each_query_phased)
  int64_t bh;    // batch * heads + head
  int64_t tok;   // token, flat over [B, heads, *spatial]
  int64_t kv;    // offset of its (b, head) slice in key / value rows: bh * tokens * head_dim
  int64_t map;   // offset of its attention-map row: tok * slots
};

// fn(QueryTask) for every query, in parallel over (b, head, axis0, axis1) rows.
template <typename scalar_t, class Parallel, typename Fn>
void for_each_query(const Parallel& par, const Problem<scalar_t>& P, const Fn& fn) {
  using acc_t = typename AccType<scalar_t>::type;
  const Shape3d& s = P.s;
  const int64_t rows = s.batch * s.heads * s.size[0] * s.size[1];
  par.for_range(0, rows, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> sc(s.slots(), s.dim);
    RowWindow rw;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / (s.size[0] * s.size[1]);
      const int64_t th = row % (s.size[0] * s.size[1]);
      const int64_t t = th / s.size[1], h = th % s.size[1];
      build_row(P, t, h, rw);
      for (int64_t w = 0; w < s.size[2]; ++w) {
        const int n = build_slots(P, rw, w, sc.off.data(), sc.bias.data(), sc.slot.data());
        const int64_t tok = row * s.size[2] + w;
        fn(QueryTask<acc_t>{sc, n, 0, bh, tok, bh * s.tokens() * s.dim, tok * s.slots()});
      }
    }
  });
}

// fn(QueryTask) for every query, phased as the fused backward (see run_phased): queries that
// run together never share a key.
template <typename scalar_t, class Parallel, typename Fn>
void for_each_query_phased(const Parallel& par, const Problem<scalar_t>& P, const TaskGrid& g,
                           const Fn& fn) {
  using acc_t = typename AccType<scalar_t>::type;
  const Shape3d& s = P.s;
  std::vector<std::unique_ptr<Scratch<acc_t>>> scratch(par.num_threads() + 1);
  std::vector<std::unique_ptr<RowWindow>> rows(par.num_threads() + 1);
  run_phased(par, s, g, 1, [&](int64_t task, int64_t bh, int64_t t, int64_t h, int,
                               int64_t w0, int64_t w1, int64_t wstep) {
    const int tid = std::min<int>(par.thread_num(), int(scratch.size()) - 1);
    if (!scratch[tid]) {
      scratch[tid] = std::make_unique<Scratch<acc_t>>(s.slots(), s.dim);
      rows[tid] = std::make_unique<RowWindow>();
    }
    Scratch<acc_t>& sc = *scratch[tid];
    build_row(P, t, h, *rows[tid]);
    for (int64_t w = w0; w < w1; w += wstep) {
      const int n = build_slots(P, *rows[tid], w, sc.off.data(), sc.bias.data(),
                                sc.slot.data());
      const int64_t tok = (bh * s.size[0] * s.size[1] + t * s.size[1] + h) * s.size[2] + w;
      fn(QueryTask<acc_t>{sc, n, task, bh, tok, bh * s.tokens() * s.dim, tok * s.slots()});
    }
  });
}

// sc.q = row `tok` of x (head_dim values, as acc_t).
template <typename scalar_t, typename acc_t>
MMBOAT_INLINE void load_query_row(const QueryTask<acc_t>& qt, const scalar_t* x, int64_t dim) {
  for (int d = 0; d < dim; ++d) qt.sc.q[d] = static_cast<acc_t>(x[qt.tok * dim + d]);
}

// attn[query, slot] = q . k (+ rpb); slots outside a causal window are -inf.
template <typename scalar_t, class Parallel>
void qk_forward(const Parallel& par, const Problem<scalar_t>& P, const scalar_t* q,
                const scalar_t* k, scalar_t* attn) {
  using acc_t = typename AccType<scalar_t>::type;
  const Shape3d& s = P.s;
  for_each_query(par, P, [&](const QueryTask<acc_t>& qt) {
    Scratch<acc_t>& sc = qt.sc;
    load_query_row(qt, q, s.dim);
    GenericOps<scalar_t>::dots(sc.q.data(), k + qt.kv, sc.off.data(), qt.n, int(s.dim),
                               sc.a.data());
    scalar_t* ai = attn + qt.map;
    for (int64_t j = 0; j < s.slots(); ++j) ai[j] = -std::numeric_limits<scalar_t>::infinity();
    const scalar_t* rb = P.rpb ? P.rpb + (qt.bh % s.heads) * s.bias_size() : nullptr;
    for (int j = 0; j < qt.n; ++j) {
      acc_t v = sc.a[j];
      if (rb) v += static_cast<acc_t>(rb[sc.bias[j]]);
      ai[sc.slot[j]] = static_cast<scalar_t>(v);
    }
  });
}

// out = sum over the window's slots of attn[query, slot] * v.
template <typename scalar_t, class Parallel>
void av_forward(const Parallel& par, const Problem<scalar_t>& P, const scalar_t* attn,
                const scalar_t* v, scalar_t* out) {
  using acc_t = typename AccType<scalar_t>::type;
  const int dim = int(P.s.dim);
  for_each_query(par, P, [&](const QueryTask<acc_t>& qt) {
    Scratch<acc_t>& sc = qt.sc;
    for (int j = 0; j < qt.n; ++j) sc.a[j] = static_cast<acc_t>(attn[qt.map + sc.slot[j]]);
    std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
    GenericOps<scalar_t>::weighted_sum(sc.a.data(), v + qt.kv, sc.off.data(), qt.n, dim,
                                       sc.acc.data());
    for (int d = 0; d < dim; ++d) out[qt.tok * dim + d] = static_cast<scalar_t>(sc.acc[d]);
  });
}

// Gradients of qk_forward: dq (scalar_t), dk (acc_t, zero-filled by the caller) and drpb
// (acc_t [heads, bias extents], written; null without rpb).
template <typename scalar_t, class Parallel>
void qk_backward(const Parallel& par, const Problem<scalar_t>& P, const scalar_t* grad_attn,
                 const scalar_t* q, const scalar_t* k, scalar_t* dq,
                 typename AccType<scalar_t>::type* dk, typename AccType<scalar_t>::type* drpb) {
  using acc_t = typename AccType<scalar_t>::type;
  const Shape3d& s = P.s;
  const TaskGrid g = make_grid(s);
  std::vector<acc_t> dbias;
  if (drpb) dbias.assign(s.batch * s.heads * g.per_bh() * s.bias_size(), acc_t(0));
  const int dim = int(s.dim);
  for_each_query_phased(par, P, g, [&](const QueryTask<acc_t>& qt) {
    Scratch<acc_t>& sc = qt.sc;
    for (int j = 0; j < qt.n; ++j) sc.a[j] = static_cast<acc_t>(grad_attn[qt.map + sc.slot[j]]);
    load_query_row(qt, q, dim);
    std::fill(sc.acc.begin(), sc.acc.end(), acc_t(0));
    GenericOps<scalar_t>::weighted_sum(sc.a.data(), k + qt.kv, sc.off.data(), qt.n, dim,
                                       sc.acc.data());
    for (int d = 0; d < dim; ++d) dq[qt.tok * dim + d] = static_cast<scalar_t>(sc.acc[d]);
    for (int j = 0; j < qt.n; ++j)
      GenericOps<scalar_t>::axpy(sc.a[j], sc.q.data(), dk + qt.kv + sc.off[j], dim);
    if (drpb) {
      acc_t* db = dbias.data() + qt.task * s.bias_size();
      for (int j = 0; j < qt.n; ++j) db[sc.bias[j]] += sc.a[j];
    }
  });
  if (drpb) reduce_bias(s, g, dbias, drpb);
}

// Gradients of av_forward: dattn (scalar_t, zero-filled by the caller: slots outside a causal
// window stay 0) and dv (acc_t, zero-filled by the caller).
template <typename scalar_t, class Parallel>
void av_backward(const Parallel& par, const Problem<scalar_t>& P, const scalar_t* grad_out,
                 const scalar_t* attn, const scalar_t* v, scalar_t* dattn,
                 typename AccType<scalar_t>::type* dv) {
  using acc_t = typename AccType<scalar_t>::type;
  const int dim = int(P.s.dim);
  for_each_query_phased(par, P, make_grid(P.s), [&](const QueryTask<acc_t>& qt) {
    Scratch<acc_t>& sc = qt.sc;
    load_query_row(qt, grad_out, dim);
    GenericOps<scalar_t>::dots(sc.q.data(), v + qt.kv, sc.off.data(), qt.n, dim, sc.b.data());
    for (int j = 0; j < qt.n; ++j) {
      dattn[qt.map + sc.slot[j]] = static_cast<scalar_t>(sc.b[j]);
      GenericOps<scalar_t>::axpy(static_cast<acc_t>(attn[qt.map + sc.slot[j]]), sc.q.data(),
                                 dv + qt.kv + sc.off[j], dim);
    }
  });
}

}  // namespace na
}  // namespace cpu
}  // namespace mmboat
