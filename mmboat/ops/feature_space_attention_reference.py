"""Pure-PyTorch reference of feature-space local attention (FSLA).

Balanced hierarchical clustering of tokens (``docs/feature_space_attention.md#clustering``)
and attention inside the resulting clusters. These functions are the readable source of truth
the compiled ops (``torch.ops.mmboat.bhc_cluster``, ``clustered_attention_forward``) are tested
against; they run on any device and are vectorised over all groups of a level (one pass per
level, no Python loop over groups or samples).

The clustering rule, for one sample and head with N tokens and cluster size m:

* ``L = max(0, ceil(log2(N / m)))`` levels; a group of n tokens splits by rank into
  ``floor(n / 2)`` (child 0) and ``ceil(n / 2)`` (child 1) tokens, so the leaf sizes depend on N
  alone (:func:`cluster_layout`).
* Per group: centroids = L2-normalised means of the two parts of the group's current order;
  ``iters`` soft-assignment updates ``c_j = normalise(sum_t softmax(tau * cos(q_t, c))_j q_t)``;
  score ``r_t = (1 + cos(q_t, c_0)) / (1 + cos(q_t, c_1))``; stable ascending sort by r; the first
  ``floor(n / 2)`` tokens form child 0.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

# Epsilon of F.normalize; the C++ kernels use the same value.
NORM_EPS = 1e-12

# The released models' FSLA settings (docs/feature_space_attention.md): the one place these
# defaults are written; the ops, the references and the FSLA layer take them from here.
CLUSTER_SIZE = 49  # m, the largest leaf
OVERLAP = 20  # o, keys/values a leaf borrows from its sibling
ITERS = 2  # centroid refinement iterations per level
TAU = 100.0  # inverse temperature of the soft assignment

# Layout caches keyed by (N, m[, o]); plain dicts rather than lru_cache so that torch.compile
# traces through them without warnings.
_LEVEL_CACHE: Dict[Tuple[int, int], Tuple[Tuple[int, ...], ...]] = {}
_SLOT_CACHE: Dict[Tuple[int, int, int], tuple] = {}


def cluster_levels(num_tokens: int, cluster_size: int) -> int:
    """Number of bisection levels ``L = max(0, ceil(log2(N / m)))`` (exact integer arithmetic)."""
    levels = 0
    while cluster_size << levels < num_tokens:
        levels += 1
    return levels


def _level_sizes(num_tokens: int, cluster_size: int) -> Tuple[Tuple[int, ...], ...]:
    """Group sizes at every level 0..L (level 0 is ``(N,)``, level L the leaves)."""
    key = (num_tokens, cluster_size)
    if key not in _LEVEL_CACHE:
        _LEVEL_CACHE[key] = _compute_level_sizes(num_tokens, cluster_size)
    return _LEVEL_CACHE[key]


def _compute_level_sizes(num_tokens: int, cluster_size: int) -> Tuple[Tuple[int, ...], ...]:
    sizes: Tuple[int, ...] = (num_tokens, )
    levels = [sizes]
    for _ in range(cluster_levels(num_tokens, cluster_size)):
        sizes = tuple(s for n in sizes for s in (n // 2, n - n // 2))
        levels.append(sizes)
    return tuple(levels)


def cluster_layout(num_tokens: int, cluster_size: int) -> Tuple[int, List[int]]:
    """Levels and leaf sizes of the balanced hierarchical clustering of ``num_tokens`` tokens.

    Args:
        num_tokens (int): N, tokens per sample and head (>= 1).
        cluster_size (int): m, the largest leaf size (>= 1).

    Returns:
        tuple[int, list[int]]: ``(L, leaf_sizes)`` with ``2 ** L`` leaves in perm order; every
        leaf holds ``floor(N / 2**L)`` or ``ceil(N / 2**L) <= m`` tokens.
    """
    if num_tokens < 1:
        raise ValueError(f'num_tokens must be >= 1, got {num_tokens}')
    if cluster_size < 1:
        raise ValueError(f'cluster_size must be >= 1, got {cluster_size}')
    levels = _level_sizes(num_tokens, cluster_size)
    return len(levels) - 1, list(levels[-1])


def _segment_ids(sizes: Tuple[int, ...], device: torch.device) -> Tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """Group id and child id (``2 * group + part``) of every position of a level."""
    sizes_t = torch.tensor(sizes, dtype=torch.long)
    group = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    rank = torch.arange(int(sizes_t.sum())) - starts[group]
    part = (rank >= (sizes_t // 2)[group]).long()
    return group.to(device), (2 * group + part).to(device)


def _part_counts(sizes: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Tokens in each child (``2 * group + part``) of a level, at least 1 (static: no
    ``bincount`` of device data, so the reference runs on any device, meta included)."""
    counts = [c for n in sizes for c in (n // 2, n - n // 2)]
    return torch.tensor(counts, dtype=torch.long).clamp_min(1).to(device)


def _cosines(xn: torch.Tensor, centroids: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``cos(q_t, c_j)`` for both centroids of each token's group: ``[G, N, 2]``."""
    return torch.einsum('gnd,gnkd->gnk', xn, centroids[:, group])


def balanced_hierarchical_clustering_reference(x: torch.Tensor,
                                               cluster_size: int = CLUSTER_SIZE,
                                               iters: int = ITERS,
                                               tau: float = TAU
                                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference balanced hierarchical clustering (no argument checks; see the public API).

    Args:
        x (Tensor): ``[B, heads, N, d]`` features to cluster (the queries).
        cluster_size (int): m, the largest leaf size.
        iters (int): soft-assignment centroid updates per split.
        tau (float): inverse temperature of the soft assignment.

    Returns:
        tuple[Tensor, Tensor]: ``perm`` and ``inv_perm``, ``[B, heads, N]`` int64; ``perm`` lists
        the token indices leaf by leaf, ``inv_perm[perm[t]] = t``.
    """
    batch, heads, num_tokens, dim = x.shape
    levels = _level_sizes(num_tokens, cluster_size)
    with torch.no_grad():
        feats = x.detach().to(torch.float32).reshape(batch * heads, num_tokens, dim)
        rows = feats.shape[0]
        order = torch.arange(num_tokens, device=x.device).expand(rows, num_tokens).contiguous()
        for sizes in levels[:-1]:
            group, child = _segment_ids(sizes, x.device)
            num_groups = len(sizes)
            # Features in the group's current order.
            xs = feats.gather(1, order.unsqueeze(-1).expand(-1, -1, dim))
            xn = F.normalize(xs, dim=-1, eps=NORM_EPS)
            # Initial centroids: means of the two rank parts (empty part -> zero centroid).
            counts = _part_counts(sizes, x.device)
            sums = xs.new_zeros(rows, 2 * num_groups, dim).index_add_(1, child, xs)
            centroids = F.normalize(
                (sums / counts.to(xs.dtype).unsqueeze(-1)).view(rows, num_groups, 2, dim),
                dim=-1,
                eps=NORM_EPS)
            for _ in range(iters):
                assign = torch.softmax(tau * _cosines(xn, centroids, group), dim=-1)
                sums = xs.new_zeros(rows, num_groups, 2, dim).index_add_(
                    1, group, assign.unsqueeze(-1) * xs.unsqueeze(-2))
                centroids = F.normalize(sums, dim=-1, eps=NORM_EPS)
            cos = _cosines(xn, centroids, group)
            score = (1 + cos[..., 0]) / (1 + cos[..., 1])
            # Segmented stable sort: stable by score, then stable by group id.
            idx = torch.argsort(score, dim=1, stable=True)
            idx = idx.gather(1, torch.argsort(group[idx], dim=1, stable=True))
            order = order.gather(1, idx)
        perm = order.view(batch, heads, num_tokens)
        inv_perm = torch.empty_like(perm).scatter_(
            2, perm, torch.arange(num_tokens, device=x.device).expand_as(perm).contiguous())
    return perm, inv_perm


def _attention_slots(num_tokens: int, cluster_size: int, overlap: int) -> tuple:
    """Positions (in perm order) of each leaf's query slots and key slots, with validity.

    Returns ``(q_pos, valid_q, k_pos, k_valid, leaves, q_slots, k_slots)`` (CPU tensors and
    ints): query slots are the leaf's own tokens padded to the largest leaf, key slots add the
    sibling overlap; ``valid_q`` lists the valid query slots in slot order.
    """
    key = (num_tokens, cluster_size, overlap)
    if key not in _SLOT_CACHE:
        q_pos, q_valid, k_pos, k_valid, leaves, q_slots, k_slots = _compute_attention_slots(
            num_tokens, cluster_size, overlap)
        _SLOT_CACHE[key] = (torch.tensor(q_pos), torch.tensor(q_valid).nonzero().squeeze(1),
                            torch.tensor(k_pos), torch.tensor(k_valid), leaves, q_slots,
                            k_slots)
    return _SLOT_CACHE[key]


def _compute_attention_slots(num_tokens: int, cluster_size: int, overlap: int) -> tuple:
    num_levels, leaf_sizes = cluster_layout(num_tokens, cluster_size)
    leaves = len(leaf_sizes)
    offsets = [sum(leaf_sizes[:i]) for i in range(leaves)]
    q_slots = max(leaf_sizes)
    o_slots = overlap if num_levels > 0 else 0
    k_slots = q_slots + o_slots
    q_pos, q_valid, k_pos, k_valid = [], [], [], []
    for i, (start, size) in enumerate(zip(offsets, leaf_sizes)):
        own = [(start + j, j < size) for j in range(q_slots)]
        extra = []
        if o_slots:
            sib = i ^ 1
            sib_start, sib_size = offsets[sib], leaf_sizes[sib]
            take = min(overlap, sib_size)
            # Even leaf: first tokens of the odd sibling; odd leaf: last tokens of the even one.
            first = sib_start if i % 2 == 0 else sib_start + sib_size - take
            extra = [(first + t, t < take) for t in range(o_slots)]
        for pos, valid in own:
            q_pos.append(min(pos, num_tokens - 1))
            q_valid.append(valid)
        keys = own + extra
        if size == 0 and not any(valid for _, valid in keys):
            # Empty leaf (only when m == 1): one dummy key keeps its softmax rows finite.
            keys[0] = (0, True)
        for pos, valid in keys:
            k_pos.append(min(pos, num_tokens - 1) if valid else 0)
            k_valid.append(valid)
    return (tuple(q_pos), tuple(q_valid), tuple(k_pos), tuple(k_valid), leaves, q_slots,
            k_slots)


def clustered_attention_reference(query: torch.Tensor,
                                  key: torch.Tensor,
                                  value: torch.Tensor,
                                  perm: torch.Tensor,
                                  cluster_size: int = CLUSTER_SIZE,
                                  overlap: int = OVERLAP,
                                  scale: Optional[float] = None,
                                  return_lse: bool = False):
    """Reference attention inside the clusters given by ``perm`` (no argument checks).

    Args:
        query, key, value (Tensor): ``[B, heads, N, d]`` in raster order.
        perm (Tensor): ``[B, heads, N]`` int64 leaf order from the clustering.
        cluster_size (int): m, the largest leaf size (fixes the leaf layout with N).
        overlap (int): o, sibling tokens appended to each leaf's keys and values.
        scale (float, optional): logit scale; None means ``d ** -0.5``.
        return_lse (bool): also return the per-query log-sum-exp of the scaled logits.

    Returns:
        Tensor | tuple[Tensor, Tensor]: output ``[B, heads, N, d]`` in raster order (and the
        log-sum-exp ``[B, heads, N]`` when ``return_lse``).
    """
    batch, heads, num_tokens, dim = query.shape
    dim_v = value.shape[-1]
    if scale is None:
        scale = dim**-0.5
    q_pos, valid, k_pos, k_valid, leaves, q_slots, k_slots = _attention_slots(
        num_tokens, cluster_size, overlap)
    device = query.device
    rows = batch * heads
    perm_flat = perm.reshape(rows, num_tokens)
    q_idx = perm_flat[:, q_pos.to(device)]
    k_idx = perm_flat[:, k_pos.to(device)]

    def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(rows, num_tokens, t.shape[-1])
        return flat.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    q = gather(query, q_idx).view(rows, leaves, q_slots, dim)
    k = gather(key, k_idx).view(rows, leaves, k_slots, dim)
    v = gather(value, k_idx).view(rows, leaves, k_slots, dim_v)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = k_valid.to(device).view(1, leaves, 1, k_slots)
    logits = logits.masked_fill(~mask, float('-inf'))
    attn = torch.softmax(logits, dim=-1)
    out_slots = torch.matmul(attn, v).view(rows, leaves * q_slots, dim_v)
    # Valid query slots, in slot order, are exactly perm positions 0..N-1.
    valid = valid.to(device)
    out_sorted = out_slots[:, valid]
    out = out_sorted.new_zeros(rows, num_tokens, dim_v).scatter(
        1, perm_flat.unsqueeze(-1).expand(-1, -1, dim_v), out_sorted)
    out = out.view(batch, heads, num_tokens, dim_v)
    if not return_lse:
        return out
    lse_sorted = torch.logsumexp(logits, dim=-1).reshape(rows, leaves * q_slots)[:, valid]
    lse = lse_sorted.new_zeros(rows, num_tokens).scatter(1, perm_flat, lse_sorted)
    return out, lse.view(batch, heads, num_tokens)
