// Balanced hierarchical clustering (BOAT FSLA): the leaf layout rule and the per-token formulas,
// one source of truth for the C++ and CUDA kernels (docs/feature_space_attention.md).
// Torch-free; every function is host+device safe so nvcc and plain C++ both compile it.
//
// N tokens, cluster size m: L = max(0, ceil(log2(N / m))) levels. A group of n tokens splits by
// rank into floor(n / 2) (child 0) and ceil(n / 2) (child 1) tokens, so group g of level l
// (0 <= g < 2^l, children of g are 2g and 2g + 1) has an offset and size fixed by N alone: the
// bits of g, most significant first, say which child was taken at each level. Leaves are the
// groups of level L; perm lists them in order, each leaf contiguous.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMBOAT_BHC_HD __host__ __device__ __forceinline__
#else
#define MMBOAT_BHC_HD inline
#endif

namespace mmboat {
namespace bhc {

// Epsilon of F.normalize: x / max(|x|, eps).
constexpr float kNormEps = 1e-12f;

MMBOAT_BHC_HD int num_levels(int64_t num_tokens, int64_t cluster_size) {
  int levels = 0;
  while ((cluster_size << levels) < num_tokens) ++levels;
  return levels;
}

// Offset (in perm order) and size of group `group` of level `level`.
struct Extent {
  int64_t offset;
  int64_t size;
};

MMBOAT_BHC_HD Extent group_extent(int64_t num_tokens, int level, int64_t group) {
  Extent e{0, num_tokens};
  for (int l = level - 1; l >= 0; --l) {
    const int64_t first = e.size / 2;
    if ((group >> l) & 1) {
      e.offset += first;
      e.size -= first;
    } else {
      e.size = first;
    }
  }
  return e;
}

// Largest leaf: ceil(N / 2^L) (<= m when L > 0).
MMBOAT_BHC_HD int64_t max_leaf_size(int64_t num_tokens, int levels) {
  return (num_tokens + (int64_t(1) << levels) - 1) >> levels;
}

// Keys of leaf `leaf` (level `levels`): its own tokens, then the sibling overlap (none when
// L = 0): leaf 2j takes the first min(o, |2j+1|) tokens of leaf 2j+1, leaf 2j+1 the last
// min(o, |2j|) tokens of leaf 2j. Both ranges are contiguous in perm order.
struct LeafKeys {
  Extent own;
  Extent extra;  // size 0 when there is no overlap
};

MMBOAT_BHC_HD LeafKeys leaf_keys(int64_t num_tokens, int levels, int64_t leaf, int64_t overlap) {
  LeafKeys keys{group_extent(num_tokens, levels, leaf), Extent{0, 0}};
  if (levels > 0 && overlap > 0) {
    const Extent sib = group_extent(num_tokens, levels, leaf ^ 1);
    const int64_t take = overlap < sib.size ? overlap : sib.size;
    keys.extra.size = take;
    keys.extra.offset = (leaf & 1) ? sib.offset + sib.size - take : sib.offset;
  }
  return keys;
}

// Weight of centroid 0 in softmax(tau * (s0, s1)), computed as torch.softmax does.
template <typename Exp>
MMBOAT_BHC_HD float soft_assign0(float s0, float s1, float tau, Exp exp_fn) {
  const float z0 = tau * s0, z1 = tau * s1;
  const float mx = z0 > z1 ? z0 : z1;
  const float e0 = exp_fn(z0 - mx), e1 = exp_fn(z1 - mx);
  return e0 / (e0 + e1);
}

// Split score r = (1 + cos0) / (1 + cos1): ascending r goes to child 0.
MMBOAT_BHC_HD float split_score(float cos0, float cos1) { return (1.0f + cos0) / (1.0f + cos1); }

// Strict order of the segmented stable sort: NaN scores sort last (as torch.sort does).
MMBOAT_BHC_HD bool score_less(float a, float b) {
  const bool a_nan = a != a, b_nan = b != b;
  return !a_nan && (b_nan || a < b);
}

}  // namespace bhc
}  // namespace mmboat
