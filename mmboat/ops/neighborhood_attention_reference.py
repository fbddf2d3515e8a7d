"""Pure-PyTorch (gather-based) neighborhood attention: the fallback and the test oracle.

Follows ``docs/neighborhood_attention.md`` literally: per axis the window lies
inside the query's dilation group and is shifted inwards at the borders (never padded or
truncated), the causal window ends at the query, and the relative positional bias index is
``(key' - query') + (k - 1)`` with ``'`` the index inside the dilation group. The bias is added
after scaling. Everything here is differentiable through ``torch`` autograd.

Layout is heads-first: ``query/key/value: [B, heads, *spatial, head_dim]``. A batch of 0 or 0
heads gives empty outputs (and an all-zero rpb gradient), as the compiled kernels do; nothing
here reads tensor data on the host, so meta tensors propagate shapes.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    'axis_neighborhood', 'neighborhood_index', 'na1d_reference', 'na2d_reference',
    'na3d_reference', 'na2d_qk_reference', 'na2d_av_reference', 'nand_reference'
]


def axis_neighborhood(length: int, kernel_size: int, dilation: int = 1, is_causal: bool = False,
                      device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Window of every query on one axis.

    Args:
        length (int): Axis length ``L`` (``L >= kernel_size * dilation``).
        kernel_size (int): Window size ``k``.
        dilation (int): Dilation ``d``. Defaults to 1.
        is_causal (bool): Causal window (keys up to the query). Defaults to False.
        device (torch.device, optional): Device of the returned tensors.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``keys [L, k]`` (long, key index of each slot; unused
        causal slots repeat the query), ``bias_index [L, k]`` (long, ``(key' - query') + k - 1``)
        and ``valid [L, k]`` (bool, False only for unused causal slots).
    """
    k, d = kernel_size, dilation
    i = torch.arange(length, device=device)
    group = i % d
    inner = i // d
    t = torch.arange(k, device=device)
    if is_causal:
        start = (inner - k + 1).clamp(min=0)
        key_inner = start[:, None] + t[None, :]
        valid = key_inner <= inner[:, None]
        key_inner = torch.minimum(key_inner, inner[:, None])
    else:
        group_len = (length - group + d - 1) // d
        start = torch.minimum((inner - k // 2).clamp(min=0), group_len - k)
        key_inner = start[:, None] + t[None, :]
        valid = torch.ones(length, k, dtype=torch.bool, device=device)
    keys = key_inner * d + group[:, None]
    bias_index = key_inner - inner[:, None] + (k - 1)
    return keys, bias_index, valid


def _numel(sizes: Sequence[int]) -> int:
    """Product of ``sizes`` (the flattened size; used instead of a ``-1`` in reshapes, which
    is ambiguous for empty tensors: batch 0 or 0 heads)."""
    total = 1
    for size in sizes:
        total *= size
    return total


def neighborhood_index(spatial: Sequence[int], kernel_size: Sequence[int],
                       dilation: Sequence[int], is_causal: Sequence[bool],
                       device: Optional[torch.device] = None
                       ) -> Tuple[Tensor, List[Tensor], Tensor]:
    """N-D neighbourhoods as flat indices (first spatial axis outermost, row-major slots).

    Returns:
        tuple: ``keys [N, K]`` flat key index per query and slot (``N = prod(spatial)``,
        ``K = prod(kernel_size)``), per-axis ``bias_index`` tensors broadcastable to
        ``[*spatial, *kernel_size]`` and ``valid [N, K]``.
    """
    n = len(spatial)
    flat = None
    valid = None
    bias_indices = []
    stride = 1
    strides = []
    for size in reversed(spatial):
        strides.insert(0, stride)
        stride *= size
    for axis in range(n):
        keys, bidx, val = axis_neighborhood(spatial[axis], kernel_size[axis], dilation[axis],
                                            is_causal[axis], device)
        # Broadcast [L, k] to position (axis) among queries and (n + axis) among slots.
        shape = [1] * (2 * n)
        shape[axis] = spatial[axis]
        shape[n + axis] = kernel_size[axis]
        keys = keys.view(shape) * strides[axis]
        bias_indices.append(bidx.view(shape))
        flat = keys if flat is None else flat + keys
        val = val.view(shape)
        valid = val if valid is None else valid & val
    total, kk = _numel(spatial), _numel(kernel_size)
    full = list(spatial) + list(kernel_size)
    return (flat.expand(full).reshape(total, kk), bias_indices,
            valid.expand(full).reshape(total, kk))


def _gather_neighbors(x: Tensor, keys: Tensor) -> Tensor:
    """``x [B, h, N, D]``, ``keys [N, K]`` -> ``[B, h, N, K, D]``."""
    b, h, n, dim = x.shape
    return x[:, :, keys.reshape(-1)].view(b, h, n, keys.shape[1], dim)


def _bias(rpb: Tensor, bias_indices: List[Tensor], spatial: Sequence[int]) -> Tensor:
    """Bias of every (query, slot): ``[heads, N, K]``."""
    heads = rpb.shape[0]
    n_sp = len(spatial)
    bias = rpb[(slice(None), ) + tuple(bias_indices)]  # [heads, *spatial, *kernel]
    # Explicit sizes: a -1 is ambiguous when heads == 0.
    return bias.reshape(heads, _numel(spatial), bias.shape[1 + n_sp:].numel())


def _as_tuple(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f'{name} needs {n} values (one per spatial axis), got {value}')
        return tuple(value)
    return (value, ) * n


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _upcast(*tensors: Optional[Tensor]) -> tuple:
    """float16/bfloat16 tensors as float32 (the kernels' accumulation dtype); others as they are."""
    return tuple(t.float() if t is not None and t.dtype in _LOW_PRECISION else t
                 for t in tensors)


def nand_qk_reference(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size,
                      dilation=1, is_causal=False) -> Tensor:
    """Unfused N-D logits ``q . k + rpb`` (q not scaled here): ``[B, heads, *spatial, K]``.

    Unused causal slots are ``-inf``.
    """
    n = query.dim() - 3
    spatial = tuple(query.shape[2:-1])
    ks = _as_tuple(kernel_size, n, 'kernel_size')
    ds = _as_tuple(dilation, n, 'dilation')
    cs = _as_tuple(is_causal, n, 'is_causal')
    keys, bias_idx, valid = neighborhood_index(spatial, ks, ds, cs, query.device)
    b, h = query.shape[:2]
    tokens = _numel(spatial)
    out_dtype = query.dtype
    query, key, rpb = _upcast(query, key, rpb)
    q = query.reshape(b, h, tokens, query.shape[-1])
    k_nb = _gather_neighbors(key.reshape(b, h, tokens, key.shape[-1]), keys)
    attn = torch.einsum('bhnd,bhnkd->bhnk', q, k_nb)
    if rpb is not None:
        attn = attn + _bias(rpb, bias_idx, spatial).to(attn.dtype)
    if any(cs):  # only causal windows have unused slots (no host sync on valid)
        attn = attn.masked_fill(~valid, float('-inf'))
    return attn.reshape(b, h, *spatial, keys.shape[1]).to(out_dtype)


def nand_av_reference(attn: Tensor, value: Tensor, kernel_size, dilation=1,
                      is_causal=False) -> Tensor:
    """Unfused N-D weighted sum ``sum_slot attn * v``: ``[B, heads, *spatial, D]``.

    Unused causal slots are ignored whatever they hold.
    """
    n = value.dim() - 3
    spatial = tuple(value.shape[2:-1])
    ks = _as_tuple(kernel_size, n, 'kernel_size')
    ds = _as_tuple(dilation, n, 'dilation')
    cs = _as_tuple(is_causal, n, 'is_causal')
    keys, _, valid = neighborhood_index(spatial, ks, ds, cs, value.device)
    b, h = value.shape[:2]
    tokens = _numel(spatial)
    out_dtype = value.dtype
    attn, value = _upcast(attn, value)
    a = attn.reshape(b, h, tokens, keys.shape[1])
    if any(cs):
        a = a.masked_fill(~valid, 0)
    v_nb = _gather_neighbors(value.reshape(b, h, tokens, value.shape[-1]), keys)
    out = torch.einsum('bhnk,bhnkd->bhnd', a, v_nb)
    return out.reshape(b, h, *spatial, value.shape[-1]).to(out_dtype)


def nand_reference(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor] = None,
                   kernel_size=7, dilation=1, is_causal=False,
                   scale: Optional[float] = None, return_lse: bool = False):
    """Fused N-D neighborhood attention (reference). See :func:`na2d_reference`.

    With ``return_lse`` also returns the float32 log-sum-exp ``[B, heads, *spatial]`` of the
    scaled and biased logits. float16/bfloat16 inputs are computed in float32 (as the kernels
    accumulate) and the output is rounded to the query's dtype once.
    """
    if scale is None:
        scale = query.shape[-1]**-0.5
    out_dtype = query.dtype
    query, key, value, rpb = _upcast(query, key, value, rpb)
    logits = nand_qk_reference(query * scale, key, rpb, kernel_size, dilation, is_causal)
    attn = logits.softmax(dim=-1)
    out = nand_av_reference(attn, value, kernel_size, dilation, is_causal).to(out_dtype)
    if return_lse:
        return out, torch.logsumexp(logits.float(), dim=-1)
    return out


def na1d_reference(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor] = None,
                   kernel_size=7, dilation=1, is_causal=False,
                   scale: Optional[float] = None) -> Tensor:
    """1-D neighborhood attention (reference); ``query/key/value: [B, heads, L, D]``,
    ``rpb: [heads, 2k-1]``. See :func:`na2d_reference`."""
    return nand_reference(query, key, value, rpb, kernel_size, dilation, is_causal, scale)


