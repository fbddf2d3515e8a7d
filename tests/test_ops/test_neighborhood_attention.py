"""Neighborhood attention: window rule, compiled CPU ops vs the pure-PyTorch reference,
gradients, the torch.library registration and argument errors."""
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmboat.ops import (na1d, na2d, na2d_av, na2d_av_reference, na2d_qk, na2d_qk_reference,
                        na2d_reference, na3d, neighborhood_attention_op_available)
from mmboat.ops.neighborhood_attention_reference import axis_neighborhood, nand_reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUSED = {1: na1d, 2: na2d, 3: na3d}


def _has(name):
    return neighborhood_attention_op_available(name, 'cpu')


needs_fused = pytest.mark.skipif(not _has('na2d_forward'),
                                 reason='mmboat._ext lacks the NA CPU ops')
needs_unfused = pytest.mark.skipif(not _has('na2d_qk'), reason='mmboat._ext lacks na2d_qk')
needs_window = pytest.mark.skipif(
    not (neighborhood_attention_op_available('na2d_forward')
         and hasattr(torch.ops.mmboat, 'na_axis_window')),
    reason='mmboat._ext lacks mmboat::na_axis_window')


def _inputs(shape, dtype, rpb_ks=None, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
               for _ in range(3))
    rpb = None
    if rpb_ks is not None:
        rpb = torch.randn((shape[1], ) + tuple(2 * k_ - 1 for k_ in rpb_ks), generator=gen,
                          dtype=torch.float64).to(dtype)
    tensors = [q, k, v] + ([rpb] if rpb is not None else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return q, k, v, rpb


# ------------------------------------------------------------------------------------------
# The window rule (docs/neighborhood_attention.md#window-rule, #relative-positional-bias).
# ------------------------------------------------------------------------------------------
def test_spec_examples_reference():
    keys, bias, valid = axis_neighborhood(7, 3)
    assert keys.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6],
                             [4, 5, 6]]
    assert bias[0].tolist() == [2, 3, 4]
    assert all(bias[i].tolist() == [1, 2, 3] for i in range(1, 6))
    assert bias[6].tolist() == [0, 1, 2]
    assert bool(valid.all())
    keys, _, _ = axis_neighborhood(10, 3, 3)
    assert keys[0].tolist() == [0, 3, 6]
    assert keys[3].tolist() == [0, 3, 6]
    assert keys[6].tolist() == [3, 6, 9]
    assert keys[9].tolist() == [3, 6, 9]
    assert keys[7].tolist() == [1, 4, 7]
    keys, _, valid = axis_neighborhood(7, 3, 1, True)
    assert keys[0, :1].tolist() == [0] and valid[0].tolist() == [True, False, False]
    assert keys[1, :2].tolist() == [0, 1] and valid[1].tolist() == [True, True, False]
    assert keys[5].tolist() == [3, 4, 5] and bool(valid[5].all())


@needs_window
def test_spec_examples_compiled_rule():
    win = torch.ops.mmboat.na_axis_window(7, 3, 1, False)
    assert win[:, 0].tolist() == [0, 0, 1, 2, 3, 4, 4]  # first key
    assert win[:, 2].tolist() == [2, 1, 1, 1, 1, 1, 0]  # rpb index of slot 0
    win = torch.ops.mmboat.na_axis_window(10, 3, 3, False)
    assert [win[i, 0].item() for i in (0, 3, 6, 9, 7)] == [0, 0, 3, 3, 1]


