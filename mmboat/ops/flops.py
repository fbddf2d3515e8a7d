"""FLOP counting of mmboat's ops for mmengine's analyzers: handles, traced ops, registration.

mmengine's :class:`~mmengine.analysis.FlopAnalyzer` (and ``get_model_complexity_info``, which the
downstream ``get_flops.py`` tools use) traces the model with ``torch.jit`` and counts only the ops
it has a handle for; any other op counts as 0. This module is the one place that knows how much
arithmetic mmboat's ops do:

* :data:`FLOP_HANDLES`: a handle for every ``mmboat::`` op a trace can hold, plus
  ``aten::scaled_dot_product_attention`` (the window and stripe attention of BOAT-Swin and
  BOAT-CSWin), which mmengine does not count either.
* :func:`register_flop_handles` adds them to mmengine's default tables, so every analyzer created
  afterwards counts them. It is called at one point: ``import mmboat.models`` (which every mmboat
  config's ``custom_imports`` names); ``tools/analysis_tools/get_flops.py`` calls it as well.
* :func:`traced_na2d`, :func:`traced_clustering`, :func:`traced_clustered_attention`: one opaque
  ``mmboat::*_traced`` op each, that the layers / ops call instead of the pure-PyTorch path while
  ``torch.jit`` traces, so the trace holds one node this module counts, whichever implementation
  runs inside. The compiled ``na*d`` ops cannot be traced (``torch.jit`` rejects their ``bool[]``
  argument); the compiled FSLA ops are traced as themselves.

This lives in ``mmboat.ops`` because the traced ops are op definitions wrapping ``mmboat.ops``
functions and the handles read those ops' schemas; mmengine is imported only by
:func:`register_flop_handles`.

Counting convention (mmengine's and fvcore's): one FLOP is one multiply-add (MAC) of the
operation's dot products and weighted sums, as mmengine counts ``linear``, ``matmul`` and
``conv``; softmax, scaling, masking, bias additions and index work are not counted.

* Neighborhood attention (``docs/neighborhood_attention.md#cost-model``): logits ``q.k`` and the
  weighted sum each take ``B * heads * prod(spatial) * prod(kernel) * head_dim``; the fused op
  counts both. Causal windows are counted as full windows (an upper bound).
* Dense attention (``scaled_dot_product_attention``): ``prod(out.shape[:-1]) * S * (E + Ev)``
  for S keys, query/key width E and value width Ev; masked keys (window / stripe padding, causal)
  are counted, as the op computes them.
* Clustered attention (``docs/feature_space_attention.md``): leaf ``i`` of the layout
  (:func:`~mmboat.ops.cluster_layout`) has ``s_i`` queries and ``s_i + min(o, s_sibling)`` keys
  (no sibling, hence no overlap, when there is a single leaf); it costs
  ``s_i * keys_i * (d + d_v)`` per sample and head.
* Balanced hierarchical clustering (same page, Clustering): at each of the ``L`` levels every token
  takes ``d`` for its squared norm (the cosines), ``2d`` for its two cosines and ``2d`` for its
  weighted share of the two centroids in each of the ``iters`` soft-assignment updates, and ``2d``
  for the final cosines of its score: ``(4 * iters + 3) * d`` per token and level, so
  ``B * heads * L * N * (4 * iters + 3) * d``. The initial centroids (sums of the two parts:
  additions only), the centroid normalisations (per group, not per token), the two-way softmax,
  the scores and the sort are not counted. At 56 x 56, C = 96, 3 heads, m = 49 this is 19.9 M,
  the "~20 M" of ``docs/feature_space_attention.md#cost-model``.
"""
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    'FLOP_HANDLES', 'register_flop_handles', 'na_fused_flop_jit', 'na_qk_flop_jit',
    'na_av_flop_jit', 'sdpa_flop_jit', 'clustering_flop_jit', 'clustered_attention_flop_jit',
    'traced_na2d', 'traced_clustering', 'traced_clustered_attention'
]

Handle = Callable[[List[Any], List[Any]], int]


def _shape(value: Any) -> List[int]:
    if not value.isCompleteTensor():
        raise ValueError(f'cannot count FLOPs: the traced tensor {value.debugName()} has no '
                         'shape (trace the model with example inputs)')
    return value.type().sizes()


