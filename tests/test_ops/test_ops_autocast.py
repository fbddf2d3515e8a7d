"""The ops under torch.autocast (mmboat/ops/autocast.py): every NA op (fused 1-D/2-D/3-D,
unfused qk/av) and the FSLA ops, on the compiled and the reference path, against the float32
reference; direct torch.ops callers; float64 untouched; torch.compile under autocast.

Tolerances: under bfloat16 autocast the inputs are rounded to bfloat16 (8 significant bits,
relative rounding error <= 2**-9 ~ 0.2%) and the output is rounded once more. Against the
float32 reference evaluated on the *same rounded inputs* the only difference is that final
rounding plus float32 summation order, so ``atol=rtol=1e-2`` (a few bfloat16 ulps) holds.
Against the float32 reference on the unrounded inputs, logits of size ~sqrt(D) * |q||k| move by
a few 0.2% steps each, so the attention weights and outputs move by a few percent at most:
``atol=rtol=5e-2``.
"""
import pytest
import torch

from mmboat.ops import (balanced_hierarchical_clustering, clustered_attention, na1d, na2d,
                        na2d_av, na2d_qk, na3d, neighborhood_attention_op_available)
from mmboat.ops.autocast import cast_inputs, compute_dtype
from mmboat.ops.ext_loader import op_available
from mmboat.ops.feature_space_attention_reference import (
    balanced_hierarchical_clustering_reference, clustered_attention_reference)
from mmboat.ops.neighborhood_attention_reference import (nand_av_reference, nand_qk_reference,
                                                          nand_reference)

HAS_NA = neighborhood_attention_op_available('na2d_forward', 'cpu')
HAS_UNFUSED = neighborhood_attention_op_available('na2d_qk', 'cpu')
HAS_FSLA = op_available('clustered_attention_forward', 'cpu')
NA_IMPLS = ['reference', pytest.param('ext', marks=pytest.mark.skipif(
    not HAS_NA, reason='mmboat._ext lacks the NA CPU ops'))]
UNFUSED_IMPLS = ['reference', pytest.param('ext', marks=pytest.mark.skipif(
    not HAS_UNFUSED, reason='mmboat._ext lacks na2d_qk/av'))]
FSLA_IMPLS = ['reference', pytest.param('ext', marks=pytest.mark.skipif(
    not HAS_FSLA, reason='mmboat._ext lacks the FSLA CPU ops'))]
SAME_INPUTS = dict(atol=1e-2, rtol=1e-2)
FLOAT32 = dict(atol=5e-2, rtol=5e-2)
AMP = torch.bfloat16


def _randn(*shape, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).requires_grad_(grad)


def _rounded(*tensors):
    """float32 copies of the tensors rounded to the autocast dtype (leaves for gradients)."""
    return [t.detach().to(AMP).float().requires_grad_() for t in tensors]


def _grads(out, tensors, seed=5):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out.float() * g).sum(), tensors)


NA_CASES = {
    1: (na1d, (2, 3, 19, 16), 5, 2),
    2: (na2d, (2, 2, 9, 10, 16), 3, (2, 3)),
    3: (na3d, (1, 2, 5, 6, 7, 8), 3, (1, 2, 1)),
}