@needs_window
@pytest.mark.parametrize('causal', [False, True])
def test_compiled_rule_matches_reference(causal):
    """C++ window rule (start, count, rpb index, inverse range) == reference, brute force."""
    for length in range(1, 23):
        for k in range(1, length + 1):
            for d in range(1, length // k + 1):
                win = torch.ops.mmboat.na_axis_window(length, k, d, causal)
                keys, bias, valid = axis_neighborhood(length, k, d, causal)
                count = valid.sum(1)
                assert torch.equal(win[:, 0], keys[:, 0])
                assert torch.equal(win[:, 1], count)
                assert torch.equal(win[:, 2], bias[:, 0])
                for j in range(length):
                    attending = [i for i in range(length)
                                 if j in keys[i, :int(count[i])].tolist()]
                    assert attending, (length, k, d, j)
                    assert attending == list(range(attending[0], attending[-1] + 1, d))
                    assert win[j, 3].item() == attending[0], (length, k, d, causal, j)
                    assert win[j, 4].item() == attending[-1], (length, k, d, causal, j)


# ------------------------------------------------------------------------------------------
# Compiled fused op vs reference.
# ------------------------------------------------------------------------------------------
def _random_case(rng):
    nd = rng.choice([1, 2, 2, 2, 3])
    ks, ds, cs, spatial = [], [], [], []
    causal_ok = rng.random() < 0.3
    for _ in range(nd):
        k = rng.choice([1, 2, 3, 3, 4, 5, 7]) if nd < 3 else rng.choice([1, 2, 3])
        d = rng.choice([1, 1, 2, 3])
        border = rng.random() < 0.4
        length = k * d + (0 if border else rng.randint(0, 6))
        ks.append(k)
        ds.append(d)
        spatial.append(length)
        cs.append(causal_ok and rng.random() < 0.6)
    with_rpb = not any(cs) and all(k % 2 == 1 for k in ks) and rng.random() < 0.6
    dim = rng.choice([4, 8, 16, 32]) if nd < 3 else rng.choice([8, 5])
    shape = (rng.randint(1, 2), rng.randint(1, 3), *spatial, dim)
    return nd, shape, tuple(ks), tuple(ds), tuple(cs), with_rpb


def _compare(nd, shape, ks, ds, cs, with_rpb, dtype, atol, rtol, seed=0):
    q, k, v, rpb = _inputs(shape, dtype, ks if with_rpb else None, seed, requires_grad=True)
    params = [q, k, v] + ([rpb] if with_rpb else [])
    scale = 0.3 + 0.1 * seed % 3
    out = FUSED[nd](q, k, v, rpb, ks, ds, cs, scale=scale, impl='ext')
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, grad)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    qr, kr, vr = ref_params[:3]
    rr = ref_params[3] if with_rpb else None
    ref = nand_reference(qr, kr, vr, rr, ks, ds, cs, scale)
    ref_grads = torch.autograd.grad(ref, ref_params, grad.double())
    ctx = f'{shape} k={ks} d={ds} causal={cs} rpb={with_rpb}'
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol, msg=ctx)
    for name, a, b in zip('qkvr', grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol,
                                   msg=lambda m: f'grad {name} {ctx}: {m}')


@needs_fused
@pytest.mark.parametrize('dtype,atol,rtol', [(torch.float64, 1e-11, 1e-9),
                                             (torch.float32, 1e-4, 1e-4)])
def test_fused_random_sweep(dtype, atol, rtol):
    rng = random.Random(1234)
    for i in range(40):
        _compare(*_random_case(rng), dtype, atol, rtol, seed=i)


@needs_fused
@pytest.mark.parametrize('case', [
    (2, (1, 2, 7, 7, 8), (7, 7), (1, 1), (False, False), True),  # k == L
    (2, (1, 2, 9, 12, 8), (3, 3), (3, 4), (False, False), True),  # k * d == L
    (2, (2, 2, 10, 9, 8), (3, 3), (3, 2), (False, False), True),  # spec example axis
    (2, (1, 1, 14, 14, 32), (7, 7), (2, 2), (False, False), True),  # DiNAT-like, D % 8 == 0
    (2, (1, 2, 8, 9, 16), (4, 2), (2, 1), (True, True), False),  # even + causal
    (1, (2, 3, 25, 8), (7, ), (3, ), (False, ), True),
    (3, (1, 2, 4, 6, 5, 8), (3, 3, 3), (1, 2, 1), (True, False, False), False),
    # rows wider than the backward's 64-column strips, with last-axis dilation groups
    (2, (1, 1, 4, 150, 8), (3, 7), (1, 3), (False, False), True),
    (2, (1, 2, 3, 131, 16), (3, 5), (1, 2), (False, True), False),
    (1, (1, 2, 140, 32), (9, ), (4, ), (False, ), True),
])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_fused_border_cases(case, dtype):
    tol = (1e-11, 1e-9) if dtype == torch.float64 else (1e-4, 1e-4)
    _compare(*case, dtype, *tol)