def _int(value: Any) -> int:
    """An ``int`` argument of a traced node (a constant)."""
    constant = value.toIValue()
    if not isinstance(constant, int):
        raise ValueError(f'cannot count FLOPs: expected a constant int argument, got a traced '
                         f'{value.node().kind()} node')
    return constant


def _int_list(value: Any) -> List[int]:
    """An ``int[]`` argument of a traced node (a constant or a ``prim::ListConstruct``)."""
    constant = value.toIValue()
    if constant is not None:
        return [constant] if isinstance(constant, int) else list(constant)
    node = value.node()
    if node.kind() != 'prim::ListConstruct':
        raise ValueError(f'cannot count FLOPs: cannot read an int list from a traced '
                         f'{node.kind()} node')
    return [item.toIValue() for item in node.inputs()]


def _prod(values) -> int:
    result = 1
    for v in values:
        result *= int(v)
    return result


# --- handles (``handle(inputs, outputs) -> MACs``, mmengine's signature) --------------------


def na_fused_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Fused NA ``(query, key, value, rpb, kernel_size, ...)``: ``2 * B*heads*N*K*D``."""
    query_shape = _shape(inputs[0])
    kernel_size = _int_list(inputs[4])
    if len(kernel_size) == 1:
        kernel_size = kernel_size * (len(query_shape) - 3)
    return 2 * _prod(query_shape) * _prod(kernel_size)


def na_qk_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Unfused logits ``(query, key, ...) -> attn [B, heads, H, W, K]``: ``numel(attn) * D``."""
    return _prod(_shape(outputs[0])) * int(_shape(inputs[0])[-1])


def na_av_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Unfused weighted sum ``(attn [B, heads, H, W, K], value, ...)``: ``numel(attn) * D``."""
    return _prod(_shape(inputs[0])) * int(_shape(inputs[1])[-1])


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q [..., L, E], k [..., S, E], v [..., S, Ev])``:
    ``prod(out.shape[:-1]) * S * (E + Ev)`` (logits and weighted sum, masked keys included)."""
    out_shape = _shape(outputs[0])
    keys = int(_shape(inputs[1])[-2])
    return _prod(out_shape[:-1]) * keys * (int(_shape(inputs[0])[-1]) + int(out_shape[-1]))


def clustering_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Clustering ``(x [B, heads, N, d], cluster_size, iters, tau)``:
    ``B*heads * L * N * (4*iters + 3) * d`` (see the module docstring)."""
    from .feature_space_attention_reference import cluster_levels

    batch, heads, num_tokens, dim = _shape(inputs[0])
    levels = cluster_levels(num_tokens, _int(inputs[1]))
    return batch * heads * levels * num_tokens * (4 * _int(inputs[2]) + 3) * dim


def clustered_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Clustered attention ``(q, k, v [B, heads, N, d], perm, cluster_size, overlap, scale)``:
    ``B*heads * sum_i s_i * (s_i + overlap_i) * (d + d_v)`` over the leaves."""
    from .feature_space_attention_reference import cluster_layout

    batch, heads, num_tokens, dim = _shape(inputs[0])
    dim_v = int(_shape(inputs[2])[-1])
    levels, sizes = cluster_layout(num_tokens, _int(inputs[4]))
    overlap = _int(inputs[5])
    # Sibling of leaf i is leaf i ^ 1; a single leaf (no level) has none.
    keys = [s + min(overlap, sizes[i ^ 1]) for i, s in enumerate(sizes)] if levels else sizes
    return batch * heads * sum(s * k for s, k in zip(sizes, keys)) * (dim + dim_v)


FLOP_HANDLES: Dict[str, Handle] = {
    'mmboat::na1d_forward': na_fused_flop_jit,
    'mmboat::na2d_forward': na_fused_flop_jit,
    'mmboat::na3d_forward': na_fused_flop_jit,
    'mmboat::na2d_traced': na_fused_flop_jit,
    'mmboat::na2d_qk': na_qk_flop_jit,
    'mmboat::na2d_av': na_av_flop_jit,
    'mmboat::bhc_cluster': clustering_flop_jit,
    'mmboat::bhc_cluster_traced': clustering_flop_jit,
    'mmboat::clustered_attention_forward': clustered_attention_flop_jit,
    'mmboat::clustered_attention_traced': clustered_attention_flop_jit,
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
}

