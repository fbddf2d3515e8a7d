"""CUDA neighborhood-attention ops against the pure-PyTorch reference and the CPU kernels.

Needs a CUDA device and the CUDA build of ``mmboat._ext`` (``tools/gpu_check.sh`` builds it and
runs this file); skipped otherwise. Covered: every op (fused forward/backward for 1-D/2-D/3-D,
unfused 2-D qk/av and their backwards) with rpb, dilation, causal windows, per-axis kernels and
borders where ``k * d == L``; the NAT-Tiny stage shapes; the public entry points with autograd;
float64 gradchecks of the CUDA kernels; ``torch.autocast('cuda')``.

Tolerances (``assert_close`` passes when ``|a - b| <= atol + rtol * |b|``):

* ``TOL`` / ``GRAD_TOL``: against the reference evaluated in float32 on the *same rounded
  inputs*, so only the kernels' float32 summation order and the final rounding differ: float32
  ``1e-4``/``1e-4``; float16 atol ``5e-3``, rtol ``1e-2``; bfloat16 ``4e-2``/``4e-2``; gradients
  3x those, the summed rpb gradient 10x the atol. Stricter than NATTEN's.
* ``NATTEN_EPS``: NATTEN's own protocol and numbers (its ``tests/test_na2d.py`` and
  ``test_fna2d.py``): float32 inputs cast to the kernel dtype, compared with the float32 reference
  on the *unrounded* inputs, ``atol=eps, rtol=0``: float32 ``1e-4`` (NATTEN's non-GEMM kernels;
  its ``1e-2`` is for TF32 GEMMs), float16 ``1e-1``, bfloat16 ``1e-1``; dq/dk/dv with
  ``grad_out * 0.05`` and the same eps; drpb (which NATTEN does not check) by relative error,
  below ``1e-4`` / ``1e-2`` / ``5e-2``.
* CUDA vs CPU kernels on the same inputs: float32 ``1e-4`` (outputs, log-sum-exp) and ``1e-3``
  (gradients); float16/bfloat16 as ``TOL``/``GRAD_TOL``.
* float64: ``torch.autograd.gradcheck`` (``eps=1e-6, atol=1e-5, rtol=1e-3``; ``nondet_tol``
  ``1e-7`` with an rpb, whose gradient is accumulated with atomics, else ``1e-10``).
* autocast: against the float32 reference on the unrounded float32 inputs, ``5e-2``/``5e-2`` for
  the outputs, relative gradient error below ``5e-2`` (see ``test_ops_autocast.py``).
"""
import pytest
import torch

from mmboat.ops.neighborhood_attention import neighborhood_attention_op_available
from mmboat.ops.neighborhood_attention_reference import (nand_av_reference, nand_qk_reference,
                                                          nand_reference)


def _cuda_ops_available() -> bool:
    return torch.cuda.is_available() and neighborhood_attention_op_available(
        'na2d_forward', 'cuda')


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

# (spatial, kernel_size, dilation, is_causal, with_rpb, head_dim)
CASES = [
    ((9, 8), (3, 5), (1, 1), (False, False), True, 32),
    ((14, 15), (3, 3), (4, 3), (False, False), True, 64),
    ((7, 9), (3, 4), (2, 2), (True, False), False, 20),
    ((24, 24), (7, 7), (3, 3), (False, False), True, 3),
    ((40, ), (7, ), (3, ), (False, ), True, 64),
    ((33, ), (4, ), (2, ), (True, ), False, 16),
    ((6, 7, 8), (3, 3, 3), (1, 2, 1), (False, False, False), True, 136),
    ((5, 6, 6), (2, 3, 3), (1, 1, 1), (True, True, True), False, 72),
    # Borders with k * d == L on every axis (each dilation group holds exactly k keys).
    ((21, 14), (7, 7), (3, 2), (False, False), True, 32),
    ((24, ), (3, ), (8, ), (False, ), True, 16),
    ((6, 6, 9), (3, 3, 3), (2, 2, 3), (False, False, False), True, 32),
]
CASE_IDS = [f'{len(c[0])}d-L{"x".join(map(str, c[0]))}-k{c[1]}-d{c[2]}-c{c[3]}-rpb{c[4]}-D{c[5]}'
            for c in CASES]