@needs_fused
def test_fused_bfloat16_close_to_float32():
    q, k, v, rpb = _inputs((1, 2, 9, 10, 16), torch.float32, (3, 3))
    ref = na2d(q, k, v, rpb, 3, 2, impl='ext')
    out = na2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), rpb.bfloat16(), 3, 2, impl='ext')
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@needs_fused
def test_logsumexp_and_dtype():
    q, k, v, rpb = _inputs((1, 2, 6, 7, 8), torch.float32, (3, 3))
    out, lse = torch.ops.mmboat.na2d_forward(q, k, v, rpb, [3, 3], [1, 2], [False, False], 0.5)
    logits = na2d_qk_reference(q * 0.5, k, rpb, 3, (1, 2))
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 6, 7)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)
    _, lse64 = torch.ops.mmboat.na2d_forward(q.double(), k.double(), v.double(), rpb.double(),
                                             [3, 3], [1, 2], [False, False], 0.5)
    assert lse64.dtype == torch.float64


@needs_fused
def test_backward_deterministic():
    q, k, v, rpb = _inputs((2, 2, 12, 11, 8), torch.float32, (5, 3), requires_grad=True)
    results = []
    for _ in range(2):
        out = na2d(q, k, v, rpb, (5, 3), (2, 1), impl='ext')
        results.append(torch.autograd.grad(out.square().sum(), [q, k, v, rpb]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_fused
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_backward_ignores_stale_memory(dtype):
    # dK / dV start as uninitialised buffers that the kernel sets on first write: freed NaN
    # blocks of the same size (which the allocator hands out again) must not leak in.
    cases = [((1, 2, 9, 10, 8), (3, 3), (2, 1), (False, False)),
             ((2, 1, 4, 70, 16), (3, 5), (1, 3), (False, False)),
             ((1, 2, 8, 9, 8), (4, 3), (1, 2), (True, True))]
    for shape, ks, ds, cs in cases:
        rpb_ks = None if any(cs) else ks
        q, k, v, rpb = _inputs(shape, dtype, rpb_ks)
        out, lse = torch.ops.mmboat.na2d_forward(q, k, v, rpb, ks, ds, cs, 0.5)
        grad = torch.randn_like(out)
        poison = [torch.full_like(k, float('nan')) for _ in range(6)]
        del poison
        dq, dk, dv, _ = torch.ops.mmboat.na2d_backward(grad, q, k, v, rpb, out, lse, ks, ds, cs,
                                                       0.5)
        ref_in = [t.double().requires_grad_() for t in (q, k, v)]
        ref = nand_reference(*ref_in, None if rpb is None else rpb.double(), ks, ds, cs, 0.5)
        ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
        for got, want in zip((dq, dk, dv), ref_grads):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@needs_fused
def test_gradcheck_fused():
    q, k, v, rpb = _inputs((1, 2, 7, 6, 4), torch.float64, (3, 3), requires_grad=True)
    fn = lambda *a: na2d(*a, kernel_size=3, dilation=(2, 1), impl='ext')  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb), fast_mode=True)
    q, k, v, _ = _inputs((1, 1, 6, 5, 4), torch.float64, requires_grad=True)
    fn = lambda *a: na2d(*a, kernel_size=(3, 2), is_causal=(True, False), impl='ext')  # noqa
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    q, k, v, rpb = _inputs((2, 1, 9, 3), torch.float64, (3, ), requires_grad=True)
    fn = lambda *a: na1d(*a, kernel_size=3, dilation=3, impl='ext')  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb), fast_mode=True)


