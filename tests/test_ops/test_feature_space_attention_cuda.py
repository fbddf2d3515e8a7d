"""CUDA FSLA (BOAT) ops against the pure-PyTorch references and the CPU kernels.

Needs a CUDA device and the CUDA build of ``mmboat._ext`` (``tools/gpu_check.sh`` builds it and
runs this file); skipped otherwise. ``bhc_cluster`` is compared with the reference clustering
(perm and inv_perm) and the CPU kernel; ``clustered_attention_forward`` / ``_backward`` with the
gather-based reference evaluated in float32 on the same (rounded) inputs and with the CPU
kernels (float32 on CPU), in float32, float16 and bfloat16, over layouts with equal and unequal
leaves, a single leaf (L = 0) and an overlap larger than the sibling leaf; float64 gradchecks of
the CUDA kernels; ``torch.autocast('cuda')`` (clustering and attention in float32).

Tolerances: float32 ``1e-4``/``1e-4``; float16 atol ``5e-3``, rtol ``1e-2``; bfloat16
``4e-2``/``4e-2``; gradients 3x those (all against float32 on the same rounded inputs, so only
the summation order and the final rounding differ). float64: ``torch.autograd.gradcheck`` with
``eps=1e-6, atol=1e-5, rtol=1e-3, nondet_tol=1e-10``.
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
    with pytest.raises(RuntimeError, match='overlap'):
        torch.ops.mmboat.clustered_attention_forward(q, k, v, perm, 8, 8, 1.0)
    with pytest.raises(RuntimeError, match='same device'):
        torch.ops.mmboat.clustered_attention_forward(q, k.cpu(), v, perm, 8, 2, 1.0)


def _random_perm(batch, heads, num_tokens, seed=2):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(num_tokens, generator=gen) for _ in range(batch * heads)])
    return perm.view(batch, heads, num_tokens).cuda()


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_cluster_cuda_matches_cpu_kernel(case):
    num_tokens, m, _, dim = case
    x, *_ = _inputs(num_tokens, dim, torch.float32, seed=4)
    perm, inv = torch.ops.mmboat.bhc_cluster(x, m, 2, 100.0)
    perm_cpu, inv_cpu = torch.ops.mmboat.bhc_cluster(x.cpu(), m, 2, 100.0)
    arange = torch.arange(num_tokens, device='cuda').expand_as(perm)
    assert torch.equal(perm.gather(-1, inv), arange)
    mismatch = (perm.cpu() != perm_cpu).float().mean().item()
    assert mismatch <= 0.02, f'{mismatch:.3f} of perm positions differ from the CPU kernel'
    if mismatch == 0:
        assert torch.equal(inv.cpu(), inv_cpu)


@pytest.mark.parametrize('case', CASES, ids=IDS)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_attention_cuda_matches_cpu_kernels(case, dtype):
    """CUDA kernels in ``dtype`` against the CPU kernels (float32, on the same rounded inputs)."""
    num_tokens, m, o, dim = case
    q, k, v, grad = _inputs(num_tokens, dim, dtype, seed=5)
    perm = _random_perm(2, 3, num_tokens, seed=6)
    scale = dim**-0.5
    out, lse = torch.ops.mmboat.clustered_attention_forward(q, k, v, perm, m, o, scale)
    cpu = [t.cpu().float() for t in (q, k, v, grad)]
    out_cpu, lse_cpu = torch.ops.mmboat.clustered_attention_forward(*cpu[:3], perm.cpu(), m, o,
                                                                    scale)
    torch.testing.assert_close(out.cpu().float(), out_cpu, **TOL[dtype])
    torch.testing.assert_close(lse.cpu().float(), lse_cpu, **TOL[dtype])
    grads = torch.ops.mmboat.clustered_attention_backward(grad, q, k, v, perm, out, lse, m, o,
                                                           scale)
    grads_cpu = torch.ops.mmboat.clustered_attention_backward(
        cpu[3], *cpu[:3], perm.cpu(), out_cpu, lse_cpu, m, o, scale)
    for name, got, ref in zip(('dq', 'dk', 'dv'), grads, grads_cpu):
        torch.testing.assert_close(got.cpu().float(), ref, **GRAD_TOL[dtype],
                                   msg=lambda msg, name=name: f'{name}: {msg}')


# (num_tokens, cluster_size, overlap, head_dim): small, for float64 gradchecks.
GRADCHECK_CASES = [(23, 4, 3, 5), (37, 49, 20, 4), (40, 8, 3, 3), (9, 1, 0, 6)]
GRADCHECK_IDS = [f'N{c[0]}-m{c[1]}-o{c[2]}-d{c[3]}' for c in GRADCHECK_CASES]
# nondet_tol: the backward adds dK/dV contributions of a leaf's queries with shared-memory
# atomics, so two backward runs may differ in the last bits.
GRADCHECK = dict(eps=1e-6, atol=1e-5, rtol=1e-3, nondet_tol=1e-10)


def _require_float64_kernel(call, what):
    try:
        return call()
    except RuntimeError as exc:
        pytest.fail(f'{what} rejects float64 CUDA tensors, so its CUDA kernels cannot be '
                    f'gradchecked in float64: {str(exc).splitlines()[0]}')


@pytest.mark.parametrize('case', GRADCHECK_CASES, ids=GRADCHECK_IDS)
def test_attention_float64_gradcheck(case):
    """Gradcheck of the CUDA kernels in float64, through the registered op (its autograd) and
    through the public ``clustered_attention(..., impl='ext')``."""
    from mmboat.ops import clustered_attention

    num_tokens, m, o, dim = case
    gen = torch.Generator(device='cuda').manual_seed(0)
    inputs = [torch.randn(1, 2, num_tokens, dim, device='cuda', dtype=torch.float64,
                          generator=gen).requires_grad_() for _ in range(3)]
    perm = _random_perm(1, 2, num_tokens, seed=7)
    scale = dim**-0.5

    def op(q, k, v):
        return torch.ops.mmboat.clustered_attention_forward(q, k, v, perm, m, o, scale)[0]

    out = _require_float64_kernel(lambda: op(*inputs),
                                  'torch.ops.mmboat.clustered_attention_forward')
    assert out.dtype == torch.float64 and out.is_cuda
    ref = clustered_attention_reference(*[t.detach() for t in inputs], perm, m, o, scale)
    torch.testing.assert_close(out.detach(), ref, atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(op, inputs, **GRADCHECK)

    def entry(q, k, v):
        return clustered_attention(q, k, v, perm, m, o, scale, impl='ext')

    _require_float64_kernel(lambda: entry(*inputs),
                            'mmboat.ops.clustered_attention(impl="ext") (the dtype table of '
                            'mmboat/ops/feature_space_attention.py)')
    assert torch.autograd.gradcheck(entry, inputs, **GRADCHECK)


@pytest.mark.parametrize('amp', [torch.float16, torch.bfloat16], ids=str)
def test_ops_under_cuda_autocast_run_in_float32(amp):
    """Under ``torch.autocast('cuda')`` the clustering and the clustered attention compute in
    float32: float32 output, gradients in the inputs' dtype, float32 inputs unchanged."""
    from mmboat.ops import balanced_hierarchical_clustering, clustered_attention

    q, k, v, grad = _inputs(150, 32, torch.float32, seed=8)
    half = [t.to(amp).requires_grad_() for t in (q, k, v)]
    perm, inv = balanced_hierarchical_clustering(half[0].detach().float(), 16, impl='ext')
    with torch.autocast('cuda', dtype=amp):
        perm_amp, inv_amp = balanced_hierarchical_clustering(half[0].detach(), 16, impl='ext')
        out = clustered_attention(*half, perm, 16, 10, impl='ext')
        out32 = clustered_attention(q, k, v, perm, 16, 10, impl='ext')
    assert torch.equal(perm_amp, perm) and torch.equal(inv_amp, inv)
    assert out.dtype == torch.float32 and out32.dtype == torch.float32
    torch.testing.assert_close(out32, clustered_attention(q, k, v, perm, 16, 10, impl='ext'),
                               atol=0, rtol=0)
    leaves = [t.detach().float().requires_grad_() for t in half]
    ref = clustered_attention_reference(*leaves, perm, 16, 10)
    torch.testing.assert_close(out, ref.detach(), **TOL[torch.float32])
    grads = torch.autograd.grad(out, half, grad)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == amp
        torch.testing.assert_close(got.float(), want, **GRAD_TOL[amp])


