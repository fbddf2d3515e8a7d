"""Empty inputs and meta tensors through every mmboat op, its layer and the four backbones.

* Batch 0 or 0 heads: the pure-PyTorch references return empty outputs and the gradients of
  the compiled path (empty input gradients, an all-zero rpb gradient of the rpb's shape), for
  fused na1d/na2d/na3d, unfused na2d_qk/na2d_av, the clustering and the clustered attention.
  Zero tokens are not legal: both paths stop with the same error.
* Meta tensors (and FakeTensors, which torch.compile traces with) run the compiled ops' fake
  kernels: shapes propagate without data and the references are never called. Without the
  extension (or with ``impl='reference'``) the references propagate meta shapes too.
* Models built under ``torch.device('meta')`` forward (and backward) with the output shapes of
  a real CPU run.
"""
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mmboat.ops.feature_space_attention as fsla_ops
import mmboat.ops.neighborhood_attention as na_ops
from mmboat.models import NAT, BOATCSWinTransformer, BOATSwinTransformer, DiNAT
from mmboat.models.layers import FeatureSpaceLocalAttention, NeighborhoodAttention2d
from mmboat.ops import ext_loader
from mmboat.ops.feature_space_attention import (balanced_hierarchical_clustering,
                                                clustered_attention,
                                                feature_space_local_attention)
from mmboat.ops.neighborhood_attention import (na1d, na2d, na2d_av, na2d_qk, na3d,
                                               neighborhood_attention_op_available)

NA_FUSED = {1: na1d, 2: na2d, 3: na3d}
K = 3  # kernel size of the NA tests (rpb side 2K - 1 = 5)
# The references the Python entry points fall back to (names in the ops modules' namespaces).
REFERENCES = [(na_ops, 'nand_reference'), (na_ops, 'na2d_qk_reference'),
              (na_ops, 'na2d_av_reference'),
              (fsla_ops, 'balanced_hierarchical_clustering_reference'),
              (fsla_ops, 'clustered_attention_reference')]


def _fsla_compiled() -> bool:
    return all(ext_loader.op_available(name, 'cpu')
               for name in ('bhc_cluster', 'clustered_attention_forward'))


HAS_NA_OPS = all(
    neighborhood_attention_op_available(name, 'cpu')
    for name in ('na1d_forward', 'na2d_forward', 'na3d_forward', 'na2d_qk', 'na2d_av'))
HAS_ALL_OPS = HAS_NA_OPS and _fsla_compiled()
IMPLS = ['reference'] + (['ext'] if HAS_ALL_OPS else [])
needs_ops = pytest.mark.skipif(not HAS_ALL_OPS, reason='mmboat._ext with all ops not built')


@pytest.fixture
def no_reference(monkeypatch):
    """Make every reference fallback raise: the call must take the compiled op (fake kernel)."""

    def forbid(name: str) -> Callable:

        def raise_(*args, **kwargs):
            raise AssertionError(f'{name} ran; the fake kernel should have')

        return raise_

    for module, name in REFERENCES:
        monkeypatch.setattr(module, name, forbid(name))
    monkeypatch.delenv('MMBOAT_OPS_IMPL', raising=False)


@pytest.fixture
def without_ext(monkeypatch):
    """Simulate a checkout whose extension did not build: everything runs on the references."""
    monkeypatch.setitem(ext_loader._state, 'loaded', False)
    monkeypatch.setitem(ext_loader._state, 'error', 'ImportError: simulated')
    monkeypatch.setitem(ext_loader._state, 'warned', True)  # no fallback warning
    monkeypatch.delenv('MMBOAT_OPS_IMPL', raising=False)


def _leaf(*shape, device='cpu') -> torch.Tensor:
    return torch.randn(*shape, device=device).requires_grad_()


def _run_na(n: int, batch: int, heads: int, impl: str, device: str = 'cpu') -> Dict:
    """Fused NA forward + backward; outputs and gradients by name."""
    spatial = (7, ) * n
    q, k, v = (_leaf(batch, heads, *spatial, 4, device=device) for _ in range(3))
    rpb = _leaf(heads, *(2 * K - 1, ) * n, device=device)
    out = NA_FUSED[n](q, k, v, rpb, kernel_size=K, impl=impl)
    out.sum().backward()
    return dict(out=out, dq=q.grad, dk=k.grad, dv=v.grad, drpb=rpb.grad)


