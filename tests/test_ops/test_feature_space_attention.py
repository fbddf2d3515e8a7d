"""Tests of the FSLA ops: balanced hierarchical clustering and clustered attention.

The released BOAT rule is re-written here as a literal per-group loop (see
docs/feature_space_attention.md#clustering, step by step) and clustered attention as a literal
per-leaf loop; the vectorised reference and the compiled ops are compared against them.
"""
import math
from typing import List

import pytest
import torch
import torch.nn.functional as F

from mmboat.ops import (balanced_hierarchical_clustering, cluster_layout, clustered_attention,
                        feature_space_local_attention)
from mmboat.ops.ext_loader import op_available

HAS_CLUSTER_OP = op_available('bhc_cluster', 'cpu')
HAS_ATTENTION_OP = op_available('clustered_attention_forward', 'cpu')
needs_cluster_op = pytest.mark.skipif(not HAS_CLUSTER_OP, reason='mmboat::bhc_cluster not built')
needs_attention_op = pytest.mark.skipif(
    not HAS_ATTENTION_OP, reason='mmboat::clustered_attention_forward not built')

CLUSTER_IMPLS = ['reference'] + (['ext'] if HAS_CLUSTER_OP else [])
ATTENTION_IMPLS = ['reference'] + (['ext'] if HAS_ATTENTION_OP else [])


# --- literal re-statements of the spec ------------------------------------------------------


def literal_clustering(q: torch.Tensor, m: int, iters: int, tau: float,
                       with_gap: bool = False):
    """Spec section 2 step 2 for one sample and head, one group at a time: ``q [N, d]``.

    With ``with_gap`` also returns the smallest relative gap between neighbouring sorted scores
    over all the splits (0 for an exact float32 tie).
    """
    q = q.float()
    gap = math.inf
    n_tokens = q.shape[0]
    levels = 0
    while m * 2**levels < n_tokens:
        levels += 1
    groups: List[torch.Tensor] = [torch.arange(n_tokens)]
    for _ in range(levels):
        children = []
        for group in groups:
            n = len(group)
            half = n // 2
            xs = q[group]
            xn = F.normalize(xs, dim=-1)
            parts = [xs[:half], xs[half:]]
            c = torch.stack([p.mean(0) if len(p) else torch.zeros_like(xs[0]) for p in parts])
            c = F.normalize(c, dim=-1)
            for _ in range(iters):
                a = torch.softmax(tau * (xn @ c.T), dim=-1)
                c = F.normalize(a.T @ xs, dim=-1)
            cos = xn @ c.T
            r = (1 + cos[:, 0]) / (1 + cos[:, 1])
            r_sorted, order = torch.sort(r, stable=True)
            if n > 1:
                rel = (r_sorted[1:] - r_sorted[:-1]) / r_sorted[1:].abs().clamp_min(1e-30)
                gap = min(gap, rel.min().item())
            ordered = group[order]
            children += [ordered[:half], ordered[half:]]
        groups = children
    perm = torch.cat(groups)
    return (perm, gap) if with_gap else perm


# Neighbouring scores closer than this (relative) are near-ties: another float32 summation
# order (BLAS here, register blocks in the kernels) may legitimately sort them either way, so
# rows holding one are only checked to be permutations. Measured over 640 random rows (N = 196
# to 784, d = 8 and 32): every mismatch, of the compiled op and of the vectorised reference
# alike, had a gap under 5e-7, and about 3 rows in 4 are tie-free at this threshold.
TIE_TOL = 1e-6


def assert_matches_literal(perm, x, m, iters, tau, min_tie_free=0.5):
    """``perm [B, h, N]`` equals the literal rule on every tie-free row; at least
    ``min_tie_free`` of the rows must be tie-free, so the check cannot pass vacuously."""
    rows = [(b, h) for b in range(x.shape[0]) for h in range(x.shape[1])]
    tie_free = 0
    for b, h in rows:
        literal, gap = literal_clustering(x[b, h], m, iters, tau, with_gap=True)
        if gap > TIE_TOL:
            tie_free += 1
            assert torch.equal(perm[b, h], literal), (b, h)
        else:
            assert torch.equal(perm[b, h].sort().values, torch.arange(x.shape[2]))
    assert tie_free >= min_tie_free * len(rows), f"{tie_free} of {len(rows)} rows tie-free"


