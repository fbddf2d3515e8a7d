"""Loading of the compiled extension ``mmboat._ext`` and the choice of implementation.

The extension registers its ops as ``torch.ops.mmboat.*`` when imported. A missing or broken
extension never fails at import time: :func:`has_ext` is False, the ops fall back to their
pure-PyTorch reference implementations and :func:`warn_fallback` says so once.

The implementation is chosen per call by ``impl`` arguments or globally by the environment
variable ``MMBOAT_OPS_IMPL``: ``auto`` (default; compiled when available), ``ext`` (compiled,
error if missing) or ``reference`` (pure PyTorch).
"""
import importlib
import os
import warnings
from types import ModuleType
from typing import Dict, Optional

import torch

_IMPLS = ('auto', 'ext', 'reference')
_state: Dict[str, object] = {'loaded': None, 'error': None, 'module': None, 'warned': False}
_warned_missing_kernel = set()  # (op name, device type, dtype) already warned about


def _load() -> bool:
    if _state['loaded'] is None:
        try:
            _state['module'] = importlib.import_module('mmboat._ext')
            _state['loaded'] = True
        except Exception as exc:  # ImportError, OSError (ABI / missing libs)
            _state['loaded'] = False
            _state['error'] = f'{type(exc).__name__}: {exc}'
    return bool(_state['loaded'])


def has_ext() -> bool:
    """Whether ``mmboat._ext`` loaded and registered its ops."""
    return _load()


def ext_module() -> Optional[ModuleType]:
    """The loaded ``mmboat._ext`` module (None when it did not load)."""
    return _state['module'] if _load() else None  # type: ignore[return-value]


def ext_error() -> Optional[str]:
    """Why the extension did not load (None when it did)."""
    _load()
    return _state['error']  # type: ignore[return-value]


def ext_info() -> Dict[str, object]:
    """Describe the compiled extension: loaded or not, CUDA or not, arch list, torch versions."""
    info: Dict[str, object] = {
        'loaded': has_ext(),
        'error': ext_error(),
        'path': None,
        'with_cuda': False,
        'openmp': False,
        'cuda_arch_list': None,
        'torch_compiled': None,
        'torch_runtime': torch.__version__,
    }
    if info['loaded']:
        module = _state['module']
        info['path'] = getattr(module, '__file__', None)
        fields = dict(item.split('=', 1) for item in torch.ops.mmboat.ext_info().split(';'))
        info['with_cuda'] = fields.get('cuda') == '1'
        info['openmp'] = fields.get('openmp') == '1'
        info['cuda_arch_list'] = fields.get('archs') or None
        info['torch_compiled'] = fields.get('torch')
    return info


def requested_impl(impl: Optional[str] = None) -> str:
    """Normalise an ``impl`` argument (None reads ``MMBOAT_OPS_IMPL``)."""
    value = (impl or os.environ.get('MMBOAT_OPS_IMPL', 'auto')).lower()
    if value not in _IMPLS:
        raise ValueError(f'impl must be one of {_IMPLS}, got {value!r} '
                         '(from the impl argument or MMBOAT_OPS_IMPL)')
    return value


def warn_fallback(what: str) -> None:
    """Warn once per process that ``what`` runs on the pure-PyTorch reference."""
    if not _state['warned']:
        _state['warned'] = True
        warnings.warn(
            f'mmboat._ext is not available ({ext_error()}); {what} and the other mmboat ops run '
            'on their pure-PyTorch reference implementations, which are correct but slower. '
            'Rebuild with `pip install --no-build-isolation -e .` to get the compiled ops.',
            RuntimeWarning, stacklevel=3)


def use_ext(impl: Optional[str], what: str) -> bool:
    """Decide whether an op call runs on the compiled extension.

    Args:
        impl: ``'auto'``, ``'ext'``, ``'reference'`` or None (environment default).
        what: op name for messages.
    """
    impl = requested_impl(impl)
    if impl == 'reference':
        return False
    if has_ext():
        return True
    if impl == 'ext':
        raise RuntimeError(f'{what}: impl="ext" was requested but mmboat._ext is not available '
                           f'({ext_error()})')
    warn_fallback(what)
    return False


def missing_kernel(impl: Optional[str], what: str, op_name: str, device: torch.device,
                   dtype: torch.dtype) -> bool:
    """The extension loaded but has no kernel of ``mmboat::<op_name>`` for this device and dtype
    (e.g. a CPU-only build given CUDA tensors): raise for ``impl='ext'``, else warn once per
    (op, device type, dtype) that the pure-PyTorch reference runs instead. Returns False (the
    call does not run the compiled op)."""
    msg = (f'{what}: mmboat._ext has no {device.type.upper()} kernel for mmboat::{op_name} '
           f'with {dtype}; ')
    if requested_impl(impl) == 'ext':
        raise RuntimeError(msg + 'rebuild mmboat._ext with it or use impl="reference"')
    if (op_name, device.type, dtype) not in _warned_missing_kernel:
        _warned_missing_kernel.add((op_name, device.type, dtype))
        warnings.warn(msg + 'falling back to the pure-PyTorch reference (correct, slower; '
                      'it runs on the same device). Build mmboat._ext for this device '
                      '(`pip install --no-build-isolation -e .` on a machine with its toolkit) '
                      'to get the compiled kernels.', RuntimeWarning, stacklevel=4)
    return False