def _run_unfused(batch: int, heads: int, impl: str, device: str = 'cpu') -> Dict:
    """na2d_qk then na2d_av, forward + backward."""
    q, k, v = (_leaf(batch, heads, 7, 8, 4, device=device) for _ in range(3))
    rpb = _leaf(heads, 2 * K - 1, 2 * K - 1, device=device)
    attn = na2d_qk(q, k, rpb, kernel_size=K, impl=impl)
    out = na2d_av(attn.softmax(-1), v, kernel_size=K, impl=impl)
    out.sum().backward()
    return dict(attn=attn, out=out, dq=q.grad, dk=k.grad, dv=v.grad, drpb=rpb.grad)


def _run_fsla(batch: int, heads: int, impl: str, device: str = 'cpu') -> Dict:
    """Clustering + clustered attention, forward + backward (30 tokens, m = 8: 4 leaves)."""
    q, k, v = (_leaf(batch, heads, 30, 4, device=device) for _ in range(3))
    perm, inv_perm = balanced_hierarchical_clustering(q, 8, impl=impl)
    out = clustered_attention(q, k, v, perm, 8, 3, impl=impl)
    out.sum().backward()
    return dict(perm=perm, inv_perm=inv_perm, out=out, dq=q.grad, dk=k.grad, dv=v.grad)


EMPTY = [(0, 2), (2, 0)]  # (batch, heads)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('batch, heads', EMPTY)
@pytest.mark.parametrize('n', [1, 2, 3])
def test_na_fused_empty(n, batch, heads, impl):
    res = _run_na(n, batch, heads, impl)
    shape = (batch, heads) + (7, ) * n + (4, )
    for name in ('out', 'dq', 'dk', 'dv'):
        assert tuple(res[name].shape) == shape, name
    assert res['out'].dtype == torch.float32
    # No query reads the bias: its gradient is zero, of the bias's shape (not None).
    assert tuple(res['drpb'].shape) == (heads, ) + (2 * K - 1, ) * n
    assert torch.equal(res['drpb'], torch.zeros_like(res['drpb']))


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('batch, heads', EMPTY)
def test_na_unfused_empty(batch, heads, impl):
    res = _run_unfused(batch, heads, impl)
    assert tuple(res['attn'].shape) == (batch, heads, 7, 8, K * K)
    for name in ('out', 'dq', 'dk', 'dv'):
        assert tuple(res[name].shape) == (batch, heads, 7, 8, 4), name
    assert tuple(res['drpb'].shape) == (heads, 2 * K - 1, 2 * K - 1)
    assert torch.equal(res['drpb'], torch.zeros_like(res['drpb']))


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('batch, heads', EMPTY)
def test_fsla_empty(batch, heads, impl):
    res = _run_fsla(batch, heads, impl)
    for name in ('perm', 'inv_perm'):
        assert tuple(res[name].shape) == (batch, heads, 30) and res[name].dtype == torch.int64
    for name in ('out', 'dq', 'dk', 'dv'):
        assert tuple(res[name].shape) == (batch, heads, 30, 4), name


@pytest.mark.parametrize('n', [1, 2, 3])
def test_reference_empty_keeps_the_rows_of_a_full_batch(n):
    """A batch of 0 is the empty slice of any batch; heads 0 the empty slice of any heads: the
    reference functions (called directly, as the test oracle) agree with the non-empty run."""
    from mmboat.ops.neighborhood_attention_reference import nand_reference
    q, k, v = torch.randn(3, 2, 2, *(7, ) * n, 4).unbind(0)
    rpb = torch.randn(2, *(2 * K - 1, ) * n)
    full, lse = nand_reference(q, k, v, rpb, K, return_lse=True)
    for index in ((slice(0, 0), ), (slice(None), slice(0, 0))):
        empty, empty_lse = nand_reference(q[index], k[index], v[index], rpb[index[1:]], K,
                                          return_lse=True)
        assert torch.equal(empty, full[index]) and torch.equal(empty_lse, lse[index])


@needs_ops
@pytest.mark.parametrize('batch, heads', EMPTY)
def test_empty_reference_matches_compiled(batch, heads):
    """Same outputs, gradients and dtypes on both paths (values too: the zero rpb gradient)."""
    runs = [(_run_na(2, batch, heads, impl), _run_unfused(batch, heads, impl),
             _run_fsla(batch, heads, impl)) for impl in ('reference', 'ext')]
    for ref, ext in zip(*runs):
        assert ref.keys() == ext.keys()
        for name in ref:
            assert ref[name].shape == ext[name].shape, name
            assert ref[name].dtype == ext[name].dtype, name
            assert torch.equal(ref[name], ext[name]), name


