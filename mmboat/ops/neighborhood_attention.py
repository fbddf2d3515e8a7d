"""Neighborhood attention (NA, NAT/DiNAT): 1-D/2-D/3-D fused ops and the 2-D unfused pair.

The compiled kernels are ``torch.ops.mmboat.na{1,2,3}d_forward/_backward`` and
``torch.ops.mmboat.na2d_qk/_av`` (+ backwards), schemas in
``csrc/pytorch/neighborhood_attention.cpp``. This module validates arguments, registers fake
(meta) kernels and autograd for those ops (so ``torch.compile(fullgraph=True)`` traces through
them; eager calls of the fused ops take ``mmboat._ext.na_fused``, the same ops under a C++
autograd Function, which runs no Python in the backward) and falls back to the pure-PyTorch
references of
:mod:`mmboat.ops.neighborhood_attention_reference` when the compiled op is missing for the
input's device, or when ``impl='reference'``. Meta tensors (a model built on the meta device)
run the fake kernels when the ops are registered: shapes propagate, nothing is computed.

Under ``torch.autocast`` the inputs and the bias are cast to the autocast dtype and the ops
accumulate in float32 (:mod:`mmboat.ops.autocast`, on every path: these functions, the
reference and the compiled ops' Autocast dispatcher kernels).

Semantics (``docs/neighborhood_attention.md``): per axis, the window of ``k`` keys lies in the
query's dilation group and is shifted inwards at the borders; ``L >= k * d`` is required; the
relative positional bias (rpb) index is ``(key' - query') + (k - 1)`` and the bias is added
after scaling. Even kernels (``r`` keys left, ``r - 1`` right) are allowed without rpb only;
causal windows are allowed without rpb only.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .autocast import call_with_policy, register_autocast_kernels
from .checks import FLOAT_DTYPES, check_float_tensors, check_same_dtype_device, check_tensor
from .ext_loader import ext_module, op_available, register_op_family, use_compiled
from .neighborhood_attention_reference import na2d_av_reference, na2d_qk_reference, nand_reference

__all__ = ['na1d', 'na2d', 'na3d', 'na2d_qk', 'na2d_av', 'neighborhood_attention_op_available']

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

# Autocast policy family of these ops (mmboat/ops/autocast.py): inputs and rpb in the autocast
# dtype, float32 accumulation and log-sum-exp.
_FAMILY = 'neighborhood_attention'


# ---------------------------------------------------------------------------------------------
# Availability of the compiled ops (recorded by the dispatcher, mmboat/ops/ext_loader.py).
# ---------------------------------------------------------------------------------------------
# dtypes the compiled kernels take per device (float64 accumulates in float64, the others in
# float32); others run on the reference. 'meta': the fake kernels (shapes only).
_KERNEL_DTYPES = {
    'cpu': FLOAT_DTYPES,
    'cuda': FLOAT_DTYPES,
    'meta': FLOAT_DTYPES,
}


def neighborhood_attention_op_available(name: str = 'na2d_forward',
                                        device: Union[str, torch.device] = 'cpu') -> bool:
    """Whether the compiled op ``torch.ops.mmboat.<name>`` has a kernel for ``device``."""
    return op_available(name, device)


# ---------------------------------------------------------------------------------------------
# Argument validation (mirrored in C++ for direct torch.ops callers).
# ---------------------------------------------------------------------------------------------
def _per_axis(value, n: int, name: str, kind: type) -> Tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            article = 'an' if kind is int else 'a'
            raise ValueError(f'{name} must be {article} {kind.__name__} or {n} values (one per '
                             f'spatial axis), got {tuple(value)}')
        values = tuple(value)
    else:
        values = (value, ) * n
    for v in values:
        ok = isinstance(v, bool) if kind is bool else (isinstance(v, int) and
                                                      not isinstance(v, bool))
        if not ok:
            raise TypeError(f'{name} must hold {kind.__name__} values, got {value!r}')
    return values


def _check_config(what: str, n: int, spatial: Sequence[int], has_rpb: bool, kernel_size,
                  dilation, is_causal) -> Tuple[Tuple[int, ...], Tuple[int, ...],
                                                Tuple[bool, ...]]:
    ks = _per_axis(kernel_size, n, 'kernel_size', int)
    ds = _per_axis(dilation, n, 'dilation', int)
    cs = _per_axis(is_causal, n, 'is_causal', bool)
    for axis in range(n):
        k, d, length = ks[axis], ds[axis], spatial[axis]
        if k < 1:
            raise ValueError(f'{what}: kernel_size must be >= 1, got {ks}')
        if d < 1:
            raise ValueError(f'{what}: dilation must be >= 1, got {ds}')
        if length < k * d:
            raise ValueError(
                f'{what}: spatial axis {axis} has size {length}, smaller than kernel_size * '
                f'dilation = {k} * {d} = {k * d}; pad the input (the NA layer pads to k * d)')
        if has_rpb and k % 2 == 0:
            raise ValueError(f'{what}: an even kernel_size {ks} is only supported without rpb')
    if has_rpb and any(cs):
        raise ValueError(f'{what}: is_causal={cs} cannot be combined with rpb')
    return ks, ds, cs


def _check_rpb(what: str, rpb: Optional[Tensor], heads: int, ks: Sequence[int],
               ref: Tensor) -> None:
    if rpb is None:
        return
    check_tensor(rpb, 'rpb', what)
    expected = (heads, ) + tuple(2 * k - 1 for k in ks)
    if tuple(rpb.shape) != expected:
        raise ValueError(f'{what}: rpb must have shape (heads, 2k-1 per axis) = {expected}, '
                         f'got {tuple(rpb.shape)}')
    check_same_dtype_device(what, ('query', ref), [('rpb', rpb)])


def _check_qkv(what: str, n: int, tensors: Sequence[Tuple[str, Tensor]]) -> None:
    check_float_tensors(what, n + 3, f'[B, heads, {n} spatial dims, head_dim]', tensors)


def _check_same_shape(what: str, a: Tuple[str, Tensor], b: Tuple[str, Tensor]) -> None:
    if a[1].shape != b[1].shape:
        raise ValueError(f'{what}: {a[0]} and {b[0]} shapes differ: {tuple(a[1].shape)} vs '
                         f'{tuple(b[1].shape)}')


# ---------------------------------------------------------------------------------------------
# Fused op.
# ---------------------------------------------------------------------------------------------
def _nand(n: int, query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor],
          kernel_size, dilation, is_causal, scale: Optional[float], impl: Optional[str]) -> Tensor:
    what = f'na{n}d'
    _check_qkv(what, n, [('query', query), ('key', key), ('value', value)])
    _check_same_shape(what, ('query', query), ('key', key))
    _check_same_shape(what, ('query', query), ('value', value))
    spatial = tuple(query.shape[2:-1])
    ks, ds, cs = _check_config(what, n, spatial, rpb is not None, kernel_size, dilation,
                               is_causal)
    _check_rpb(what, rpb, query.shape[1], ks, query)
    if scale is None:
        scale = query.shape[-1]**-0.5
    scale = float(scale)
    if not use_compiled(impl, what, f'na{n}d_forward', query.device, query.dtype):
        return nand_reference(query, key, value, rpb, ks, ds, cs, scale)
    args = (query.contiguous(), key.contiguous(), value.contiguous(),
            None if rpb is None else rpb.contiguous(), list(ks), list(ds), list(cs), scale)
    fused = _EAGER_FUSED[0]
    if fused is None or torch.compiler.is_compiling():  # registered fake + autograd
        return _FORWARD_OPS[n](*args)[0]
    # Eager: the same ops under a C++ autograd Function (csrc/pytorch/neighborhood_attention.cpp),
    # without torch.library's per-call Python around the forward and the backward.
    return fused(n, *args)


def na1d(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor] = None,
         kernel_size: IntOrTuple = 7, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
         scale: Optional[float] = None, impl: Optional[str] = None) -> Tensor:
    """1-D neighborhood attention.

    Args:
        query (Tensor): ``[B, heads, L, D]``.
        key (Tensor): ``[B, heads, L, D]``.
        value (Tensor): ``[B, heads, L, D]``.
        rpb (Tensor, optional): ``[heads, 2k-1]``. Defaults to None.
        kernel_size, dilation, is_causal, scale, impl: See :func:`na2d`.

    Returns:
        Tensor: ``[B, heads, L, D]``.
    """
    return call_with_policy(_FAMILY, _nand, 1, query, key, value, rpb, kernel_size, dilation,
                            is_causal, scale, impl)


def na2d(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor] = None,
         kernel_size: IntOrTuple = 7, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
         scale: Optional[float] = None, impl: Optional[str] = None) -> Tensor:
    """2-D neighborhood attention (fused: logits, softmax and weighted sum in one op).

    Args:
        query (Tensor): ``[B, heads, H, W, D]``.
        key (Tensor): ``[B, heads, H, W, D]``.
        value (Tensor): ``[B, heads, H, W, D]``.
        rpb (Tensor, optional): ``[heads, 2kH-1, 2kW-1]`` relative positional bias, added to
            the logits after scaling. Defaults to None.
        kernel_size (int | tuple[int, int]): Window size per axis. Defaults to 7.
        dilation (int | tuple[int, int]): Dilation per axis. Defaults to 1.
        is_causal (bool | tuple[bool, bool]): Causal window per axis. Defaults to False.
        scale (float, optional): Logit scale. Defaults to ``D ** -0.5``.
        impl (str, optional): ``'auto'``, ``'ext'`` or ``'reference'``. Defaults to the
            ``MMBOAT_OPS_IMPL`` environment variable, else ``'auto'``.

    Returns:
        Tensor: ``[B, heads, H, W, D]``.

    Examples:
        >>> q = k = v = torch.randn(1, 2, 9, 9, 16)
        >>> na2d(q, k, v, kernel_size=3, dilation=2).shape
        torch.Size([1, 2, 9, 9, 16])
    """
    return call_with_policy(_FAMILY, _nand, 2, query, key, value, rpb, kernel_size, dilation,
                            is_causal, scale, impl)


def na3d(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor] = None,
         kernel_size: IntOrTuple = 7, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
         scale: Optional[float] = None, impl: Optional[str] = None) -> Tensor:
    """3-D neighborhood attention.

    Args:
        query (Tensor): ``[B, heads, T, H, W, D]``.
        key (Tensor): ``[B, heads, T, H, W, D]``.
        value (Tensor): ``[B, heads, T, H, W, D]``.
        rpb (Tensor, optional): ``[heads, 2kT-1, 2kH-1, 2kW-1]``. Defaults to None.
        kernel_size, dilation, is_causal, scale, impl: See :func:`na2d`.

    Returns:
        Tensor: ``[B, heads, T, H, W, D]``.
    """
    return call_with_policy(_FAMILY, _nand, 3, query, key, value, rpb, kernel_size, dilation,
                            is_causal, scale, impl)


# ---------------------------------------------------------------------------------------------
# Unfused 2-D ops.
# ---------------------------------------------------------------------------------------------
def na2d_qk(query: Tensor, key: Tensor, rpb: Optional[Tensor] = None,
            kernel_size: IntOrTuple = 7, dilation: IntOrTuple = 1,
            is_causal: BoolOrTuple = False, impl: Optional[str] = None) -> Tensor:
    """Unfused 2-D NA logits ``query . key + rpb`` (the caller scales ``query``).

    Args:
        query (Tensor): ``[B, heads, H, W, D]``.
        key (Tensor): ``[B, heads, H, W, D]``.
        rpb (Tensor, optional): ``[heads, 2kH-1, 2kW-1]``. Defaults to None.
        kernel_size, dilation, is_causal, impl: See :func:`na2d`.

    Returns:
        Tensor: ``[B, heads, H, W, kH*kW]`` logits, slot ``ki*kW + kj``; unused causal slots
        are ``-inf`` (valid keys first).
    """
    return call_with_policy(_FAMILY, _na2d_qk, query, key, rpb, kernel_size, dilation,
                            is_causal, impl)


def _na2d_qk(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size, dilation,
             is_causal, impl: Optional[str]) -> Tensor:
    what = 'na2d_qk'
    _check_qkv(what, 2, [('query', query), ('key', key)])
    _check_same_shape(what, ('query', query), ('key', key))
    ks, ds, cs = _check_config(what, 2, tuple(query.shape[2:4]), rpb is not None, kernel_size,
                               dilation, is_causal)
    _check_rpb(what, rpb, query.shape[1], ks, query)
    if not use_compiled(impl, what, 'na2d_qk', query.device, query.dtype):
        return na2d_qk_reference(query, key, rpb, ks, ds, cs)
    return torch.ops.mmboat.na2d_qk(query.contiguous(), key.contiguous(),
                                    None if rpb is None else rpb.contiguous(), list(ks),
                                    list(ds), list(cs))


def na2d_av(attn: Tensor, value: Tensor, kernel_size: IntOrTuple = 7,
            dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
            impl: Optional[str] = None) -> Tensor:
    """Unfused 2-D NA weighted sum ``sum_slot attn * value``.

    Args:
        attn (Tensor): ``[B, heads, H, W, kH*kW]`` attention weights (unused causal slots are
            ignored).
        value (Tensor): ``[B, heads, H, W, D]``.
        kernel_size, dilation, is_causal, impl: See :func:`na2d`.

    Returns:
        Tensor: ``[B, heads, H, W, D]``.
    """
    return call_with_policy(_FAMILY, _na2d_av, attn, value, kernel_size, dilation, is_causal,
                            impl)


def _na2d_av(attn: Tensor, value: Tensor, kernel_size, dilation, is_causal,
             impl: Optional[str]) -> Tensor:
    what = 'na2d_av'
    _check_qkv(what, 2, [('value', value)])
    check_tensor(attn, 'attn', what)
    ks, ds, cs = _check_config(what, 2, tuple(value.shape[2:4]), False, kernel_size, dilation,
                               is_causal)
    expected = tuple(value.shape[:4]) + (ks[0] * ks[1], )
    if tuple(attn.shape) != expected:
        raise ValueError(f'{what}: attn must have shape [B, heads, H, W, kH*kW] = {expected}, '
                         f'got {tuple(attn.shape)}')
    check_same_dtype_device(what, ('value', value), [('attn', attn)])
    if not use_compiled(impl, what, 'na2d_av', value.device, value.dtype):
        return na2d_av_reference(attn, value, ks, ds, cs)
    return torch.ops.mmboat.na2d_av(attn.contiguous(), value.contiguous(), list(ks), list(ds),
                                    list(cs))


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops (registered once, when the ops exist).
# ---------------------------------------------------------------------------------------------
def _register_fused(n: int) -> None:
    fwd_name, bwd_name = f'mmboat::na{n}d_forward', f'mmboat::na{n}d_backward'

    @torch.library.register_fake(fwd_name)
    def _fwd_fake(query, key, value, rpb, kernel_size, dilation, is_causal, scale):
        lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        return (torch.empty_like(query), query.new_empty(query.shape[:-1], dtype=lse_dtype))

    @torch.library.register_fake(bwd_name)
    def _bwd_fake(grad_out, query, key, value, rpb, out, logsumexp, kernel_size, dilation,
                  is_causal, scale):
        grad_rpb = None if rpb is None else torch.empty_like(rpb)
        return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
                grad_rpb)

    def _setup(ctx, inputs, output):
        query, key, value, rpb, kernel_size, dilation, is_causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(query, key, value, rpb, out, lse)
        ctx.config = (kernel_size, dilation, is_causal, scale)

    backward_op = getattr(torch.ops.mmboat, f'na{n}d_backward').default

    def _backward(ctx, grad_out, grad_lse):
        query, key, value, rpb, out, lse = ctx.saved_tensors
        dq, dk, dv, drpb = backward_op(grad_out.contiguous(), query, key, value, rpb, out, lse,
                                       *ctx.config)
        return dq, dk, dv, drpb, None, None, None, None

    torch.library.register_autograd(fwd_name, _backward, setup_context=_setup)
    register_autocast_kernels(_FAMILY, [f'na{n}d_forward'])
    _FORWARD_OPS[n] = getattr(torch.ops.mmboat, f'na{n}d_forward').default


_FORWARD_OPS: Dict[int, Any] = {}  # n -> torch.ops.mmboat.na{n}d_forward.default
_EAGER_FUSED: List[Any] = [None]  # mmboat._ext.na_fused once the fused ops are registered


def _register_unfused() -> None:

    @torch.library.register_fake('mmboat::na2d_qk')
    def _qk_fake(query, key, rpb, kernel_size, dilation, is_causal):
        return query.new_empty(tuple(query.shape[:-1]) + (kernel_size[0] * kernel_size[1], ))

    @torch.library.register_fake('mmboat::na2d_qk_backward')
    def _qk_bwd_fake(grad_attn, query, key, has_rpb, kernel_size, dilation, is_causal):
        grad_rpb = None
        if has_rpb:
            grad_rpb = query.new_empty((query.shape[1], 2 * kernel_size[0] - 1,
                                        2 * kernel_size[1] - 1))
        return torch.empty_like(query), torch.empty_like(key), grad_rpb

    @torch.library.register_fake('mmboat::na2d_av')
    def _av_fake(attn, value, kernel_size, dilation, is_causal):
        return torch.empty_like(value)

    @torch.library.register_fake('mmboat::na2d_av_backward')
    def _av_bwd_fake(grad_out, attn, value, kernel_size, dilation, is_causal):
        return torch.empty_like(attn), torch.empty_like(value)

    def _qk_setup(ctx, inputs, output):
        query, key, rpb, kernel_size, dilation, is_causal = inputs
        ctx.save_for_backward(query, key)
        ctx.has_rpb = rpb is not None
        ctx.config = (kernel_size, dilation, is_causal)

    def _qk_backward(ctx, grad_attn):
        query, key = ctx.saved_tensors
        dq, dk, drpb = torch.ops.mmboat.na2d_qk_backward(grad_attn.contiguous(), query, key,
                                                         ctx.has_rpb, *ctx.config)
        return dq, dk, drpb, None, None, None

    def _av_setup(ctx, inputs, output):
        attn, value, kernel_size, dilation, is_causal = inputs
        ctx.save_for_backward(attn, value)
        ctx.config = (kernel_size, dilation, is_causal)

    def _av_backward(ctx, grad_out):
        attn, value = ctx.saved_tensors
        da, dv = torch.ops.mmboat.na2d_av_backward(grad_out.contiguous(), attn, value,
                                                   *ctx.config)
        return da, dv, None, None, None

    torch.library.register_autograd('mmboat::na2d_qk', _qk_backward, setup_context=_qk_setup)
    torch.library.register_autograd('mmboat::na2d_av', _av_backward, setup_context=_av_setup)
    register_autocast_kernels(_FAMILY, ['na2d_qk', 'na2d_av'])


def _register_all() -> None:
    """Register each family of compiled NA ops present in the extension with the dispatcher."""
    fused = [
        register_op_family(f'na{n}d', (f'na{n}d_forward', f'na{n}d_backward'), _KERNEL_DTYPES,
                           lambda n=n: _register_fused(n)) for n in (1, 2, 3)
    ]
    if all(fused):
        _EAGER_FUSED[0] = getattr(ext_module(), 'na_fused', None)
    register_op_family('na2d_qk/av', ('na2d_qk', 'na2d_qk_backward', 'na2d_av',
                                      'na2d_av_backward'), _KERNEL_DTYPES, _register_unfused)


_register_all()