def na2d_reference(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor] = None,
                   kernel_size=7, dilation=1, is_causal=False,
                   scale: Optional[float] = None) -> Tensor:
    """2-D neighborhood attention (reference, gather-based).

    Args:
        query (Tensor): ``[B, heads, H, W, D]``.
        key (Tensor): ``[B, heads, H, W, D]``.
        value (Tensor): ``[B, heads, H, W, D]``.
        rpb (Tensor, optional): ``[heads, 2kH-1, 2kW-1]`` relative positional bias.
        kernel_size (int | tuple[int, int]): Window size. Defaults to 7.
        dilation (int | tuple[int, int]): Dilation. Defaults to 1.
        is_causal (bool | tuple[bool, bool]): Causal window per axis. Defaults to False.
        scale (float, optional): Logit scale. Defaults to ``D ** -0.5``.

    Returns:
        Tensor: ``[B, heads, H, W, D]``.
    """
    return nand_reference(query, key, value, rpb, kernel_size, dilation, is_causal, scale)


def na3d_reference(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor] = None,
                   kernel_size=7, dilation=1, is_causal=False,
                   scale: Optional[float] = None) -> Tensor:
    """3-D neighborhood attention (reference); ``query/key/value: [B, heads, T, H, W, D]``,
    ``rpb: [heads, 2kT-1, 2kH-1, 2kW-1]``. See :func:`na2d_reference`."""
    return nand_reference(query, key, value, rpb, kernel_size, dilation, is_causal, scale)


def na2d_qk_reference(query: Tensor, key: Tensor, rpb: Optional[Tensor] = None, kernel_size=7,
                      dilation=1, is_causal=False) -> Tensor:
    """Unfused 2-D logits (reference; the caller scales ``query``).

    Args:
        query (Tensor): ``[B, heads, H, W, D]`` (already scaled).
        key (Tensor): ``[B, heads, H, W, D]``.
        rpb (Tensor, optional): ``[heads, 2kH-1, 2kW-1]``.

    Returns:
        Tensor: ``[B, heads, H, W, kH*kW]``, slot ``ki*kW + kj``; unused causal slots ``-inf``.
    """
    return nand_qk_reference(query, key, rpb, kernel_size, dilation, is_causal)


def na2d_av_reference(attn: Tensor, value: Tensor, kernel_size=7, dilation=1,
                      is_causal=False) -> Tensor:
    """Unfused 2-D weighted sum (reference).

    Args:
        attn (Tensor): ``[B, heads, H, W, kH*kW]`` attention weights.
        value (Tensor): ``[B, heads, H, W, D]``.

    Returns:
        Tensor: ``[B, heads, H, W, D]``.
    """
    return nand_av_reference(attn, value, kernel_size, dilation, is_causal)