def _inputs(case, dtype, batch=2, heads=3, seed=0):
    spatial, ks, _, _, with_rpb, dim = case
    gen = torch.Generator(device='cuda').manual_seed(seed)
    shape = (batch, heads, *spatial, dim)
    q, k, v, dout = (torch.randn(shape, device='cuda', generator=gen).to(dtype) for _ in range(4))
    rpb = None
    if with_rpb:
        rpb = torch.randn((heads, *[2 * x - 1 for x in ks]), device='cuda',
                          generator=gen).to(dtype)
    return q, k, v, rpb, dout


def _fused_ops(n):
    return getattr(torch.ops.mmboat, f'na{n}d_forward'), getattr(torch.ops.mmboat,
                                                                 f'na{n}d_backward')


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_fused_forward_backward_match_reference(case, dtype):
    spatial, ks, dil, causal, _, dim = case
    q, k, v, rpb, dout = _inputs(case, dtype)
    scale = dim**-0.5
    forward, backward = _fused_ops(len(spatial))
    out, lse = forward(q, k, v, rpb, list(ks), list(dil), list(causal), scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == q.shape[:-1]

    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    rpb32 = rpb.float().requires_grad_() if rpb is not None else None
    ref_out, ref_lse = nand_reference(*leaves, rpb32, ks, dil, causal, scale, return_lse=True)
    torch.testing.assert_close(out.float(), ref_out, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOL[dtype])

    ref_out.backward(dout.float())
    grads = backward(dout, q, k, v, rpb, out, lse, list(ks), list(dil), list(causal), scale)
    for got, leaf in zip(grads[:3], leaves):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), leaf.grad, **GRAD_TOL[dtype])
    if rpb is None:
        assert grads[3] is None
    else:
        assert grads[3].dtype == dtype
        # Summed over batch and many queries: looser absolute tolerance.
        tol = GRAD_TOL[dtype]
        torch.testing.assert_close(grads[3].float(), rpb32.grad, atol=10 * tol['atol'],
                                   rtol=tol['rtol'])