def literal_attention(q, k, v, perm, m, o, scale):
    """Spec steps 3-6 for one sample and head (``[N, d]``), one leaf at a time."""
    n_tokens = q.shape[0]
    levels, sizes = cluster_layout(n_tokens, m)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    leaves = [perm[s:s + n] for s, n in zip(offsets, sizes)]
    out = torch.zeros_like(v)
    for i, leaf in enumerate(leaves):
        keys = leaf
        if levels > 0:
            sib = leaves[i ^ 1]
            take = min(o, len(sib))
            extra = sib[:take] if i % 2 == 0 else sib[len(sib) - take:]
            keys = torch.cat([leaf, extra])
        attn = torch.softmax(q[leaf] @ k[keys].T * scale, dim=-1)
        out[leaf] = attn @ v[keys]
    return out


def literal_fsla(q, k, v, m, o, scale):
    out = torch.empty_like(v)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            perm = literal_clustering(q[b, h], m, 2, 100.0)
            out[b, h] = literal_attention(q[b, h], k[b, h], v[b, h], perm, m, o, scale)
    return out


def qkv(shape, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)
        for _ in range(3)
    ]


# --- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize('n,m,levels,sizes', [
    (49, 49, 0, [49]),
    (10, 49, 0, [10]),
    (98, 49, 1, [49, 49]),
    (50, 49, 1, [25, 25]),
    (3136, 49, 6, [49] * 64),
    (101, 49, 2, [25, 25, 25, 26]),
    (7, 2, 2, [1, 2, 2, 2]),
])
def test_cluster_layout(n, m, levels, sizes):
    assert cluster_layout(n, m) == (levels, sizes)