@needs_fused
def test_eager_autograd_matches_registered_autograd():
    # na2d runs a C++ autograd Function (mmboat._ext.na_fused) in eager mode; torch.compile and
    # direct op callers go through the torch.library registration. Both must give the same
    # values and grads.
    q, k, v, rpb = _inputs((1, 2, 9, 8, 8), torch.float32, (3, 3), requires_grad=True)
    out = na2d(q, k, v, rpb, 3, (2, 1), impl='ext')
    out_op, _ = torch.ops.mmboat.na2d_forward(q, k, v, rpb, [3, 3], [2, 1], [False, False],
                                              8**-0.5)
    assert type(out.grad_fn) is not type(out_op.grad_fn)  # two different autograd paths
    assert torch.equal(out, out_op)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [q, k, v, rpb], g),
                    torch.autograd.grad(out_op, [q, k, v, rpb], g)):
        assert torch.equal(a, b)
    with torch.no_grad():
        out_ng = na2d(q, k, v, rpb, 3, (2, 1), impl='ext')
    assert out_ng.grad_fn is None and torch.equal(out_ng, out)
    # only the query needs grad
    kd, vd = k.detach(), v.detach()
    out_q = na2d(q, kd, vd, None, 3, (2, 1), impl='ext')
    (gq, ) = torch.autograd.grad(out_q, [q], g)
    q64 = q.detach().double().requires_grad_()
    ref = nand_reference(q64, kd.double(), vd.double(), None, (3, 3), (2, 1), (False, False),
                         8**-0.5)
    (gq_ref, ) = torch.autograd.grad(ref, [q64], g.double())
    torch.testing.assert_close(gq.double(), gq_ref, atol=1e-5, rtol=1e-4)
    # only rpb needs grad; a non-contiguous output gradient
    rd = rpb.detach().requires_grad_()
    out_r = na2d(q.detach(), kd, vd, rd, 3, (2, 1), impl='ext')
    g_nc = torch.randn(out_r.shape[:-1] + (2 * out_r.shape[-1], ))[..., ::2]
    out_r_op, _ = torch.ops.mmboat.na2d_forward(q.detach(), kd, vd, rd, [3, 3], [2, 1],
                                                [False, False], 8**-0.5)
    (gr, ) = torch.autograd.grad(out_r, [rd], g_nc)
    (gr_op, ) = torch.autograd.grad(out_r_op, [rd], g_nc)
    assert torch.equal(gr, gr_op)
    # a second derivative fails loudly on both paths (the backward op has no derivative)
    outs = (na2d(q, k, v, rpb, 3, (2, 1), impl='ext'),
            torch.ops.mmboat.na2d_forward(q, k, v, rpb, [3, 3], [2, 1], [False, False],
                                          8**-0.5)[0])
    for o in outs:
        (g1, ) = torch.autograd.grad(o, [q], g, create_graph=True)
        with pytest.raises(RuntimeError, match='not implemented'):
            torch.autograd.grad(g1.sum(), [q])


# ------------------------------------------------------------------------------------------
# Unfused ops.
# ------------------------------------------------------------------------------------------
@needs_unfused
@pytest.mark.parametrize('ks,ds,cs,with_rpb', [((3, 3), (1, 1), (False, False), True),
                                               ((5, 3), (2, 3), (False, False), True),
                                               ((3, 4), (1, 2), (True, False), False),
                                               ((2, 2), (3, 1), (False, True), False)])
def test_unfused_matches_reference(ks, ds, cs, with_rpb):
    q, k, v, rpb = _inputs((2, 2, 11, 9, 8), torch.float64, ks if with_rpb else None,
                           requires_grad=True)
    attn = na2d_qk(q, k, rpb, ks, ds, cs, impl='ext')
    ref_attn = na2d_qk_reference(q, k, rpb, ks, ds, cs)
    torch.testing.assert_close(attn, ref_attn, atol=1e-12, rtol=1e-10)
    weights = attn.softmax(-1)
    out = na2d_av(weights, v, ks, ds, cs, impl='ext')
    ref_out = na2d_av_reference(ref_attn.softmax(-1), v, ks, ds, cs)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    params = [q, k, v] + ([rpb] if with_rpb else [])
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, params, g),
                               torch.autograd.grad(ref_out, params, g), atol=1e-11,
                               rtol=1e-9)
    if any(cs):
        assert bool(torch.isinf(attn).any())