@pytest.mark.parametrize('impl', NA_IMPLS)
@pytest.mark.parametrize('nd', [1, 2, 3])
def test_fused_na_under_autocast(impl, nd):
    fn, shape, k, d = NA_CASES[nd]
    q, key, v = (_randn(*shape, seed=s) for s in range(3))
    rpb = _randn(shape[1], *[2 * k - 1] * nd, seed=3)
    with torch.autocast('cpu', dtype=AMP):
        out = fn(q, key, v, rpb, kernel_size=k, dilation=d, impl=impl)
    assert out.dtype == AMP
    grads = _grads(out, (q, key, v, rpb))
    # Gradients come back in each input's own dtype: rpb (a float32 parameter) stays float32.
    assert all(g.dtype == torch.float32 for g in grads)

    rounded = _rounded(q, key, v, rpb)
    ref = nand_reference(*rounded, k, d)
    torch.testing.assert_close(out.float(), ref, **SAME_INPUTS)
    ref32 = nand_reference(q, key, v, rpb, k, d)
    torch.testing.assert_close(out.float(), ref32, **FLOAT32)
    # Gradients of the float32 computation on the rounded inputs; the bfloat16 backward rounds
    # the saved output and the incoming gradient as well.
    for g, g_ref in zip(grads, _grads(ref, rounded)):
        torch.testing.assert_close(g, g_ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize('impl', UNFUSED_IMPLS)
def test_unfused_na_under_autocast(impl):
    q, key, v = (_randn(2, 2, 8, 9, 16, seed=s) for s in range(3))
    rpb = _randn(2, 5, 5, seed=3)
    with torch.autocast('cpu', dtype=AMP):
        logits = na2d_qk(q * 0.25, key, rpb, kernel_size=3, dilation=2, impl=impl)
        attn = logits.softmax(-1)
        out = na2d_av(attn, v, kernel_size=3, dilation=2, impl=impl)
    assert logits.dtype == AMP and out.dtype == AMP
    grads = _grads(out, (q, key, v, rpb))
    assert all(g.dtype == torch.float32 for g in grads)
    ref_logits = nand_qk_reference(q * 0.25, key, rpb, 3, 2)
    torch.testing.assert_close(logits.float(), ref_logits, **FLOAT32)
    ref = nand_av_reference(ref_logits.softmax(-1), v, 3, 2)
    torch.testing.assert_close(out.float(), ref, **FLOAT32)
    for g, g_ref in zip(grads, _grads(ref, (q, key, v, rpb))):
        torch.testing.assert_close(g, g_ref, atol=1e-1, rtol=1e-1)


@pytest.mark.parametrize('impl', NA_IMPLS)
def test_na_float64_not_cast_under_autocast(impl):
    q, key, v = (_randn(1, 2, 7, 7, 8, seed=s).double() for s in range(3))
    rpb = _randn(2, 5, 5, seed=3).double()
    with torch.autocast('cpu', dtype=AMP):
        out = na2d(q, key, v, rpb, kernel_size=3, impl=impl)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, nand_reference(q, key, v, rpb, 3), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize('impl', FSLA_IMPLS)
def test_clustered_attention_under_autocast_runs_in_float32(impl):
    q, key, v = (_randn(2, 3, 101, 8, seed=s) for s in range(3))
    perm, _ = balanced_hierarchical_clustering(q.detach(), cluster_size=16)
    with torch.autocast('cpu', dtype=AMP):
        # Typical caller: the q/k/v projection ran under autocast, so its outputs are bfloat16.
        out = clustered_attention(q.to(AMP), key.to(AMP), v, perm, 16, 6, impl=impl)
    assert out.dtype == torch.float32
    grads = _grads(out, (q, key, v))
    assert all(g.dtype == torch.float32 for g in grads)
    rounded = [q.detach().to(AMP).float(), key.detach().to(AMP).float(), v.detach()]
    ref = clustered_attention_reference(*rounded, perm, 16, 6)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('impl', FSLA_IMPLS)
def test_clustering_under_autocast_is_float32(impl):
    x = _randn(2, 2, 150, 16, grad=False)
    with torch.autocast('cpu', dtype=AMP):
        perm, inv = balanced_hierarchical_clustering(x, cluster_size=16, impl=impl)
    ref, ref_inv = balanced_hierarchical_clustering_reference(x, 16)
    assert perm.dtype == torch.int64
    assert torch.equal(perm, ref) and torch.equal(inv, ref_inv)


# --- the policy itself and direct torch.ops callers -------------------------------------------


def test_policy():
    cpu = torch.device('cpu')
    assert compute_dtype('neighborhood_attention', cpu) is None
    with torch.autocast('cpu', dtype=AMP):
        assert compute_dtype('neighborhood_attention', cpu) == AMP
        assert compute_dtype('clustered_attention', cpu) == torch.float32
        assert compute_dtype('neighborhood_attention', torch.device('meta')) is None
    x32, x64, idx = torch.ones(2), torch.ones(2, dtype=torch.float64), torch.arange(2)
    a, b, c, d, e = cast_inputs(AMP, x32, x64, idx, None, 3)
    assert a.dtype == AMP and b is x64 and c is idx and d is None and e == 3


@pytest.mark.skipif(not HAS_NA, reason='mmboat._ext lacks the NA CPU ops')
def test_direct_op_calls_follow_the_policy():
    q, key, v = (_randn(1, 2, 7, 8, 16, seed=s) for s in range(3))
    rpb = _randn(2, 5, 5, seed=3)
    args = ([3, 3], [1, 1], [False, False], 0.25)
    with torch.autocast('cpu', dtype=AMP):
        out, lse = torch.ops.mmboat.na2d_forward(q, key, v, rpb, *args)
        attn = torch.ops.mmboat.na2d_qk(q, key, rpb, *args[:3])
        av = torch.ops.mmboat.na2d_av(attn.float().softmax(-1), v, *args[:3])
    assert out.dtype == AMP and lse.dtype == torch.float32
    assert attn.dtype == AMP and av.dtype == AMP
    (g_rpb, ) = torch.autograd.grad(out.float().sum(), [rpb])
    assert g_rpb.dtype == torch.float32
    ref_out, ref_lse = nand_reference(*_rounded(q, key, v, rpb), 3, 1, scale=0.25,
                                      return_lse=True)
    torch.testing.assert_close(out.float(), ref_out, **SAME_INPUTS)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_FSLA, reason='mmboat._ext lacks the FSLA CPU ops')