UNFUSED_CASES = [c for c in CASES if len(c[0]) == 2]
UNFUSED_IDS = [i for c, i in zip(CASES, CASE_IDS) if len(c[0]) == 2]


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', UNFUSED_CASES, ids=UNFUSED_IDS)
def test_unfused_qk_av_match_reference(case, dtype):
    spatial, ks, dil, causal, _, dim = case
    q, k, v, rpb, dout = _inputs(case, dtype, seed=1)
    q = (q.float() * dim**-0.5).to(dtype)  # the caller scales q for the unfused ops
    args = (list(ks), list(dil), list(causal))

    attn = torch.ops.mmboat.na2d_qk(q, k, rpb, *args)
    leaves = [t.float().requires_grad_() for t in (q, k)]
    rpb32 = rpb.float().requires_grad_() if rpb is not None else None
    ref_attn = nand_qk_reference(*leaves, rpb32, ks, dil, causal)
    torch.testing.assert_close(attn.float(), ref_attn, **TOL[dtype])

    grad_attn = torch.randn_like(attn).to(dtype)
    ref_attn.backward(grad_attn.float())
    dq, dk, drpb = torch.ops.mmboat.na2d_qk_backward(grad_attn, q, k, rpb is not None, *args)
    torch.testing.assert_close(dq.float(), leaves[0].grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(dk.float(), leaves[1].grad, **GRAD_TOL[dtype])
    if rpb is None:
        assert drpb is None
    else:
        torch.testing.assert_close(drpb.float(), rpb32.grad, atol=10 * GRAD_TOL[dtype]['atol'],
                                   rtol=GRAD_TOL[dtype]['rtol'])

    weights = attn.float().softmax(-1).to(dtype)
    out = torch.ops.mmboat.na2d_av(weights, v, *args)
    w32 = weights.float().requires_grad_()
    v32 = v.float().requires_grad_()
    ref_out = nand_av_reference(w32, v32, ks, dil, causal)
    torch.testing.assert_close(out.float(), ref_out, **TOL[dtype])
    ref_out.backward(dout.float())
    dattn, dv = torch.ops.mmboat.na2d_av_backward(dout, weights, v, *args)
    torch.testing.assert_close(dattn.float(), w32.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(dv.float(), v32.grad, **GRAD_TOL[dtype])


def test_full_window_equals_dense_attention():
    q, k, v, _, _ = _inputs(((6, 5), (6, 5), (1, 1), (False, False), False, 32), torch.float32)
    out, _ = torch.ops.mmboat.na2d_forward(q, k, v, None, [6, 5], [1, 1], [False, False],
                                           32**-0.5)
    flat = [t.flatten(2, 3) for t in (q, k, v)]
    dense = torch.nn.functional.scaled_dot_product_attention(*flat).view_as(out)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)


def test_input_gradients_are_deterministic():
    case = ((14, 15), (3, 3), (4, 3), (False, False), True, 64)
    q, k, v, rpb, dout = _inputs(case, torch.float16)
    args = ([3, 3], [4, 3], [False, False], 0.125)
    out, lse = torch.ops.mmboat.na2d_forward(q, k, v, rpb, *args)
    first = torch.ops.mmboat.na2d_backward(dout, q, k, v, rpb, out, lse, *args)
    second = torch.ops.mmboat.na2d_backward(dout, q, k, v, rpb, out, lse, *args)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


def test_large_dilated_map():
    # DiNAT-like stage: 56 x 56, k = 7, dilation 8, head_dim 32.
    case = ((56, 56), (7, 7), (8, 8), (False, False), True, 32)
    q, k, v, rpb, _ = _inputs(case, torch.float16, batch=1, heads=2)
    out, lse = torch.ops.mmboat.na2d_forward(q, k, v, rpb, [7, 7], [8, 8], [False, False],
                                             32**-0.5)
    ref_out, ref_lse = nand_reference(q.float(), k.float(), v.float(), rpb.float(), 7, 8,
                                      False, 32**-0.5, return_lse=True)
    torch.testing.assert_close(out.float(), ref_out, **TOL[torch.float16])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float16])


def _cuda_gen(seed):
    return torch.Generator(device='cuda').manual_seed(seed)


def test_cuda_rejects_mixed_devices_and_small_maps():
    qf = torch.randn(1, 1, 8, 8, 16, device='cuda')
    with pytest.raises(RuntimeError, match='same device'):
        torch.ops.mmboat.na2d_forward(qf, qf.cpu(), qf, None, [3, 3], [1, 1], [False, False],
                                      0.25)
    with pytest.raises(RuntimeError, match='smaller than kernel_size'):
        torch.ops.mmboat.na2d_forward(qf, qf, qf, None, [3, 3], [3, 3], [False, False], 0.25)


# ---------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels (same inputs, same dtype).
# ---------------------------------------------------------------------------------------------
CPU_TOL = {
    torch.float32: (dict(atol=1e-4, rtol=1e-4), dict(atol=1e-3, rtol=1e-3)),
    torch.float16: (TOL[torch.float16], GRAD_TOL[torch.float16]),
    torch.bfloat16: (TOL[torch.bfloat16], GRAD_TOL[torch.bfloat16]),
}


def _rel_err(got, want):
    """Relative error of ``got`` in the norm of ``want`` (float32 or float64)."""
    return float((got.to(want.dtype) - want).norm() / want.norm().clamp_min(1e-12))