@needs_unfused
def test_gradcheck_unfused():
    q, k, v, rpb = _inputs((1, 2, 6, 5, 3), torch.float64, (3, 3), requires_grad=True)
    fn = lambda q_, k_, r_: na2d_qk(q_, k_, r_, 3, (2, 1), impl='ext')  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, rpb), fast_mode=True)
    attn = torch.rand(1, 2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda a_, v_: na2d_av(a_, v_, 2, 1, (False, True), impl='ext')  # noqa: E731
    assert torch.autograd.gradcheck(fn, (attn, v), fast_mode=True)


# ------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile.
# ------------------------------------------------------------------------------------------
@needs_fused
def test_opcheck_fused():
    q, k, v, rpb = _inputs((1, 2, 6, 7, 8), torch.float32, (3, 3), requires_grad=True)
    torch.library.opcheck(torch.ops.mmboat.na2d_forward,
                          (q, k, v, rpb, [3, 3], [2, 1], [False, False], 0.35))
    torch.library.opcheck(torch.ops.mmboat.na2d_forward,
                          (q, k, v, None, [3, 2], [1, 1], [True, False], 0.35))
    q1, k1, v1, r1 = _inputs((2, 1, 9, 8), torch.float32, (3, ), requires_grad=True)
    torch.library.opcheck(torch.ops.mmboat.na1d_forward,
                          (q1, k1, v1, r1, [3], [2], [False], 0.35))
    # float64: the log-sum-exp is float64 too, in the fake kernel as in the real one
    q2, k2, v2, r2 = _inputs((1, 2, 5, 6, 8), torch.float64, (3, 3), requires_grad=True)
    torch.library.opcheck(torch.ops.mmboat.na2d_forward,
                          (q2, k2, v2, r2, [3, 3], [1, 2], [False, False], 0.35))


@needs_unfused
def test_opcheck_unfused():
    q, k, _, rpb = _inputs((1, 2, 6, 7, 8), torch.float32, (3, 3), requires_grad=True)
    torch.library.opcheck(torch.ops.mmboat.na2d_qk, (q, k, rpb, [3, 3], [2, 1], [False, False]))
    attn = torch.rand(1, 2, 6, 7, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.mmboat.na2d_av, (attn, k, [3, 3], [2, 1], [False, False]))


@needs_fused
@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    proj = torch.nn.Linear(8, 8).double()
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)

    def fn(x):
        y = proj(x)
        return na2d(y, y, y, rpb, kernel_size=3, dilation=2).sum(-1)

    x = torch.randn(1, 2, 7, 8, 8, dtype=torch.float64)
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, fn(x))
    (g1, ) = torch.autograd.grad(out.sum(), [rpb])
    (g2, ) = torch.autograd.grad(fn(x).sum(), [rpb])
    torch.testing.assert_close(g1, g2)


# ------------------------------------------------------------------------------------------
# Spec section 6 identities.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('impl', ['reference', pytest.param('ext', marks=needs_fused)])
def test_full_window_equals_sdpa(impl):
    q, k, v, _ = _inputs((2, 3, 5, 6, 8), torch.float64)
    out = na2d(q, k, v, kernel_size=(5, 6), impl=impl)
    ref = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3))
    torch.testing.assert_close(out, ref.view_as(q), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize('impl', ['reference', pytest.param('ext', marks=needs_fused)])
def test_dilation_equals_interleaved_submaps(impl):
    d = 3
    q, k, v, rpb = _inputs((1, 2, 4 * d, 5 * d, 8), torch.float64, (3, 3))
    out = na2d(q, k, v, rpb, kernel_size=3, dilation=d, impl=impl)
    for gh in range(d):
        for gw in range(d):
            sub = [t[:, :, gh::d, gw::d] for t in (q, k, v)]
            ref = na2d(*sub, rpb, kernel_size=3, dilation=1, impl=impl)
            torch.testing.assert_close(out[:, :, gh::d, gw::d], ref, atol=1e-12, rtol=1e-10)


def test_reference_impl_matches_reference_function():
    q, k, v, rpb = _inputs((1, 2, 8, 8, 4), torch.float32, (3, 3))
    torch.testing.assert_close(na2d(q, k, v, rpb, 3, 2, impl='reference'),
                               na2d_reference(q, k, v, rpb, 3, 2))


# ------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(kernel_size=5, dilation=2), ValueError, r'spatial axis 0 has size 8, smaller than'),
    (dict(kernel_size=4, rpb=True), ValueError, 'even kernel_size'),
    (dict(kernel_size=3, is_causal=True, rpb=True), ValueError, 'cannot be combined with rpb'),
    (dict(kernel_size=(3, 3, 3)), ValueError, 'kernel_size must be an int or 2 values'),
    (dict(kernel_size=0), ValueError, 'kernel_size must be >= 1'),
    (dict(dilation=0, kernel_size=3), ValueError, 'dilation must be >= 1'),
    (dict(kernel_size=3.0), TypeError, 'kernel_size must hold int values'),
])
def test_python_config_errors(kwargs, exc, match):
    q, k, v, _ = _inputs((1, 2, 8, 9, 4), torch.float32)
    rpb = None
    if kwargs.pop('rpb', False):
        ks = kwargs['kernel_size']
        rpb = torch.zeros(2, 2 * ks - 1, 2 * ks - 1)
    with pytest.raises(exc, match=match):
        na2d(q, k, v, rpb, impl='reference', **kwargs)