@pytest.mark.parametrize('amp', [torch.float16, torch.bfloat16], ids=str)
def test_fsla_layer_under_cuda_autocast(amp):
    """The FSLA layer under ``torch.autocast('cuda')``: output in the autocast dtype, float32
    parameter gradients; against the same layer on the reference ops under the same autocast
    (a near-tie in the clustering may move a few tokens to another leaf: at most 5% of the
    tokens may differ). Needs mmengine (``mmboat.models``)."""
    pytest.importorskip('mmengine', reason='mmboat.models needs mmengine (tools/gpu_check.sh '
                        '--wheels)')
    from mmboat.models.layers import FeatureSpaceLocalAttention

    torch.manual_seed(0)
    layer = FeatureSpaceLocalAttention(64, 2, cluster_size=16, overlap=4, impl='ext').cuda()
    x = torch.randn(2, 14 * 15, 64, device='cuda')
    with torch.autocast('cuda', dtype=amp):
        out = layer(x, (14, 15))
        layer.impl = 'reference'
        ref = layer(x, (14, 15))
        layer.impl = 'ext'
    assert out.dtype == amp and ref.dtype == amp
    tol = dict(atol=5e-2, rtol=5e-2)
    bad = ~((out.float() - ref.float()).abs() <= tol['atol'] + tol['rtol'] * ref.float().abs())
    frac = bad.any(-1).float().mean().item()
    assert frac <= 0.05, f'{frac:.3f} of the tokens differ from the reference ops'
    grads = torch.autograd.grad(out.float().sum(), [layer.qkv.weight, layer.get_v.weight])
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