@pytest.mark.parametrize('impl', IMPLS)
def test_zero_tokens_stop_with_the_same_error(impl):
    """Zero tokens are not a legal shape for either path: a clear error, not an empty result."""
    with pytest.raises(ValueError, match='smaller than kernel_size'):
        na2d(*torch.randn(3, 1, 2, 0, 7, 4).unbind(0), kernel_size=K, impl=impl)
    with pytest.raises(ValueError, match='smaller than kernel_size'):
        na2d_qk(*torch.randn(2, 1, 2, 7, 0, 4).unbind(0), kernel_size=K, impl=impl)
    with pytest.raises(ValueError, match='at least one token'):
        balanced_hierarchical_clustering(torch.randn(1, 2, 0, 4), 8, impl=impl)
    perm = torch.empty(1, 2, 0, dtype=torch.int64)
    with pytest.raises(ValueError, match='at least one token'):
        clustered_attention(*torch.randn(3, 1, 2, 0, 4).unbind(0), perm, 8, 3, impl=impl)


def _check_meta(res: Dict, expected: Dict[str, Tuple[int, ...]]) -> None:
    assert res.keys() == expected.keys()
    for name, shape in expected.items():
        assert res[name].device.type == 'meta', name
        assert tuple(res[name].shape) == shape, (name, tuple(res[name].shape), shape)


def _meta_expectations(batch: int, heads: int) -> List[Tuple[Callable, Dict]]:
    """(run(impl), expected shapes by name) for every op family on meta tensors."""

    def same(shape, *names) -> Dict[str, Tuple[int, ...]]:
        return {name: shape for name in names}

    na2, na3 = (batch, heads, 7, 7, 4), (batch, heads, 7, 7, 7, 4)
    unfused, tokens = (batch, heads, 7, 8, 4), (batch, heads, 30, 4)
    return [
        (lambda impl: _run_na(2, batch, heads, impl, 'meta'),
         dict(same(na2, 'out', 'dq', 'dk', 'dv'), drpb=(heads, 5, 5))),
        (lambda impl: _run_na(3, batch, heads, impl, 'meta'),
         dict(same(na3, 'out', 'dq', 'dk', 'dv'), drpb=(heads, 5, 5, 5))),
        (lambda impl: _run_unfused(batch, heads, impl, 'meta'),
         dict(same(unfused, 'out', 'dq', 'dk', 'dv'), attn=(batch, heads, 7, 8, K * K),
              drpb=(heads, 5, 5))),
        (lambda impl: _run_fsla(batch, heads, impl, 'meta'),
         dict(same(tokens, 'out', 'dq', 'dk', 'dv'),
              **same(tokens[:3], 'perm', 'inv_perm'))),
    ]


@needs_ops
@pytest.mark.parametrize('impl', [None, 'auto', 'ext'])
@pytest.mark.parametrize('batch, heads', [(2, 3), (0, 3), (2, 0)])
def test_meta_runs_the_fake_kernels(no_reference, batch, heads, impl):
    for name in ('na1d_forward', 'na2d_forward', 'na3d_forward', 'na2d_qk', 'na2d_av'):
        assert neighborhood_attention_op_available(name, 'meta')
    for run, expected in _meta_expectations(batch, heads):
        _check_meta(run(impl), expected)


@pytest.mark.parametrize('batch, heads', [(2, 3), (0, 3), (2, 0)])
def test_meta_without_ext_runs_the_references(without_ext, batch, heads):
    """No extension (or impl='reference'): the references propagate meta shapes, reading no
    data (meta tensors have none: a ``.item()`` or a data-dependent shape would raise)."""
    for run, expected in _meta_expectations(batch, heads):
        _check_meta(run(None), expected)
        _check_meta(run('reference'), expected)


@needs_ops
def test_fake_tensors_run_the_fake_kernels(no_reference):
    """FakeTensorMode (what torch.compile traces with) also takes the fake kernels."""
    with FakeTensorMode():
        for batch in (0, 2):
            q = _leaf(batch, 2, 7, 9, 4)
            rpb = _leaf(2, 5, 5)
            out = na2d(q, q, q, rpb, kernel_size=K)
            out.sum().backward()
            assert out.shape == q.shape and rpb.grad.shape == rpb.shape
            assert na2d_qk(q, q, rpb, kernel_size=K).shape == (batch, 2, 7, 9, K * K)
            x = _leaf(batch, 2, 30, 4)
            out = feature_space_local_attention(x, x, x, 8, 3)
            out.sum().backward()
            assert out.shape == x.shape and x.grad.shape == x.shape