def _cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_cuda_kernels_match_cpu_kernels(case, dtype):
    """The CUDA and the CPU kernels on the same inputs: outputs, log-sum-exp, gradients."""
    spatial, ks, dil, causal, _, dim = case
    tol, grad_tol = CPU_TOL[dtype]
    q, k, v, rpb, dout = _inputs(case, dtype, seed=3)
    args = (list(ks), list(dil), list(causal), dim**-0.5)
    forward, backward = _fused_ops(len(spatial))
    out, lse = forward(q, k, v, rpb, *args)
    cq, ck, cv, crpb, cdout = _cpu(q, k, v, rpb, dout)
    out_cpu, lse_cpu = forward(cq, ck, cv, crpb, *args)
    assert out.dtype == out_cpu.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), out_cpu.float(), **tol)
    torch.testing.assert_close(lse.cpu(), lse_cpu, **tol)
    grads = backward(dout, q, k, v, rpb, out, lse, *args)
    grads_cpu = backward(cdout, cq, ck, cv, crpb, out_cpu, lse_cpu, *args)
    for name, got, ref in zip(('dq', 'dk', 'dv', 'drpb'), grads, grads_cpu):
        if ref is None:
            assert got is None, name
            continue
        extra = dict(atol=10 * grad_tol['atol']) if name == 'drpb' else {}
        torch.testing.assert_close(got.cpu().float(), ref.float(), **{**grad_tol, **extra},
                                   msg=lambda m, name=name: f'{name}: {m}')


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', UNFUSED_CASES, ids=UNFUSED_IDS)
def test_unfused_cuda_kernels_match_cpu_kernels(case, dtype):
    spatial, ks, dil, causal, _, dim = case
    tol, grad_tol = CPU_TOL[dtype]
    q, k, v, rpb, dout = _inputs(case, dtype, seed=4)
    q = (q.float() * dim**-0.5).to(dtype)
    args = (list(ks), list(dil), list(causal))
    attn = torch.ops.mmboat.na2d_qk(q, k, rpb, *args)
    cq, ck, cv, crpb, cdout = _cpu(q, k, v, rpb, dout)
    attn_cpu = torch.ops.mmboat.na2d_qk(cq, ck, crpb, *args)
    torch.testing.assert_close(attn.cpu().float(), attn_cpu.float(), **tol)
    grad_attn = torch.randn(attn.shape, device='cuda', generator=_cuda_gen(5)).to(dtype)
    got = torch.ops.mmboat.na2d_qk_backward(grad_attn, q, k, rpb is not None, *args)
    ref = torch.ops.mmboat.na2d_qk_backward(grad_attn.cpu(), cq, ck, rpb is not None, *args)
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g.cpu().float(), r.float(), atol=10 * grad_tol['atol'],
                                       rtol=grad_tol['rtol'])
    weights = attn.float().softmax(-1).to(dtype)
    out = torch.ops.mmboat.na2d_av(weights, v, *args)
    out_cpu = torch.ops.mmboat.na2d_av(weights.cpu(), cv, *args)
    torch.testing.assert_close(out.cpu().float(), out_cpu.float(), **tol)
    got = torch.ops.mmboat.na2d_av_backward(dout, weights, v, *args)
    ref = torch.ops.mmboat.na2d_av_backward(cdout, weights.cpu(), cv, *args)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.cpu().float(), r.float(), **grad_tol)


# ---------------------------------------------------------------------------------------------
# NATTEN's protocol and tolerances, through the public entry points and autograd.
# ---------------------------------------------------------------------------------------------
NATTEN_EPS = {torch.float32: 1e-4, torch.float16: 1e-1, torch.bfloat16: 1e-1}
# NATTEN's test_fna2d.py problem sizes (B, heads, X, Y, D, kH, kW, dH, dW) whose gather-based
# reference fits in a few GB, batch capped at 2; (15, 20) with k 5x15, d 3x1 and (8, 10) with
# k 3x5, d 1x2 have k * d == L.
NATTEN_PROBLEMS = [
    (1, 1, 3, 3, 16, 3, 3, 1, 1),
    (1, 1, 8, 10, 24, 3, 5, 1, 2),
    (1, 2, 15, 20, 32, 5, 15, 3, 1),
    (1, 2, 17, 19, 40, 9, 7, 1, 2),
    (1, 3, 32, 32, 56, 31, 31, 1, 1),
    (2, 3, 56, 56, 80, 7, 7, 2, 4),
    (1, 3, 28, 46, 88, 11, 13, 1, 1),
]
NATTEN_VARIANTS = ['rpb', 'plain', 'causal-h', 'causal-hw']
NATTEN_DRPB_REL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize('variant', NATTEN_VARIANTS)
@pytest.mark.parametrize('problem', NATTEN_PROBLEMS,
                         ids=['x'.join(map(str, p)) for p in NATTEN_PROBLEMS])
