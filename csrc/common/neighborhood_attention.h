// Neighborhood attention: the window rule and the relative-positional-bias index, per axis.
// One source of truth for the C++ and CUDA kernels (docs/neighborhood_attention.md).
// Torch-free; every function is host+device safe so nvcc and plain C++ both compile it.
//
// Per axis: length L, query i, kernel k, dilation d. The query's dilation group is
// g = i % d with L_g = ceil((L - g) / d) members; i' = i / d is its index in the group.
//   non-causal: start' = clamp(i' - k/2, 0, L_g - k), keys (start' + t) * d + g, t < k
//   causal:     start' = max(i' - k + 1, 0), keys start' .. i' (min(i' + 1, k) of them)
//   rpb index of slot t: (start' + t - i') + (k - 1)
// Requires L >= k * d (then L_g >= k for every group).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMBOAT_HD __host__ __device__ __forceinline__
#else
#define MMBOAT_HD inline
#endif

namespace mmboat {
namespace na {

// Window of query i on one axis. `start` is the key index of slot 0 (original coordinates;
// slot t is start + t * dilation), `count` the number of valid slots (k unless causal) and
// `bias_start` the rpb index of slot 0 (slot t uses bias_start + t).
struct AxisWindow {
  int start;
  int count;
  int bias_start;
};

// Queries whose window contains key j: first, last (original coordinates, both in j's
// dilation group) and the step between them (= dilation).
struct AxisRange {
  int first;
  int last;
};

MMBOAT_HD int group_length(int length, int dilation, int group) {
  return (length - group + dilation - 1) / dilation;
}

MMBOAT_HD int window_start_inner(int inner, int group_len, int kernel_size, bool is_causal) {
  if (is_causal) {
    int s = inner - kernel_size + 1;
    return s > 0 ? s : 0;
  }
  int s = inner - kernel_size / 2;  // even k = 2r: r keys left, r - 1 right
  int hi = group_len - kernel_size;
  s = s < hi ? s : hi;
  return s > 0 ? s : 0;
}

MMBOAT_HD AxisWindow axis_window(int i, int length, int kernel_size, int dilation,
                                 bool is_causal) {
  const int g = i % dilation;
  const int inner = i / dilation;
  const int start = window_start_inner(inner, group_length(length, dilation, g), kernel_size,
                                       is_causal);
  AxisWindow w;
  w.start = start * dilation + g;
  if (is_causal) {
    int c = inner - start + 1;
    w.count = c < kernel_size ? c : kernel_size;
  } else {
    w.count = kernel_size;
  }
  w.bias_start = start - inner + kernel_size - 1;
  return w;
}

// Inverse neighbourhood (for key-centric gradient kernels): the queries that attend key j
// form a contiguous run of their dilation group, returned in original coordinates.
MMBOAT_HD AxisRange axis_inverse_range(int j, int length, int kernel_size, int dilation,
                                       bool is_causal) {
  const int g = j % dilation;
  const int inner = j / dilation;
  const int glen = group_length(length, dilation, g);
  int lo, hi;
  if (is_causal) {
    lo = inner;
    hi = inner + kernel_size - 1;
  } else {
    const int r = kernel_size / 2;
    lo = inner <= kernel_size - 1 ? 0 : inner - kernel_size + 1 + r;
    hi = inner >= glen - kernel_size ? glen - 1 : inner + r;
  }
  hi = hi < glen - 1 ? hi : glen - 1;
  AxisRange out;
  out.first = lo * dilation + g;
  out.last = hi * dilation + g;
  return out;
}

}  // namespace na
}  // namespace mmboat
