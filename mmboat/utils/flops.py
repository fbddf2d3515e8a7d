"""FLOP (multiply-add) counting of mmboat's custom ops for mmengine's analyzers.

mmengine's :class:`~mmengine.analysis.FlopAnalyzer` (and ``get_model_complexity_info``, which the
downstream ``get_flops.py`` tools use) traces the model with ``torch.jit`` and counts only the ops
it has a handle for; a custom op counts as 0. :func:`register_flop_handles` adds handles for the
``mmboat::`` neighborhood-attention ops to mmengine's default tables, so every analyzer created
afterwards counts them. ``import mmboat.models`` calls it.

Cost model (``spec/neighborhood_attention.md`` section 7, one multiply-add = one FLOP as in
mmengine): the logits and the weighted sum each take ``B * heads * prod(spatial) * prod(kernel)
* head_dim`` multiply-adds; the fused op counts both. Causal windows are counted as full windows
(an upper bound). Softmax is not counted, as mmengine does not count it for dense attention
either.

Traced op names:

* ``mmboat::na2d_traced``: the op :class:`~mmboat.models.layers.NeighborhoodAttention2d` records
  while being traced (it runs the compiled op or the pure-PyTorch fallback inside), so the
  analyzer sees one node.
* ``mmboat::na{1,2,3}d_forward``, ``mmboat::na2d_qk``, ``mmboat::na2d_av``: the compiled ops, for
  direct callers. Note: ``torch.jit`` currently refuses to trace them (their ``bool[] is_causal``
  argument), so only graphs produced otherwise reach these handles.
"""
from typing import Any, Callable, Dict, List, Optional

__all__ = ['register_flop_handles', 'FLOP_HANDLES', 'na_fused_flop_jit', 'na_qk_flop_jit',
           'na_av_flop_jit']


def _shape(value: Any) -> Optional[List[int]]:
    return value.type().sizes() if value.isCompleteTensor() else None


def _int_list(value: Any) -> List[int]:
    """An ``int[]`` argument of a traced node (a constant or a ``prim::ListConstruct``)."""
    constant = value.toIValue()
    if constant is not None:
        return [constant] if isinstance(constant, int) else list(constant)
    node = value.node()
    if node.kind() != 'prim::ListConstruct':
        raise ValueError(f'cannot read an int list from a traced {node.kind()} node')
    return [item.toIValue() for item in node.inputs()]


def _prod(values) -> int:
    result = 1
    for v in values:
        result *= int(v)
    return result


def na_fused_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Fused NA ``(query, key, value, rpb, kernel_size, ...)``: ``2 * B*heads*N*K*D``."""
    query_shape = _shape(inputs[0])
    kernel_size = _int_list(inputs[4])
    if len(kernel_size) == 1:
        kernel_size = kernel_size * (len(query_shape) - 3)
    return 2 * _prod(query_shape) * _prod(kernel_size)


def na_qk_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Unfused logits ``(query, key, ...) -> attn [B, heads, H, W, K]``: ``numel(attn) * D``."""
    query_shape = _shape(inputs[0])
    return _prod(_shape(outputs[0])) * int(query_shape[-1])


def na_av_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Unfused weighted sum ``(attn [B, heads, H, W, K], value, ...)``: ``numel(attn) * D``."""
    return _prod(_shape(inputs[0])) * int(_shape(inputs[1])[-1])


FLOP_HANDLES: Dict[str, Callable[[List[Any], List[Any]], int]] = {
    'mmboat::na1d_forward': na_fused_flop_jit,
    'mmboat::na2d_forward': na_fused_flop_jit,
    'mmboat::na3d_forward': na_fused_flop_jit,
    'mmboat::na2d_traced': na_fused_flop_jit,
    'mmboat::na2d_qk': na_qk_flop_jit,
    'mmboat::na2d_av': na_av_flop_jit,
}


def register_flop_handles() -> bool:
    """Add the ``mmboat::`` handles to mmengine's default FLOP and activation tables.

    Idempotent. Analyzers created before the call are not affected (pass the handles with
    ``analyzer.set_op_handle(**FLOP_HANDLES)`` there).

    Returns:
        bool: False when ``mmengine.analysis`` is not importable.
    """
    try:
        from mmengine.analysis import complexity_analysis
        from mmengine.analysis.jit_handles import generic_activation_jit
    except ImportError:  # mmengine without the analysis package (or its deps)
        return False
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.update(FLOP_HANDLES)
    for name in FLOP_HANDLES:
        complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS.setdefault(name, generic_activation_jit())
    return True