# Ops whose output is a feature map (mmengine's activation count); the clustering returns indices.
_ACTIVATION_OPS = tuple(name for name in FLOP_HANDLES if 'bhc_cluster' not in name)


def register_flop_handles() -> bool:
    """Add :data:`FLOP_HANDLES` to mmengine's default FLOP (and activation) tables.

    Idempotent; a handle mmengine itself already has for an ``aten::`` op is kept. Analyzers
    created before the call are not affected (use ``analyzer.set_op_handle(**FLOP_HANDLES)``).

    Returns:
        bool: False when ``mmengine.analysis`` is not importable.
    """
    try:
        from mmengine.analysis import complexity_analysis
        from mmengine.analysis.jit_handles import generic_activation_jit
    except ImportError:  # mmengine without the analysis package (or its deps)
        return False
    flop_ops = complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS
    for name, handle in FLOP_HANDLES.items():
        if name.startswith('mmboat::') or name not in flop_ops:
            flop_ops[name] = handle
    for name in _ACTIVATION_OPS:
        complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS.setdefault(name, generic_activation_jit())
    return True


# --- traced ops: one counted node while torch.jit traces --------------------------------------


@functools.lru_cache(None)
def _na2d_traced_op():
    from .neighborhood_attention import na2d

    @torch.library.custom_op('mmboat::na2d_traced', mutates_args=())
    def na2d_traced(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor],
                    kernel_size: List[int], dilation: List[int], scale: float,
                    impl: Optional[str]) -> Tensor:
        return na2d(query, key, value, rpb, kernel_size=tuple(kernel_size),
                    dilation=tuple(dilation), scale=scale, impl=impl)

    @na2d_traced.register_fake
    def _(query, key, value, rpb, kernel_size, dilation, scale, impl):
        return torch.empty_like(query)

    return na2d_traced


@functools.lru_cache(None)
def _clustering_traced_op():
    from .feature_space_attention_reference import balanced_hierarchical_clustering_reference

    @torch.library.custom_op('mmboat::bhc_cluster_traced', mutates_args=())
    def bhc_cluster_traced(x: Tensor, cluster_size: int, iters: int,
                           tau: float) -> Tuple[Tensor, Tensor]:
        return balanced_hierarchical_clustering_reference(x, cluster_size, iters, tau)

    @bhc_cluster_traced.register_fake
    def _(x, cluster_size, iters, tau):
        shape = x.shape[:3]
        return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.int64)

    return bhc_cluster_traced


@functools.lru_cache(None)
def _clustered_attention_traced_op():
    from .feature_space_attention_reference import clustered_attention_reference

    @torch.library.custom_op('mmboat::clustered_attention_traced', mutates_args=())
    def clustered_attention_traced(query: Tensor, key: Tensor, value: Tensor, perm: Tensor,
                                   cluster_size: int, overlap: int, scale: float) -> Tensor:
        return clustered_attention_reference(query, key, value, perm, cluster_size, overlap,
                                             scale)

    @clustered_attention_traced.register_fake
    def _(query, key, value, perm, cluster_size, overlap, scale):
        return query.new_empty(query.shape[:3] + value.shape[-1:])

    return clustered_attention_traced


def traced_na2d(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor],
                kernel_size: int, dilation: int, scale: float, impl: Optional[str]) -> Tensor:
    """:func:`mmboat.ops.na2d` as the single op ``mmboat::na2d_traced`` (for ``torch.jit``)."""
    return _na2d_traced_op()(query, key, value, rpb, [kernel_size] * 2, [dilation] * 2, scale,
                             impl)


def traced_clustering(x: Tensor, cluster_size: int, iters: int,
                      tau: float) -> Tuple[Tensor, Tensor]:
    """The reference clustering as the single op ``mmboat::bhc_cluster_traced``."""
    return _clustering_traced_op()(x, cluster_size, iters, tau)


def traced_clustered_attention(query: Tensor, key: Tensor, value: Tensor, perm: Tensor,
                               cluster_size: int, overlap: int, scale: float) -> Tensor:
    """The reference clustered attention as the single op ``mmboat::clustered_attention_traced``.
    """
    return _clustered_attention_traced_op()(query, key, value, perm, cluster_size, overlap,
                                            scale)