def test_natten_protocol_public_na2d(problem, variant):
    from mmboat.ops import na2d

    B, H, X, Y, D, kh, kw, dh, dw = problem
    causal = {'causal-h': (True, False), 'causal-hw': (True, True)}.get(variant, (False, False))
    gen = _cuda_gen(7)
    q, k, v = (torch.randn(B, H, X, Y, D, device='cuda', generator=gen) for _ in range(3))
    dout = torch.randn(B, H, X, Y, D, device='cuda', generator=gen) * 0.05
    rpb = (torch.randn(H, 2 * kh - 1, 2 * kw - 1, device='cuda', generator=gen)
           if variant == 'rpb' else None)
    config = dict(kernel_size=(kh, kw), dilation=(dh, dw), is_causal=causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((rpb, ) if rpb is not None else ())]
    ref = nand_reference(*leaves[:3], leaves[3] if rpb is not None else None, (kh, kw), (dh, dw),
                         causal, D**-0.5)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    for dtype, eps in NATTEN_EPS.items():
        inputs = [t.to(dtype).requires_grad_() for t in leaves]
        out = na2d(*inputs[:3], inputs[3] if rpb is not None else None, impl='ext', **config)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.detach(), atol=eps, rtol=0,
                                   msg=lambda m, dtype=dtype: f'{dtype} output: {m}')
        grads = torch.autograd.grad(out, inputs, dout.to(dtype))
        for name, got, want in zip(('dq', 'dk', 'dv'), grads, ref_grads):
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, atol=eps, rtol=0,
                                       msg=lambda m, n=name, dt=dtype: f'{dt} {n}: {m}')
        if rpb is not None:
            # NATTEN does not check drpb (a sum over batch and every query): relative error.
            assert grads[3].dtype == dtype
            err = _rel_err(grads[3], ref_grads[3])
            assert err < NATTEN_DRPB_REL[dtype], f'{dtype} drpb relative error {err:.2e}'