def _use_fake_kernels(request) -> None:
    """With the extension, the meta-device runs below must not touch a reference."""
    if HAS_ALL_OPS:
        request.getfixturevalue('no_reference')


@pytest.mark.parametrize('training', [False, True])
def test_layers_on_meta(request, training):
    _use_fake_kernels(request)
    with torch.device('meta'):
        na = NeighborhoodAttention2d(16, 2, kernel_size=K, dilation=2, attn_drop=0.1)
        fsla = FeatureSpaceLocalAttention(16, 2, cluster_size=8, overlap=3)
    for layer, x, args in ((na, torch.empty(2, 5, 9, 16, device='meta'), ()),
                           (fsla, torch.empty(2, 30, 16, device='meta'), ((5, 6), ))):
        layer.train(training)
        out = layer(x, *args)
        assert out.device.type == 'meta' and out.shape == x.shape
        out.sum().backward()
        for name, param in layer.named_parameters():
            assert param.grad is not None and param.grad.shape == param.shape, name


# Small archs with every op in every stage (FSLA leaves of 8 tokens: several levels).
SMALL = {
    NAT: dict(arch=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                        mlp_ratio=2.)),
    DiNAT: dict(arch=dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                          mlp_ratio=2.), dilations=[[1, 2], [1, 2], [1, 1], [1, 1]]),
    BOATSwinTransformer: dict(arch=dict(embed_dims=16, depths=(2, 2, 2, 2),
                                        num_heads=(1, 2, 2, 4)), window_size=3,
                              fsla_blocks=[[1], [1], [1], [1]],
                              fsla_cfg=dict(cluster_size=8, overlap=3)),
    BOATCSWinTransformer: dict(arch=dict(embed_dims=16, depths=(1, 1, 1, 1),
                                         num_heads=(2, 2, 4, 4), stripe_widths=(1, 2, 3, 3)),
                               fsla_cfg=dict(cluster_size=8, overlap=3)),
}
BACKBONES = [NAT, DiNAT, BOATSwinTransformer, BOATCSWinTransformer]


def _shapes(outs) -> List[Tuple[int, ...]]:
    return [tuple(o.shape) for o in outs]


@pytest.mark.parametrize('cls', BACKBONES, ids=lambda c: c.__name__)
def test_small_backbones_on_meta_match_cpu(request, cls):
    """Meta shapes equal a real CPU run's, at an odd size (padding paths), also for batch 0."""
    kwargs = dict(SMALL[cls], out_indices=(0, 1, 2, 3), drop_path_rate=0.)
    batches = (0, 2)  # the backward below runs on the last (non-empty) batch
    torch.manual_seed(0)
    cpu_model = cls(**kwargs).eval()
    with torch.no_grad():
        cpu_shapes = [_shapes(cpu_model(torch.randn(b, 3, 75, 101))) for b in batches]
    _use_fake_kernels(request)
    with torch.device('meta'):
        model = cls(**kwargs)
    for training in (False, True):
        model.train(training)
        for b, expected in zip(batches, cpu_shapes):
            outs = model(torch.empty(b, 3, 75, 101, device='meta'))
            assert all(o.device.type == 'meta' for o in outs)
            assert _shapes(outs) == expected
    sum(o.sum() for o in outs).backward()  # the last run (training)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize('cls, arch, dims', [(NAT, 'mini', 64), (DiNAT, 'mini', 64),
                                             (BOATSwinTransformer, 'tiny', 96),
                                             (BOATCSWinTransformer, 'tiny', 64)],
                         ids=lambda v: getattr(v, '__name__', str(v)))
def test_released_backbones_on_meta(request, cls, arch, dims):
    """The released archs at 224 x 224 propagate the ImageNet shapes (strides 4..32) on meta."""
    _use_fake_kernels(request)
    with torch.device('meta'):
        model = cls(arch=arch, out_indices=(0, 1, 2, 3)).eval()
    outs = model(torch.empty(2, 3, 224, 224, device='meta'))
    assert _shapes(outs) == [(2, dims * 2**i, 56 // 2**i, 56 // 2**i) for i in range(4)]
