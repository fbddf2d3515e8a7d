"""Argument checks shared by the NA and FSLA ops (the C++ ops check the same for direct
``torch.ops.mmboat`` callers, in ``csrc/pytorch/checks.h``)."""
from typing import Sequence, Tuple

import torch

__all__ = ['FLOAT_DTYPES', 'check_tensor', 'check_int', 'check_same_dtype_device',
           'check_float_tensors']

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(t, name: str, what: str) -> None:
    """``t`` is a tensor, else a TypeError naming the op and the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f'{what}: {name} must be a Tensor, got {type(t).__name__}')


def check_int(value, name: str, what: str, low: int) -> None:
    """``value`` is an int (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{what}: {name} must be an int, got {type(value).__name__}')
    if value < low:
        raise ValueError(f'{what}: {name} must be >= {low}, got {value}')


def check_same_dtype_device(what: str, ref: Tuple[str, torch.Tensor],
                            tensors: Sequence[Tuple[str, torch.Tensor]],
                            check_dtype: bool = True) -> None:
    """Each ``(name, tensor)`` of ``tensors`` has the dtype (unless ``check_dtype`` is False)
    and the device of ``ref = (name, tensor)``, else a TypeError / ValueError naming both."""
    ref_name, r = ref
    for name, t in tensors:
        if check_dtype and t.dtype != r.dtype:
            raise TypeError(f'{what}: {ref_name} and {name} dtypes differ: {r.dtype} vs '
                            f'{t.dtype} (they must have the same dtype)')
        if t.device != r.device:
            raise ValueError(f'{what}: {ref_name} is on {r.device}, {name} on {t.device} (they '
                             'must be on the same device)')


def check_float_tensors(what: str, dims: int, layout: str,
                        tensors: Sequence[tuple]) -> None:
    """``(name, tensor)`` pairs: tensors of ``dims`` dimensions (``layout`` names them), of one
    floating dtype of :data:`FLOAT_DTYPES` and on one device, with a non-empty last axis."""
    for name, t in tensors:
        check_tensor(t, name, what)
        if t.dim() != dims:
            raise ValueError(f'{what}: {name} must be {layout} ({dims} dims), got shape '
                             f'{tuple(t.shape)}')
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f'{what}: {name} must be a floating tensor '
                            f'({", ".join(str(d) for d in FLOAT_DTYPES)}), got {t.dtype}')
        check_same_dtype_device(what, tensors[0], [(name, t)])
        if t.shape[-1] == 0:
            raise ValueError(f'{what}: {name} has an empty last axis, shape {tuple(t.shape)}')