def test_direct_clustered_attention_call_follows_the_policy():
    q = _randn(1, 2, 60, 8, grad=False)
    perm, _ = balanced_hierarchical_clustering(q, cluster_size=16)
    with torch.autocast('cpu', dtype=AMP):
        out, lse = torch.ops.mmboat.clustered_attention_forward(q.to(AMP), q.to(AMP), q.to(AMP),
                                                                perm, 16, 4, 0.5)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


@pytest.mark.skipif(not HAS_NA, reason='mmboat._ext lacks the NA CPU ops')
@pytest.mark.slow
def test_torch_compile_na_layer_under_autocast():
    pytest.importorskip('mmengine', reason='mmboat.models needs mmengine')
    from mmboat.models.layers import NeighborhoodAttention2d

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(embed_dims=32, num_heads=2, kernel_size=3, dilation=2)
    x = torch.randn(2, 9, 10, 32)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.autocast('cpu', dtype=AMP):
        out = compiled(x)
        ref = layer(x)
    assert out.dtype == ref.dtype == AMP
    torch.testing.assert_close(out.float(), ref.float(), **SAME_INPUTS)
    grads = torch.autograd.grad(out.float().sum(), [layer.rpb, layer.qkv.weight])
    grads_ref = torch.autograd.grad(ref.float().sum(), [layer.rpb, layer.qkv.weight])
    assert grads[0].dtype == torch.float32
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=2e-2, rtol=2e-2)


# --- device-agnostic references (no host round trips) ----------------------------------------


@pytest.mark.parametrize('causal', [False, True])
def test_na_reference_runs_on_meta_tensors(causal):
    """A reference that ran ``.item()``/``bool(tensor)`` on data (a host sync on CUDA) fails on
    meta tensors, which carry no data."""
    q, key, v = (torch.empty(2, 3, 9, 10, 8, device='meta') for _ in range(3))
    rpb = None if causal else torch.empty(3, 5, 5, device='meta')
    out, lse = nand_reference(q, key, v, rpb, 3, 2, is_causal=causal, return_lse=True)
    assert out.shape == q.shape and out.device.type == 'meta' and lse.shape == q.shape[:-1]
    attn = nand_qk_reference(q, key, rpb, 3, 2, causal)
    assert nand_av_reference(attn, v, 3, 2, causal).shape == q.shape


def test_fsla_references_run_on_meta_tensors():
    x = torch.empty(2, 3, 101, 8, device='meta')
    perm, inv = balanced_hierarchical_clustering_reference(x, 16)
    assert perm.shape == inv.shape == (2, 3, 101) and perm.device.type == 'meta'
    out, lse = clustered_attention_reference(x, x, x, perm, 16, 6, return_lse=True)
    assert out.shape == x.shape and lse.shape == (2, 3, 101)


@pytest.mark.skipif(not (HAS_NA and HAS_FSLA), reason='needs the compiled CPU ops')
def test_tensors_on_a_device_without_kernels_fall_back_with_one_warning(monkeypatch):
    """A build without kernels for the tensors' device (a CPU-only build given CUDA tensors;
    here meta tensors, with the fake kernels that normally serve them hidden) warns once per
    op and runs the reference on that device."""
    import warnings

    from mmboat.ops import ext_loader

    monkeypatch.setattr(ext_loader, '_warned_missing_kernel', set())
    for name in ('na2d_forward', 'bhc_cluster', 'clustered_attention_forward'):
        monkeypatch.setitem(ext_loader._KERNELS, (name, 'meta'), False)
    q = torch.empty(1, 2, 9, 9, 8, device='meta')
    rpb = torch.empty(2, 5, 5, device='meta')
    x = torch.empty(1, 2, 60, 8, device='meta')
    with pytest.warns(RuntimeWarning) as record:
        out = na2d(q, q, q, rpb, kernel_size=3)
        perm, _ = balanced_hierarchical_clustering(x, cluster_size=16)
        fsla = clustered_attention(x, x, x, perm, 16, 4)
    messages = [str(w.message) for w in record]
    for op in ('na2d_forward', 'bhc_cluster', 'clustered_attention_forward'):
        assert sum(f'no META kernel for mmboat::{op}' in m for m in messages) == 1, messages
    assert out.shape == q.shape and fsla.shape == x.shape and perm.device.type == 'meta'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        na2d(q, q, q, rpb, kernel_size=3)
    with pytest.raises(RuntimeError, match='no META kernel for mmboat::na2d_forward'):
        na2d(q, q, q, rpb, kernel_size=3, impl='ext')
