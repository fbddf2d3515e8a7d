"""Feature-space local attention (FSLA) ops of BOAT.

BOAT: Bilateral Local Attention Vision Transformer (https://arxiv.org/abs/2201.13027).
Tokens are grouped by a balanced hierarchical clustering of their queries
(:func:`balanced_hierarchical_clustering`), then attend inside their cluster plus an overlap
with the sibling cluster (:func:`clustered_attention`). Both run on the compiled ops
``torch.ops.mmboat.bhc_cluster`` / ``clustered_attention_forward`` /
``clustered_attention_backward`` when available, else on the pure-PyTorch references in
:mod:`mmboat.ops.feature_space_attention_reference`; the compiled ops have fake kernels and an
autograd formula registered here, so they work under ``torch.compile`` (and meta tensors run
the fake kernels: shapes only). Under
``torch.autocast`` the clustering computes in float32 as always and the clustered attention
casts its inputs to float32 (:mod:`mmboat.ops.autocast`).

Shapes: ``B`` batch, ``heads``, ``N`` tokens in raster order, ``d`` channels per head.
"""
import math
from typing import Optional, Tuple

import torch

from .autocast import call_with_policy, register_autocast_kernels
from .checks import FLOAT_DTYPES, check_int, check_same_dtype_device, check_tensor
from .ext_loader import register_op_family, use_compiled
from .feature_space_attention_reference import (
    CLUSTER_SIZE,
    ITERS,
    OVERLAP,
    TAU,
    balanced_hierarchical_clustering_reference,
    cluster_layout,
    clustered_attention_reference,
)
from .flops import traced_clustered_attention, traced_clustering

__all__ = [
    'cluster_layout', 'balanced_hierarchical_clustering', 'clustered_attention',
    'feature_space_local_attention'
]

# Autocast policy family of clustered_attention (mmboat/ops/autocast.py): float32 under autocast
# (the clustering, family 'clustering', is float32 too).
_FAMILY = 'clustered_attention'

# dtypes the compiled kernels take per device (the CPU attention kernels have no half types; the
# clustering computes in float32 whatever the input; 'meta' is the fake kernel, shapes only).
_ATTENTION_DTYPES = {
    'cpu': (torch.float32, torch.float64),
    'cuda': FLOAT_DTYPES,
    'meta': FLOAT_DTYPES,
}
_CLUSTERING_DTYPES = {'cpu': FLOAT_DTYPES, 'cuda': FLOAT_DTYPES, 'meta': FLOAT_DTYPES}


def _check_features(name: str, t: torch.Tensor, what: str) -> None:
    check_tensor(t, name, what)
    if t.dim() != 4:
        raise ValueError(f'{what}: {name} must have shape [B, heads, N, d] (4 dimensions), got '
                         f'shape {tuple(t.shape)}')
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f'{what}: {name} must be a floating-point tensor '
                        f'({", ".join(str(d) for d in FLOAT_DTYPES)}), got dtype {t.dtype}')
    if t.shape[2] < 1 or t.shape[3] < 1:
        raise ValueError(f'{what}: {name} must have at least one token and one channel, got '
                         f'shape {tuple(t.shape)}')


