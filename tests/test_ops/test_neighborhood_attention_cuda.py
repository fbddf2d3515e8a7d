"""CUDA neighborhood-attention ops against the pure-PyTorch reference.

Needs a CUDA device and the CUDA build of ``mmboat._ext``; every op (fused forward/backward for
1-D/2-D/3-D, unfused 2-D qk/av and their backwards) is compared in float32, float16 and
bfloat16 with the gather-based reference evaluated in float32 on the same (rounded) inputs.
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


def test_cuda_rejects_float64_and_mixed_devices():
    q = torch.randn(1, 1, 8, 8, 16, device='cuda', dtype=torch.float64)
    with pytest.raises(RuntimeError, match='float64 is supported on CPU only'):
        torch.ops.mmboat.na2d_forward(q, q, q, None, [3, 3], [1, 1], [False, False], 0.25)
    qf = q.float()
    with pytest.raises(RuntimeError, match='same device'):
        torch.ops.mmboat.na2d_forward(qf, qf.cpu(), qf, None, [3, 3], [1, 1], [False, False],
                                      0.25)
    with pytest.raises(RuntimeError, match='smaller than kernel_size'):
        torch.ops.mmboat.na2d_forward(qf, qf, qf, None, [3, 3], [3, 3], [False, False], 0.25)