@pytest.mark.parametrize('n', [1, 2, 5, 48, 49, 50, 97, 211, 784, 1000])
@pytest.mark.parametrize('m', [1, 3, 49])
def test_cluster_layout_balanced(n, m):
    levels, sizes = cluster_layout(n, m)
    assert levels == max(0, math.ceil(math.log2(n / m) - 1e-12))
    assert len(sizes) == 2**levels and sum(sizes) == n
    assert max(sizes) <= m or levels == 0 and n <= m
    assert set(sizes) <= {n // 2**levels, -(-n // 2**levels)}


def test_cluster_layout_errors():
    with pytest.raises(ValueError, match='num_tokens'):
        cluster_layout(0, 49)
    with pytest.raises(ValueError, match='cluster_size'):
        cluster_layout(10, 0)


# --- clustering --------------------------------------------------------------------------------


@pytest.mark.parametrize('impl', CLUSTER_IMPLS)
@pytest.mark.parametrize('levels', [0, 1, 2, 3])
@pytest.mark.parametrize('dim', [8, 32])
def test_clustering_reproduces_released_rule(impl, levels, dim):
    """N = 49 * 2^L (maps 7*2^j x 7*2^j and their halves): exact released splits."""
    n = 49 * 2**levels
    x = torch.randn(4, 2, n, dim, generator=torch.Generator().manual_seed(levels))
    perm, _ = balanced_hierarchical_clustering(x, 49, 2, 100.0, impl=impl)
    assert_matches_literal(perm, x, 49, 2, 100.0)


@pytest.mark.parametrize('impl', CLUSTER_IMPLS)
@pytest.mark.parametrize('n,m,iters,tau', [(1, 4, 2, 100.0), (13, 4, 2, 100.0),
                                           (37, 5, 1, 10.0), (64, 7, 0, 100.0),
                                           (97, 16, 3, 100.0)])
def test_clustering_general_n_matches_literal(impl, n, m, iters, tau):
    x = torch.randn(1, 3, n, 6, generator=torch.Generator().manual_seed(n))
    perm, inv = balanced_hierarchical_clustering(x, m, iters, tau, impl=impl)
    assert_matches_literal(perm, x, m, iters, tau)


@pytest.mark.parametrize('impl', CLUSTER_IMPLS)
@pytest.mark.parametrize('n', [1, 2, 31, 49, 50, 101, 257])
def test_clustering_is_permutation(impl, n):
    x = torch.randn(2, 2, n, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    perm, inv = balanced_hierarchical_clustering(x, 16, impl=impl)
    assert perm.dtype == torch.int64 and inv.dtype == torch.int64
    assert perm.shape == inv.shape == (2, 2, n)
    ar = torch.arange(n).expand(2, 2, n)
    assert torch.equal(perm.sort(-1).values, ar)
    assert torch.equal(perm.gather(-1, inv), ar)
    assert torch.equal(inv.gather(-1, perm), ar)


@pytest.mark.parametrize('impl', CLUSTER_IMPLS)
def test_clustering_batch_independent(impl):
    x = torch.randn(3, 2, 98, 8, generator=torch.Generator().manual_seed(2))
    perm, _ = balanced_hierarchical_clustering(x, 49, impl=impl)
    y = x.clone()
    y[1] = torch.randn(2, 98, 8)
    perm_y, _ = balanced_hierarchical_clustering(y, 49, impl=impl)
    assert torch.equal(perm[0], perm_y[0]) and torch.equal(perm[2], perm_y[2])
    single, _ = balanced_hierarchical_clustering(x[2:], 49, impl=impl)
    assert torch.equal(single[0], perm[2])


@pytest.mark.parametrize('impl', CLUSTER_IMPLS)
@pytest.mark.parametrize('dim', [8, 6])
def test_clustering_strided_input(impl, dim):
    """Views (q out of a qkv projection, a channel slice, an expanded batch, tokens overlapping
    in memory) cluster exactly as their contiguous copies."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 130, 3, 3, dim, generator=gen).permute(2, 0, 3, 1, 4)
    wide = torch.randn(2, 3, 130, 2 * dim, generator=gen)
    one = torch.randn(1, 3, 130, dim, generator=gen)
    flat = torch.randn(2 * 3 * 400 + dim, generator=gen)
    # 135 tokens (a partial last block of 7) starting 2 floats apart
    overlapping = flat.as_strided((2, 3, 135, dim), (1200, 400, 2, 1))
    for view in (qkv[0], wide[..., dim:], wide[..., ::2], one.expand(2, 3, 130, dim),
                 overlapping):
        assert not view.is_contiguous()
        got = balanced_hierarchical_clustering(view, 16, impl=impl)
        want = balanced_hierarchical_clustering(view.contiguous(), 16, impl=impl)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize('impl', CLUSTER_IMPLS)
@pytest.mark.parametrize('dim', [32, 6])
def test_clustering_exact_ties_keep_rank_order(impl, dim):
    """Equal tokens have equal split scores at every level, and the splits sort stably, so any
    set of equal tokens keeps ascending token order in perm; a head of one repeated token (all
    scores tied) is not reordered at all."""
    gen = torch.Generator().manual_seed(8)
    values = torch.randn(2, 3, dim, generator=gen)  # 3 distinct tokens per sample
    labels = torch.randint(0, 3, (2, 700), generator=gen)
    x = torch.stack([values[b][labels[b]] for b in range(2)])[:, None]  # [2, 1, 700, dim]
    x = torch.cat([x, values[:, :1, None].expand(2, 1, 700, dim)], dim=1)  # head 1: one token
    perm, inv = balanced_hierarchical_clustering(x, 7, impl=impl)
    for b in range(2):
        for label in range(3):
            mine = perm[b, 0][labels[b][perm[b, 0]] == label]
            assert torch.equal(mine, torch.sort(mine).values)
        assert torch.equal(perm[b, 1], torch.arange(700))
    assert torch.equal(inv, torch.argsort(perm, dim=-1))


@needs_cluster_op
def test_clustering_non_finite_and_zero_tokens():
    """NaN and inf tokens and an all-zero head cluster as the reference does."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 4, 400, 32, generator=gen)
    x[0, 0] = 0.0
    x[0, 1, 17] = float('nan')
    x[0, 2, 300, 5] = float('inf')
    x[0, 3, 3] = -x[0, 3, 250]  # exactly opposite tokens: split scores near 0 and large
    ext = balanced_hierarchical_clustering(x, 13, impl='ext')
    ref = balanced_hierarchical_clustering(x, 13, impl='reference')
    assert torch.equal(ext[0], ref[0]) and torch.equal(ext[1], ref[1])
    assert torch.equal(ext[0][0, 0], torch.arange(400))


@needs_cluster_op
@pytest.mark.parametrize('shape,m', [((1, 1, 400, 32), 7), ((1, 3, 300, 32), 9),
                                     ((2, 5, 150, 16), 5), ((1, 2, 100, 6), 3)])
def test_clustering_thread_count_independent(shape, m):
    """The splits of a call are spread over the threads without level barriers (fewer rows than
    threads included); the result must not depend on the thread count."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(10))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(balanced_hierarchical_clustering(x, m, impl='ext'))
    finally:
        torch.set_num_threads(threads)
    for perm, inv in results[1:]:
        assert torch.equal(perm, results[0][0]) and torch.equal(inv, results[0][1])


@pytest.mark.parametrize('impl', CLUSTER_IMPLS)
def test_clustering_ignores_grad_and_dtype(impl):
    x = torch.randn(1, 2, 60, 4, dtype=torch.float64, requires_grad=True)
    perm, _ = balanced_hierarchical_clustering(x, 8, impl=impl)
    assert not perm.requires_grad
    perm32, _ = balanced_hierarchical_clustering(x.detach().float(), 8, impl=impl)
    assert torch.equal(perm, perm32)  # computed in float32 whatever the input dtype


@needs_cluster_op
@pytest.mark.parametrize('shape,m', [((1, 1, 5, 3), 49), ((2, 3, 97, 8), 7), ((3, 1, 199, 4), 3),
                                     ((1, 2, 211, 16), 49), ((2, 2, 64, 8), 1),
                                     ((2, 1, 100, 40), 7), ((1, 2, 150, 64), 49),
                                     ((1, 2, 130, 72), 16)])
def test_clustering_compiled_matches_reference(shape, m):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[2]))
    ref = balanced_hierarchical_clustering(x, m, impl='reference')
    ext = balanced_hierarchical_clustering(x, m, impl='ext')
    # Both against the literal rule (near-ties aside), and ext's inverse against its perm.
    assert_matches_literal(ref[0], x, m, 2, 100.0)
    assert_matches_literal(ext[0], x, m, 2, 100.0)
    assert torch.equal(ext[1], torch.argsort(ext[0], dim=-1))


# --- clustered attention -----------------------------------------------------------------------


@pytest.mark.parametrize('impl', ATTENTION_IMPLS)
@pytest.mark.parametrize('n,m,o', [(7, 49, 20), (49, 49, 20), (98, 49, 20), (101, 49, 20),
                                   (50, 49, 30), (37, 5, 4), (13, 4, 0), (23, 2, 1)])
def test_attention_matches_literal_float64(impl, n, m, o):
    q, k, v = qkv((2, 2, n, 6), torch.float64, seed=n)
    perm, _ = balanced_hierarchical_clustering(q, m)
    out = clustered_attention(q, k, v, perm, m, o, impl=impl)
    for b in range(2):
        for h in range(2):
            exp = literal_attention(q[b, h], k[b, h], v[b, h], perm[b, h], m, o, 6**-0.5)
            torch.testing.assert_close(out[b, h], exp, rtol=1e-12, atol=1e-12)


@needs_attention_op
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2e-6)])
# head_dim 8 * k up to 64 runs the AVX2 kernels (where the CPU has them), others the generic loops
@pytest.mark.parametrize('shape,m,o', [((1, 1, 3, 4), 49, 20), ((2, 3, 97, 8), 7, 3),
                                       ((3, 1, 199, 16), 16, 15), ((1, 2, 211, 32), 49, 20),
                                       ((2, 1, 77, 40), 9, 4), ((1, 2, 150, 64), 49, 20),
                                       ((1, 1, 60, 72), 16, 5)])
def test_attention_compiled_matches_reference(dtype, tol, shape, m, o):
    q, k, v = qkv(shape, dtype, seed=shape[2])
    perm, _ = balanced_hierarchical_clustering(q, m)
    ref, ref_lse = clustered_attention_reference_with_lse(q, k, v, perm, m, o, 0.3)
    out, lse = torch.ops.mmboat.clustered_attention_forward(q, k, v, perm, m, o, 0.3)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)


def clustered_attention_reference_with_lse(q, k, v, perm, m, o, scale):
    from mmboat.ops import clustered_attention_reference
    return clustered_attention_reference(q, k, v, perm, m, o, scale, return_lse=True)


@pytest.mark.parametrize('impl', ATTENTION_IMPLS)
@pytest.mark.parametrize('n,m,o', [(9, 4, 2), (16, 4, 3), (11, 16, 5)])
def test_attention_gradcheck(impl, n, m, o):
    q, k, v = qkv((2, 1, n, 3), torch.float64, seed=3, requires_grad=True)
    perm, _ = balanced_hierarchical_clustering(q, m)
    assert torch.autograd.gradcheck(
        lambda a, b, c: clustered_attention(a, b, c, perm, m, o, impl=impl), (q, k, v),
        fast_mode=True)


@needs_attention_op
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize('shape,m,o', [((2, 3, 101, 8), 16, 6), ((1, 2, 150, 32), 49, 20),
                                       ((2, 1, 77, 40), 9, 4), ((1, 1, 90, 64), 16, 5),
                                       ((1, 1, 60, 72), 16, 5), ((1, 2, 45, 5), 8, 3)])
def test_attention_compiled_grad_matches_reference(dtype, tol, shape, m, o):
    """ext gradients (float32: AVX2 kernels for head_dim 8 * k <= 64) against the reference
    run in float64 on the same values."""
    q, k, v = qkv(shape, dtype, seed=5)
    perm, _ = balanced_hierarchical_clustering(q, m)
    grad = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(6))
    grads = []
    for impl, cast in (('reference', torch.float64), ('ext', dtype)):
        inputs = [t.to(cast).requires_grad_() for t in (q, k, v)]
        out = clustered_attention(*inputs, perm, m, o, impl=impl)
        grads.append(torch.autograd.grad(out, inputs, grad.to(cast)))
    for ref, ext in zip(*grads):
        assert ext.dtype == dtype
        torch.testing.assert_close(ext.double(), ref, rtol=tol, atol=tol)


@needs_attention_op
def test_attention_double_backward_raises():
    # the backward op has no derivative: a second backward must fail, not warn and go on
    q, k, v = qkv((1, 1, 20, 8), torch.float32, seed=2, requires_grad=True)
    perm, _ = balanced_hierarchical_clustering(q, 8)
    out = clustered_attention(q, k, v, perm, 8, 3, impl='ext')
    (gq, ) = torch.autograd.grad(out, [q], torch.randn_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match='not implemented'):
        torch.autograd.grad(gq.sum(), [q])


@needs_attention_op
def test_opcheck_attention():
    q, k, v = qkv((2, 2, 37, 4), torch.float32, seed=7, requires_grad=True)
    perm, _ = balanced_hierarchical_clustering(q, 8)
    torch.library.opcheck(torch.ops.mmboat.clustered_attention_forward,
                          (q, k, v, perm, 8, 3, 0.5))


@needs_cluster_op
def test_opcheck_clustering():
    x = torch.randn(2, 2, 37, 4)
    torch.library.opcheck(torch.ops.mmboat.bhc_cluster, (x, 8, 2, 100.0),
                          test_utils=('test_schema', 'test_faketensor', 'test_aot_dispatch_dynamic'))


@pytest.mark.parametrize('impl', ATTENTION_IMPLS)
@pytest.mark.parametrize('n', [1, 20, 49])
def test_single_leaf_is_plain_attention(impl, n):
    q, k, v = qkv((2, 3, n, 8), torch.float64, seed=n)
    perm, _ = balanced_hierarchical_clustering(q, 49)
    assert torch.equal(perm, torch.arange(n).expand(2, 3, n))
    out = feature_space_local_attention(q, k, v, 49, 20, impl=impl)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize('impl', ATTENTION_IMPLS)
def test_full_fsla_matches_literal(impl):
    q, k, v = qkv((2, 3, 196, 8), torch.float64, seed=11)
    out = feature_space_local_attention(q, k, v, 49, 20, impl=impl)
    torch.testing.assert_close(out, literal_fsla(q, k, v, 49, 20, 8**-0.5))


@pytest.mark.parametrize('impl', ATTENTION_IMPLS)
def test_attention_batch_independent(impl):
    q, k, v = qkv((2, 2, 120, 8), torch.float32, seed=13)
    out = feature_space_local_attention(q, k, v, 16, 5, impl=impl)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[1] = torch.randn(2, 120, 8)
    out2 = feature_space_local_attention(q2, k2, v2, 16, 5, impl=impl)
    assert torch.equal(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])


@pytest.mark.parametrize('impl', ATTENTION_IMPLS)
def test_permutation_equivariance(impl):
    """Shuffling tokens inside each half of the initial order (which fixes the initial
    centroids) shuffles the FSLA output the same way; any shuffle of tokens together with the
    matching perm shuffles the clustered-attention output."""
    n = 150
    q, k, v = qkv((1, 2, n, 8), torch.float64, seed=17)
    gen = torch.Generator().manual_seed(0)
    sigma = torch.cat([torch.randperm(n // 2, generator=gen),
                       n // 2 + torch.randperm(n - n // 2, generator=gen)])
    out = feature_space_local_attention(q, k, v, 20, 7, impl=impl)
    shuffled = [t[:, :, sigma] for t in (q, k, v)]
    out_s = feature_space_local_attention(*shuffled, 20, 7, impl=impl)
    torch.testing.assert_close(out_s, out[:, :, sigma])
    # Arbitrary shuffle, perm carried along: token sigma_inv[perm] in the shuffled input.
    tau = torch.randperm(n, generator=gen)
    perm, _ = balanced_hierarchical_clustering(q, 20)
    tau_inv = torch.empty_like(tau).scatter_(0, tau, torch.arange(n))
    out_t = clustered_attention(*(t[:, :, tau] for t in (q, k, v)), tau_inv[perm], 20, 7,
                                impl=impl)
    torch.testing.assert_close(out_t, clustered_attention(q, k, v, perm, 20, 7,
                                                          impl=impl)[:, :, tau])


def test_compile_reference_and_ext():
    q, k, v = qkv((1, 2, 60, 8), torch.float32, seed=19)
    fn = torch.compile(lambda a, b, c: feature_space_local_attention(a, b, c, 16, 4),
                       backend='eager', fullgraph=False)
    torch.testing.assert_close(fn(q, k, v), feature_space_local_attention(q, k, v, 16, 4))


# --- bad input ---------------------------------------------------------------------------------


def test_clustering_bad_inputs():
    x = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match=r'x must have shape \[B, heads, N, d\]'):
        balanced_hierarchical_clustering(x[0])
    with pytest.raises(TypeError, match='floating-point'):
        balanced_hierarchical_clustering(torch.ones(1, 1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='cluster_size must be >= 1'):
        balanced_hierarchical_clustering(x, 0)
    with pytest.raises(ValueError, match='iters must be >= 0'):
        balanced_hierarchical_clustering(x, 4, -1)
    with pytest.raises(ValueError, match='tau must be finite'):
        balanced_hierarchical_clustering(x, 4, 2, float('inf'))
    with pytest.raises(ValueError, match='at least one token'):
        balanced_hierarchical_clustering(torch.randn(1, 1, 0, 4))
    with pytest.raises(ValueError, match='impl must be one of'):
        balanced_hierarchical_clustering(x, impl='fast')


def test_attention_bad_inputs():
    q, k, v = qkv((1, 2, 10, 4))
    perm, _ = balanced_hierarchical_clustering(q, 4)
    with pytest.raises(ValueError, match=r'query must have shape \[B, heads, N, d\]'):
        clustered_attention(q[0], k, v, perm)
    with pytest.raises(ValueError, match='same shape'):
        clustered_attention(q, k[:, :, :5], v, perm, 4, 1)
    with pytest.raises(ValueError, match='cluster_size must be >= 1'):
        clustered_attention(q, k, v, perm, 0, 0)
    with pytest.raises(ValueError, match='overlap must be >= 0'):
        clustered_attention(q, k, v, perm, 4, -1)
    with pytest.raises(ValueError, match='overlap must be smaller than cluster_size'):
        clustered_attention(q, k, v, perm, 4, 4)
    with pytest.raises(TypeError, match='same dtype'):
        clustered_attention(q, k.double(), v, perm, 4, 1)
    with pytest.raises(ValueError, match='same device'):
        clustered_attention(q, k.to('meta'), v, perm, 4, 1)
    with pytest.raises(TypeError, match='perm must be int64'):
        clustered_attention(q, k, v, perm.int(), 4, 1)
    with pytest.raises(ValueError, match=r'perm must have shape \[B, heads, N\]'):
        clustered_attention(q, k, v, perm[:, :1], 4, 1)
    with pytest.raises(TypeError, match='cluster_size must be an int'):
        clustered_attention(q, k, v, perm, 4.0, 1)


@needs_attention_op
def test_compiled_op_checks():
    q, k, v = qkv((1, 2, 10, 4))
    perm, _ = balanced_hierarchical_clustering(q, 4)
    op = torch.ops.mmboat.clustered_attention_forward
    with pytest.raises(RuntimeError, match='perm must be a permutation'):
        op(q, k, v, torch.zeros_like(perm), 4, 1, 0.5)
    with pytest.raises(RuntimeError, match='perm must be a permutation'):
        op(q, k, v, perm + 1, 4, 1, 0.5)
    with pytest.raises(RuntimeError, match='overlap'):
        op(q, k, v, perm, 4, 4, 0.5)
    with pytest.raises(RuntimeError, match='same dtype'):
        op(q, k.double(), v, perm, 4, 1, 0.5)
    with pytest.raises(RuntimeError, match='cluster_size'):
        torch.ops.mmboat.bhc_cluster(q, 0, 2, 100.0)
    with pytest.raises(RuntimeError, match='4 dimensions'):
        torch.ops.mmboat.bhc_cluster(q[0], 4, 2, 100.0)