def balanced_hierarchical_clustering(x: torch.Tensor,
                                     cluster_size: int = CLUSTER_SIZE,
                                     iters: int = ITERS,
                                     tau: float = TAU,
                                     impl: Optional[str] = None
                                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced hierarchical clustering of tokens in feature space, per sample and head.

    Runs in float32 without gradient on ``x``'s device; samples and heads are independent. With
    ``N = m * 2**L`` it is exactly the released BOAT rule; other N split groups by rank into
    ``floor(n/2)`` and ``ceil(n/2)`` tokens (see :func:`cluster_layout`).

    Args:
        x (Tensor): ``[B, heads, N, d]`` features (the queries), any float dtype.
        cluster_size (int): m, the largest leaf size. Defaults to 49.
        iters (int): soft-assignment centroid updates per split. Defaults to 2.
        tau (float): inverse temperature of the soft assignment. Defaults to 100.0.
        impl (str, optional): ``'auto'``, ``'ext'`` or ``'reference'``; None reads
            ``MMBOAT_OPS_IMPL``. Defaults to None.

    Returns:
        tuple[Tensor, Tensor]: ``perm`` and ``inv_perm``, ``[B, heads, N]`` int64: ``perm`` is the
        concatenated leaf order (token indices) and ``inv_perm[perm[t]] = t``.

    Examples:
        >>> x = torch.randn(2, 3, 100, 16)
        >>> perm, inv_perm = balanced_hierarchical_clustering(x, cluster_size=49)
        >>> cluster_layout(100, 49)
        (2, [25, 25, 25, 25])
        >>> bool((perm.gather(-1, inv_perm) == torch.arange(100)).all())
        True
    """
    return call_with_policy('clustering', _balanced_hierarchical_clustering, x, cluster_size,
                            iters, tau, impl)


def _balanced_hierarchical_clustering(x: torch.Tensor, cluster_size: int, iters: int, tau: float,
                                      impl: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    what = 'balanced_hierarchical_clustering'
    _check_features('x', x, what)
    check_int(cluster_size, 'cluster_size', what, 1)
    check_int(iters, 'iters', what, 0)
    tau = float(tau)
    if not math.isfinite(tau):
        raise ValueError(f'{what}: tau must be finite, got {tau}')
    if use_compiled(impl, what, 'bhc_cluster', x.device, x.dtype):
        # The kernels read strided views (q sliced out of a qkv projection) without a copy.
        return torch.ops.mmboat.bhc_cluster(x.detach(), cluster_size, iters, tau)
    if torch.jit.is_tracing():  # one node that mmboat.ops.flops counts (FLOP analysis)
        return traced_clustering(x.detach(), cluster_size, iters, tau)
    return balanced_hierarchical_clustering_reference(x, cluster_size, iters, tau)


def _check_attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            perm: torch.Tensor, cluster_size: int, overlap: int) -> None:
    what = 'clustered_attention'
    for name, t in (('query', query), ('key', key), ('value', value)):
        _check_features(name, t, what)
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError('query, key and value must have the same shape [B, heads, N, d], got '
                         f'{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}')
    check_same_dtype_device(what, ('query', query), [('key', key), ('value', value)])
    check_tensor(perm, 'perm', what)
    check_same_dtype_device(what, ('query', query), [('perm', perm)], check_dtype=False)
    if perm.dtype != torch.int64:
        raise TypeError(f'perm must be int64, got dtype {perm.dtype}')
    if tuple(perm.shape) != tuple(query.shape[:3]):
        raise ValueError(f'perm must have shape [B, heads, N] = {tuple(query.shape[:3])}, got '
                         f'shape {tuple(perm.shape)}')
    check_int(cluster_size, 'cluster_size', what, 1)
    check_int(overlap, 'overlap', what, 0)
    if overlap >= cluster_size:
        raise ValueError(f'overlap must be smaller than cluster_size, got overlap={overlap} '
                         f'and cluster_size={cluster_size}')


def clustered_attention(query: torch.Tensor,
                        key: torch.Tensor,
                        value: torch.Tensor,
                        perm: torch.Tensor,
                        cluster_size: int = CLUSTER_SIZE,
                        overlap: int = OVERLAP,
                        scale: Optional[float] = None,
                        impl: Optional[str] = None) -> torch.Tensor:
    """Attention inside the leaves of a clustering, with sibling overlap on keys and values.

    Leaf ``2j`` also attends to the first ``min(o, |leaf 2j+1|)`` tokens of leaf ``2j+1``; leaf
    ``2j+1`` to the last ``min(o, |leaf 2j|)`` tokens of leaf ``2j``. Queries are never
    duplicated. With a single leaf (``N <= m``) this is plain attention. Differentiable w.r.t.
    query, key and value (not perm).

    Args:
        query, key, value (Tensor): ``[B, heads, N, d]`` in raster order, same dtype/device.
        perm (Tensor): ``[B, heads, N]`` int64 leaf order from
            :func:`balanced_hierarchical_clustering` with the same ``cluster_size``.
        cluster_size (int): m, the largest leaf size. Defaults to 49.
        overlap (int): o, ``0 <= o < m``. Defaults to 20.
        scale (float, optional): logit scale; None means ``d ** -0.5``. Defaults to None.
        impl (str, optional): ``'auto'``, ``'ext'`` or ``'reference'``. Defaults to None.

    Returns:
        Tensor: ``[B, heads, N, d]`` in raster order.

    Examples:
        >>> q, k, v = torch.randn(3, 1, 2, 100, 8).unbind(0)
        >>> perm, _ = balanced_hierarchical_clustering(q, cluster_size=49)
        >>> clustered_attention(q, k, v, perm, cluster_size=49, overlap=20).shape
        torch.Size([1, 2, 100, 8])
    """
    return call_with_policy(_FAMILY, _clustered_attention, query, key, value, perm,
                            cluster_size, overlap, scale, impl)


def _clustered_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         perm: torch.Tensor, cluster_size: int, overlap: int,
                         scale: Optional[float], impl: Optional[str]) -> torch.Tensor:
    _check_attention_inputs(query, key, value, perm, cluster_size, overlap)
    scale = query.shape[-1]**-0.5 if scale is None else float(scale)
    if use_compiled(impl, 'clustered_attention', 'clustered_attention_forward', query.device,
                    query.dtype):
        out, _ = torch.ops.mmboat.clustered_attention_forward(query.contiguous(),
                                                              key.contiguous(),
                                                              value.contiguous(),
                                                              perm.contiguous(), cluster_size,
                                                              overlap, scale)
        return out
    if torch.jit.is_tracing():  # one node that mmboat.ops.flops counts (FLOP analysis)
        return traced_clustered_attention(query, key, value, perm, cluster_size, overlap, scale)
    return clustered_attention_reference(query, key, value, perm, cluster_size, overlap, scale)


def feature_space_local_attention(query: torch.Tensor,
                                  key: torch.Tensor,
                                  value: torch.Tensor,
                                  cluster_size: int = CLUSTER_SIZE,
                                  overlap: int = OVERLAP,
                                  iters: int = ITERS,
                                  tau: float = TAU,
                                  scale: Optional[float] = None,
                                  impl: Optional[str] = None) -> torch.Tensor:
    """Cluster the queries, then attend inside the clusters (BOAT FSLA core, no projections).

    Args:
        query, key, value (Tensor): ``[B, heads, N, d]`` in raster order.
        cluster_size (int): m. Defaults to 49.
        overlap (int): o. Defaults to 20.
        iters (int): clustering centroid updates. Defaults to 2.
        tau (float): clustering inverse temperature. Defaults to 100.0.
        scale (float, optional): logit scale; None means ``d ** -0.5``. Defaults to None.
        impl (str, optional): ``'auto'``, ``'ext'`` or ``'reference'``. Defaults to None.

    Returns:
        Tensor: ``[B, heads, N, d]`` in raster order.
    """
    perm, _ = balanced_hierarchical_clustering(query, cluster_size, iters, tau, impl=impl)
    return clustered_attention(query, key, value, perm, cluster_size, overlap, scale, impl=impl)


# --- fake kernels and autograd of the compiled ops (torch.compile / opcheck) ---------------


def _register_clustering() -> None:

    @torch.library.register_fake('mmboat::bhc_cluster')
    def _bhc_cluster_fake(x, cluster_size, iters, tau):
        shape = x.shape[:3]
        return (x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.int64))

    register_autocast_kernels('clustering', ['bhc_cluster'])


def _register_attention() -> None:

    @torch.library.register_fake('mmboat::clustered_attention_forward')
    def _forward_fake(query, key, value, perm, cluster_size, overlap, scale):
        return torch.empty_like(query), query.new_empty(query.shape[:3])

    @torch.library.register_fake('mmboat::clustered_attention_backward')
    def _backward_fake(grad_out, query, key, value, perm, out, logsumexp, cluster_size,
                       overlap, scale):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    def _setup_context(ctx, inputs, output):
        query, key, value, perm, cluster_size, overlap, scale = inputs
        out, logsumexp = output
        ctx.save_for_backward(query, key, value, perm, out, logsumexp)
        ctx.config = (cluster_size, overlap, scale)

    def _backward(ctx, grad_out, grad_logsumexp):
        # The log-sum-exp is an internal by-product: its gradient is not propagated.
        query, key, value, perm, out, logsumexp = ctx.saved_tensors
        cluster_size, overlap, scale = ctx.config
        grad_q, grad_k, grad_v = torch.ops.mmboat.clustered_attention_backward(
            grad_out.contiguous(), query, key, value, perm, out, logsumexp, cluster_size,
            overlap, scale)
        return grad_q, grad_k, grad_v, None, None, None, None

    torch.library.register_autograd(
        'mmboat::clustered_attention_forward', _backward, setup_context=_setup_context)
    register_autocast_kernels(_FAMILY, ['clustered_attention_forward'])


register_op_family('clustering', ('bhc_cluster', ), _CLUSTERING_DTYPES, _register_clustering)
register_op_family('clustered_attention',
                   ('clustered_attention_forward', 'clustered_attention_backward'),
                   _ATTENTION_DTYPES, _register_attention)