def test_python_tensor_errors():
    q, k, v, _ = _inputs((1, 2, 8, 9, 4), torch.float32)
    with pytest.raises(ValueError, match=r'query must be \[B, heads, 2 spatial dims'):
        na2d(q[0], k[0], v[0], kernel_size=3, impl='reference')
    with pytest.raises(ValueError, match='query and key shapes differ'):
        na2d(q, k[:, :1], v, kernel_size=3, impl='reference')
    with pytest.raises(TypeError, match='query and value dtypes differ'):
        na2d(q, k, v.double(), kernel_size=3, impl='reference')
    with pytest.raises(TypeError, match='must be a floating tensor'):
        na2d(q.long(), k.long(), v.long(), kernel_size=3, impl='reference')
    with pytest.raises(ValueError, match=r'rpb must have shape .* = \(2, 5, 5\)'):
        na2d(q, k, v, torch.zeros(2, 3, 3), kernel_size=3, impl='reference')
    with pytest.raises(ValueError, match=r'attn must have shape'):
        na2d_av(torch.zeros(1, 2, 8, 9, 8), v, kernel_size=3, impl='reference')
    with pytest.raises(ValueError, match='impl must be one of'):
        na2d(q, k, v, kernel_size=3, impl='fast')


@needs_fused
def test_compiled_op_errors():
    q, k, v, rpb = _inputs((1, 2, 8, 9, 4), torch.float32, (3, 3))
    op = torch.ops.mmboat.na2d_forward
    with pytest.raises(RuntimeError, match='smaller than kernel_size \\* dilation'):
        op(q, k, v, None, [5, 5], [2, 1], [False, False], 1.0)
    with pytest.raises(RuntimeError, match='query and key must have the same shape'):
        op(q, k[:, :1], v, None, [3, 3], [1, 1], [False, False], 1.0)
    with pytest.raises(RuntimeError, match='rpb must have shape'):
        op(q, k, v, rpb[:, :3], [3, 3], [1, 1], [False, False], 1.0)
    with pytest.raises(RuntimeError, match='kernel_size needs 2 values'):
        op(q, k, v, None, [3], [1, 1], [False, False], 1.0)
    with pytest.raises(RuntimeError, match='is_causal cannot be combined with rpb'):
        op(q, k, v, rpb, [3, 3], [1, 1], [True, False], 1.0)
    with pytest.raises(RuntimeError, match='must be contiguous'):
        op(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), None, [3, 3], [1, 1],
           [False, False], 1.0)
    out, lse = op(q, k, v, rpb, [3, 3], [1, 1], [False, False], 1.0)
    with pytest.raises(RuntimeError, match='logsumexp must be'):
        torch.ops.mmboat.na2d_backward(out, q, k, v, rpb, out, lse.double(), [3, 3], [1, 1],
                                       [False, False], 1.0)
    # the eager entry (mmboat._ext.na_fused) gives the ops' own errors, and checks nd
    from mmboat.ops.ext_loader import ext_module
    fused = ext_module().na_fused
    with pytest.raises(RuntimeError, match='nd must be 1, 2 or 3, got 4'):
        fused(4, q, k, v, None, [3, 3], [1, 1], [False, False], 1.0)
    with pytest.raises(RuntimeError, match='query and key must have the same shape'):
        fused(2, q, k[:, :1], v, None, [3, 3], [1, 1], [False, False], 1.0)
    with pytest.raises(RuntimeError, match='rpb must have shape'):
        fused(2, q.requires_grad_(), k, v, rpb[:, :3], [3, 3], [1, 1], [False, False], 1.0)


@needs_fused
def test_empty_batch():
    q = torch.randn(0, 2, 7, 7, 8, requires_grad=True)
    out = na2d(q, q, q, kernel_size=3, impl='ext')
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


# ------------------------------------------------------------------------------------------
# Benchmark script.
# ------------------------------------------------------------------------------------------
def test_benchmark_quick():
    script = os.path.join(REPO, 'tools', 'analysis_tools', 'benchmark_ops.py')
    res = subprocess.run([sys.executable, script, '--quick', '--suite', 'na'],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert '| problem |' in res.stdout and 'GEMM' in res.stdout
    lines = [line for line in res.stdout.splitlines() if line.startswith('|')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    col = header.index('ops fwd+bwd ms (no autograd)')
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip('|').split('|')]
        if cells[1] == '-':  # no compiled op here
            continue
        assert float(cells[col]) > 0 and cells[col + 1].endswith('x'), line