# NAT-Tiny stages at 224 (map side, heads; head_dim 32, k 7) with d = 1 and DiNAT's
# min(8, L // k): the shapes of tools/gpu_check/benchmark.py.
NAT_TINY = [(s, h, d) for s, h in ((56, 2), (28, 4), (14, 8), (7, 16))
            for d in sorted({1, min(8, s // 7)})]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('stage', NAT_TINY, ids=[f'{s}x{s}-h{h}-d{d}' for s, h, d in NAT_TINY])
def test_nat_tiny_stage_shapes(stage, dtype):
    side, heads, dil = stage
    case = ((side, side), (7, 7), (dil, dil), (False, False), True, 32)
    q, k, v, rpb, dout = _inputs(case, dtype, batch=2, heads=heads, seed=8)
    args = ([7, 7], [dil, dil], [False, False], 32**-0.5)
    out, lse = torch.ops.mmboat.na2d_forward(q, k, v, rpb, *args)
    leaves = [t.float().requires_grad_() for t in (q, k, v, rpb)]
    ref, ref_lse = nand_reference(*leaves, 7, dil, False, 32**-0.5, return_lse=True)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOL[dtype])
    ref_grads = torch.autograd.grad(ref, leaves, dout.float())
    grads = torch.ops.mmboat.na2d_backward(dout, q, k, v, rpb, out, lse, *args)
    for name, got, want in zip(('dq', 'dk', 'dv', 'drpb'), grads, ref_grads):
        tol = dict(GRAD_TOL[dtype])
        if name == 'drpb':
            tol['atol'] *= 10 * side / 7  # summed over batch * side**2 queries
        torch.testing.assert_close(got.float(), want, **tol,
                                   msg=lambda m, name=name: f'{name}: {m}')


# ---------------------------------------------------------------------------------------------
# float64 gradchecks of the CUDA kernels (small shapes).
# ---------------------------------------------------------------------------------------------
# (spatial, kernel_size, dilation, is_causal, with_rpb, head_dim); every case has an axis with
# k * d == L.
GRADCHECK_CASES = [
    ((9, ), (3, ), (3, ), (False, ), True, 4),
    ((7, ), (3, ), (2, ), (True, ), False, 3),
    ((6, 5), (3, 5), (2, 1), (False, False), True, 4),
    ((5, 6), (2, 3), (1, 2), (True, False), False, 4),
    ((3, 4, 3), (3, 3, 3), (1, 1, 1), (False, False, False), True, 2),
    ((4, 3, 4), (2, 3, 2), (2, 1, 1), (False, True, False), False, 2),
]
GRADCHECK_IDS = [f'{len(c[0])}d-L{"x".join(map(str, c[0]))}-k{c[1]}-d{c[2]}-c{c[3]}-rpb{c[4]}'
                 for c in GRADCHECK_CASES]
GRADCHECK = dict(eps=1e-6, atol=1e-5, rtol=1e-3)


def _float64_inputs(case, seed=0, batch=1, heads=2):
    spatial, ks, _, _, with_rpb, dim = case
    gen = _cuda_gen(seed)
    shape = (batch, heads, *spatial, dim)
    tensors = [torch.randn(shape, device='cuda', dtype=torch.float64, generator=gen)
               for _ in range(3)]
    if with_rpb:
        tensors.append(torch.randn((heads, *[2 * x - 1 for x in ks]), device='cuda',
                                   dtype=torch.float64, generator=gen))
    return [t.requires_grad_() for t in tensors]


def _require_float64_kernel(call, what):
    """Run ``call`` (a float64 CUDA op call); fail with the reason when the op rejects it."""
    try:
        return call()
    except RuntimeError as exc:
        pytest.fail(f'{what} rejects float64 CUDA tensors, so its CUDA kernels cannot be '
                    f'gradchecked in float64: {str(exc).splitlines()[0]}')


def _gradcheck(fn, inputs, nondet_tol=1e-10):
    assert torch.autograd.gradcheck(fn, inputs, nondet_tol=nondet_tol, **GRADCHECK)


@pytest.mark.parametrize('case', GRADCHECK_CASES, ids=GRADCHECK_IDS)
def test_fused_float64_gradcheck(case):
    """Gradcheck of the CUDA kernels through the registered op (``torch.ops.mmboat.naNd_forward``
    and its autograd) and through the public ``naNd(..., impl='ext')`` (the eager C++ autograd
    Function the backbones use)."""
    from mmboat.ops import na1d, na2d, na3d

    spatial, ks, dil, causal, with_rpb, dim = case
    n = len(spatial)
    inputs = _float64_inputs(case)
    forward, _ = _fused_ops(n)
    args = (list(ks), list(dil), list(causal), dim**-0.5)
    nondet = 1e-7 if with_rpb else 1e-10

    def op(q, k, v, *rpb):
        return forward(q, k, v, rpb[0] if rpb else None, *args)[0]

    out = _require_float64_kernel(lambda: op(*inputs), f'torch.ops.mmboat.na{n}d_forward')
    assert out.dtype == torch.float64 and out.is_cuda
    ref = nand_reference(*[t.detach() for t in inputs[:3]],
                         inputs[3].detach() if with_rpb else None, ks, dil, causal, dim**-0.5)
    torch.testing.assert_close(out.detach(), ref, atol=1e-12, rtol=1e-10)
    _gradcheck(op, inputs, nondet)

    public = {1: na1d, 2: na2d, 3: na3d}[n]

    def entry(q, k, v, *rpb):
        return public(q, k, v, rpb[0] if rpb else None, kernel_size=ks, dilation=dil,
                      is_causal=causal, impl='ext')

    _require_float64_kernel(lambda: entry(*inputs),
                            f'mmboat.ops.na{n}d(impl="ext") (the dtype table of '
                            'mmboat/ops/neighborhood_attention.py)')
    _gradcheck(entry, inputs, nondet)


@pytest.mark.parametrize('case', [c for c in GRADCHECK_CASES if len(c[0]) == 2],
                         ids=[i for c, i in zip(GRADCHECK_CASES, GRADCHECK_IDS)
                              if len(c[0]) == 2])
def test_unfused_float64_gradcheck(case):
    from mmboat.ops import na2d_av, na2d_qk

    spatial, ks, dil, causal, with_rpb, dim = case
    q, k, v, *rpb = _float64_inputs(case, seed=1)
    args = (list(ks), list(dil), list(causal))
    nondet = 1e-7 if with_rpb else 1e-10

    # Causal windows leave -inf slots in the logits: check qk through the softmax (as NATTEN).
    def qk(q, k, *rpb):
        return torch.ops.mmboat.na2d_qk(q, k, rpb[0] if rpb else None, *args).softmax(-1)

    attn = _require_float64_kernel(lambda: qk(q, k, *rpb), 'torch.ops.mmboat.na2d_qk')
    _gradcheck(qk, [q, k, *rpb], nondet)
    weights = attn.detach().requires_grad_()
    _require_float64_kernel(lambda: torch.ops.mmboat.na2d_av(weights, v, *args),
                            'torch.ops.mmboat.na2d_av')
    _gradcheck(lambda a, v: torch.ops.mmboat.na2d_av(a, v, *args), [weights, v], 1e-10)

    config = dict(kernel_size=ks, dilation=dil, is_causal=causal, impl='ext')

    def entry(q, k, v, *rpb):
        logits = na2d_qk(q, k, rpb[0] if rpb else None, **config)
        return na2d_av(logits.softmax(-1), v, **config)

    _require_float64_kernel(lambda: entry(q, k, v, *rpb),
                            'mmboat.ops.na2d_qk/na2d_av(impl="ext") (the dtype table of '
                            'mmboat/ops/neighborhood_attention.py)')
    _gradcheck(entry, [q, k, v, *rpb], nondet)


# ---------------------------------------------------------------------------------------------
# torch.autocast('cuda'): float32 inputs and a float32 rpb parameter.
# ---------------------------------------------------------------------------------------------
AMP_TOL = dict(atol=5e-2, rtol=5e-2)
AMP_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize('dtype', AMP_DTYPES, ids=str)
@pytest.mark.parametrize('nd', [1, 2, 3])
def test_fused_ops_under_cuda_autocast(nd, dtype):
    """float32 q/k/v and a float32 rpb ``nn.Parameter`` under ``torch.autocast('cuda')``: the
    output is in the autocast dtype, every gradient in its input's dtype (float32), all close to
    the float32 reference; the direct ``torch.ops`` call follows the same policy."""
    from mmboat.ops import na1d, na2d, na3d

    fn = {1: na1d, 2: na2d, 3: na3d}[nd]
    spatial, ks, dil = {1: ((19, ), 5, 2), 2: ((13, 12), 3, (2, 3)),
                        3: ((5, 6, 7), 3, (1, 2, 1))}[nd]
    gen = _cuda_gen(11)
    shape = (2, 2, *spatial, 32)
    q, k, v = (torch.randn(shape, device='cuda', generator=gen).requires_grad_()
               for _ in range(3))
    rpb = torch.nn.Parameter(0.5 * torch.randn(2, *[2 * ks - 1] * nd, device='cuda',
                                               generator=gen))
    grad = torch.randn(shape, device='cuda', generator=gen)
    with torch.autocast('cuda', dtype=dtype):
        out = fn(q, k, v, rpb, kernel_size=ks, dilation=dil, impl='ext')
        direct, lse = _fused_ops(nd)[0](q, k, v, rpb, [ks] * nd,
                                        list(dil) if isinstance(dil, tuple) else [dil] * nd,
                                        [False] * nd, 32**-0.5)
    assert out.dtype == dtype and direct.dtype == dtype and lse.dtype == torch.float32
    grads = torch.autograd.grad(out, (q, k, v, rpb), grad.to(dtype))
    assert [g.dtype for g in grads] == [torch.float32] * 4

    ref = nand_reference(q, k, v, rpb, ks, dil, False, 32**-0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v, rpb), grad)
    torch.testing.assert_close(out.float(), ref.detach(), **AMP_TOL)
    torch.testing.assert_close(direct.float(), ref.detach(), **AMP_TOL)
    for name, got, want in zip(('dq', 'dk', 'dv', 'drpb'), grads, ref_grads):
        assert _rel_err(got, want) < 5e-2, (name, _rel_err(got, want))


@pytest.mark.parametrize('dtype', AMP_DTYPES, ids=str)
def test_unfused_ops_under_cuda_autocast(dtype):
    from mmboat.ops import na2d_av, na2d_qk

    gen = _cuda_gen(12)
    q, k, v = (torch.randn(2, 2, 11, 14, 16, device='cuda', generator=gen).requires_grad_()
               for _ in range(3))
    rpb = torch.nn.Parameter(0.5 * torch.randn(2, 5, 5, device='cuda', generator=gen))
    config = dict(kernel_size=3, dilation=(3, 2))
    with torch.autocast('cuda', dtype=dtype):
        attn = na2d_qk(q * 0.25, k, rpb, impl='ext', **config)
        assert attn.dtype == dtype
        out = na2d_av(attn.softmax(-1), v, impl='ext', **config)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out.float().sum(), (q, k, v, rpb))
    assert [g.dtype for g in grads] == [torch.float32] * 4
    ref_attn = nand_qk_reference(q * 0.25, k, rpb, 3, (3, 2), False)
    ref = nand_av_reference(ref_attn.softmax(-1), v, 3, (3, 2), False)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v, rpb))
    torch.testing.assert_close(attn.float(), ref_attn.detach(), **AMP_TOL)
    torch.testing.assert_close(out.float(), ref.detach(), **AMP_TOL)
    for name, got, want in zip(('dq', 'dk', 'dv', 'drpb'), grads, ref_grads):
        assert _rel_err(got, want) < 5e-2, (name, _rel_err(got, want))


