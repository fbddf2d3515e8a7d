"""CUDA FSLA (BOAT) ops against the pure-PyTorch references.

Needs a CUDA device and the CUDA build of ``mmboat._ext``: ``bhc_cluster`` is compared with
the reference clustering (perm and inv_perm), ``clustered_attention_forward`` / ``_backward``
with the gather-based reference evaluated in float32 on the same (rounded) inputs, in float32,
float16 and bfloat16, over layouts with equal and unequal leaves, a single leaf (L = 0) and an
overlap larger than the sibling leaf.
"""
import pytest
import torch

from mmboat.ops.feature_space_attention_reference import (
    balanced_hierarchical_clustering_reference, clustered_attention_reference)


def _cuda_ops_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import mmboat._ext  # noqa: F401
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            'mmboat::clustered_attention_forward', 'CUDA')
    except (ImportError, RuntimeError):
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _cuda_ops_available(),
                       reason='needs a CUDA device and the CUDA build of mmboat._ext')
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}
GRAD_TOL = {dt: dict(atol=3 * t['atol'], rtol=3 * t['rtol']) for dt, t in TOL.items()}

# (num_tokens, cluster_size, overlap, head_dim)
CASES = [
    (196, 49, 20, 32),  # N = m * 2^L: equal leaves
    (100, 49, 20, 16),  # unequal split (25 x 4)
    (37, 49, 20, 8),  # L = 0: a single leaf, plain attention
    (23, 4, 3, 24),  # leaves of 2 and 3 tokens: overlap larger than the sibling
    (9, 1, 0, 40),  # m = 1: leaves of one token, some levels with empty groups
    (150, 16, 10, 72),  # head_dim > 64, unequal leaves
]
IDS = [f'N{c[0]}-m{c[1]}-o{c[2]}-d{c[3]}' for c in CASES]


def _inputs(num_tokens, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = torch.randn(4, 2, 3, num_tokens, dim, generator=gen).unbind(0)
    return [t.to('cuda', dtype) for t in (q, k, v, g)]


@pytest.mark.parametrize('case', CASES, ids=IDS)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_cluster_matches_reference(case, dtype):
    num_tokens, m, _, dim = case
    x, *_ = _inputs(num_tokens, dim, dtype)
    perm, inv = torch.ops.mmboat.bhc_cluster(x, m, 2, 100.0)
    ref_perm, ref_inv = balanced_hierarchical_clustering_reference(x.cpu(), m, 2, 100.0)
    assert perm.dtype == torch.int64 and perm.device == x.device
    arange = torch.arange(num_tokens, device='cuda').expand_as(perm)
    assert torch.equal(perm.gather(-1, inv), arange)
    # Summation order differs from the CPU reference, so a near-tie may flip: allow a tiny
    # fraction of mismatching positions, but the perms must agree almost everywhere.
    mismatch = (perm.cpu() != ref_perm).float().mean().item()
    assert mismatch <= 0.02, f'{mismatch:.3f} of perm positions differ from the reference'
    if mismatch == 0:
        assert torch.equal(inv.cpu(), ref_inv)


@pytest.mark.parametrize('case', CASES, ids=IDS)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_attention_forward_backward_match_reference(case, dtype):
    num_tokens, m, o, dim = case
    q, k, v, grad = _inputs(num_tokens, dim, dtype, seed=1)
    # A random permutation per row: the attention ops accept any perm, not only clusterings.
    gen = torch.Generator().manual_seed(2)
    perm = torch.stack([torch.randperm(num_tokens, generator=gen) for _ in range(6)])
    perm = perm.view(2, 3, num_tokens).cuda()
    scale = dim**-0.5
    out, lse = torch.ops.mmboat.clustered_attention_forward(q, k, v, perm, m, o, scale)
    assert out.dtype == dtype and lse.dtype == dtype and lse.shape == q.shape[:3]

    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = clustered_attention_reference(*leaves, perm, m, o, scale, return_lse=True)
    torch.testing.assert_close(out.float(), ref_out.detach(), **TOL[dtype])
    torch.testing.assert_close(lse.float(), ref_lse.detach(), **TOL[dtype])

    ref_out.backward(grad.float())
    grads = torch.ops.mmboat.clustered_attention_backward(grad, q, k, v, perm, out, lse, m, o,
                                                           scale)
    for got, ref in zip(grads, leaves):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref.grad, **GRAD_TOL[dtype])


def test_backward_is_deterministic():
    q, k, v, grad = _inputs(100, 16, torch.float32, seed=3)
    perm, _ = torch.ops.mmboat.bhc_cluster(q, 16, 2, 100.0)
    out, lse = torch.ops.mmboat.clustered_attention_forward(q, k, v, perm, 16, 10, 0.25)
    first = torch.ops.mmboat.clustered_attention_backward(grad, q, k, v, perm, out, lse, 16, 10,
                                                          0.25)
    second = torch.ops.mmboat.clustered_attention_backward(grad, q, k, v, perm, out, lse, 16, 10,
                                                           0.25)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bad_inputs_raise_clear_errors():
    q, k, v, _ = _inputs(20, 8, torch.float32)
    perm = torch.arange(20, device='cuda').expand(2, 3, 20).contiguous()
    bad = perm.clone()
    bad[0, 0, 0] = 1  # duplicate token
    with pytest.raises(RuntimeError, match='permutation'):
        torch.ops.mmboat.clustered_attention_forward(q, k, v, bad, 8, 2, 1.0)
    with pytest.raises(RuntimeError, match='float64 is supported on CPU only'):
        torch.ops.mmboat.clustered_attention_forward(q.double(), k.double(), v.double(), perm,
                                                     8, 2, 1.0)
    with pytest.raises(RuntimeError, match='overlap'):
        torch.ops.mmboat.clustered_attention_forward(q, k, v, perm, 8, 8, 1.0)
    with pytest.raises(RuntimeError, match='same device'):
        torch.ops.mmboat.clustered_attention_forward(q, k.cpu(), v, perm, 8, 2, 1.0)