@pytest.mark.parametrize('dtype', AMP_DTYPES, ids=str)
def test_na_layer_under_cuda_autocast(dtype):
    """The NA layer (float32 weights and rpb parameter, float32 input) under
    ``torch.autocast('cuda')``: output in the autocast dtype, float32 gradients, close to the
    float32 run. Needs mmengine (``mmboat.models``)."""
    pytest.importorskip('mmengine', reason='mmboat.models needs mmengine (tools/gpu_check.sh '
                        '--wheels)')
    from mmboat.models.layers import NeighborhoodAttention2d

    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(embed_dims=64, num_heads=2, kernel_size=7, dilation=2,
                                    impl='ext').cuda()
    x = torch.randn(2, 20, 23, 64, device='cuda', requires_grad=True)
    ref = layer(x)
    with torch.autocast('cuda', dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    params = [x, layer.rpb, layer.qkv.weight]
    grads = torch.autograd.grad(out.float().sum(), params)
    ref_grads = torch.autograd.grad(ref.sum(), params)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    torch.testing.assert_close(out.float(), ref.detach(), **AMP_TOL)
    for name, got, want in zip(('dx', 'drpb', 'dqkv'), grads, ref_grads):
        assert _rel_err(got, want) < 5e-2, (name, _rel_err(got, want))
