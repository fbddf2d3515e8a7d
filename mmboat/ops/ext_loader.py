"""The one dispatcher of mmboat's ops: the compiled extension ``mmboat._ext``, which of its ops
have kernels for which device and dtype, and the choice between them and the pure-PyTorch
references.

The extension registers its ops as ``torch.ops.mmboat.*`` when imported. A missing or broken
extension never fails at import time: :func:`has_ext` is False, the ops fall back to their
pure-PyTorch reference implementations and :func:`warn_fallback` says so once.

Every op family (the NA ops in :mod:`mmboat.ops.neighborhood_attention`, the FSLA ops in
:mod:`mmboat.ops.feature_space_attention`) registers its fake kernels, autograd and autocast
kernels through :func:`register_op_family`, which records once which device types have kernels
(a plain dict lookup at call time, which ``torch.compile`` traces) and the dtypes each takes.
:func:`use_compiled` then decides each call: the ``impl`` request, the kernel for the input's
device, its dtype; a missing kernel warns once per (op, device, dtype) and runs the reference,
or raises for ``impl='ext'``.

The implementation is chosen per call by ``impl`` arguments or globally by the environment
variable ``MMBOAT_OPS_IMPL``: ``auto`` (default; compiled when available), ``ext`` (compiled,
error if missing) or ``reference`` (pure PyTorch).
"""
import importlib
import os
import warnings
from types import ModuleType
from typing import Callable, Dict, Mapping, Optional, Sequence, Set, Tuple, Union

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


# ---------------------------------------------------------------------------------------------
# Kernel registry: which compiled ops have kernels for which device types and dtypes.
# ---------------------------------------------------------------------------------------------
# Dispatch key of each device type with kernels; 'meta' is served by the fake kernels (shape
# propagation, e.g. a model built on the meta device).
DISPATCH_KEYS = {'cpu': 'CPU', 'cuda': 'CUDA', 'meta': 'Meta'}
_REGISTERED_FAMILIES: Set[str] = set()
_KERNELS: Dict[Tuple[str, str], bool] = {}  # (op name, device type) -> has a kernel
_OP_DTYPES: Dict[str, Mapping[str, Sequence[torch.dtype]]] = {}  # op name -> device -> dtypes


def register_op_family(family: str, op_names: Sequence[str],
                       dtypes: Mapping[str, Sequence[torch.dtype]],
                       register: Callable[[], None]) -> bool:
    """Register a family of compiled ops once: ``register()`` adds their fake kernels, autograd
    and autocast kernels; then the device types with kernels and the dtypes each takes are
    recorded for :func:`use_compiled`.

    Never fails at import: without the extension or one of the ops nothing happens, and an
    error in ``register`` warns and leaves the family on the reference.

    Args:
        family (str): A name for messages, e.g. ``'na2d'``.
        op_names (Sequence[str]): The ops ``torch.ops.mmboat.<name>`` of the family.
        dtypes (Mapping[str, Sequence[torch.dtype]]): Device type -> the dtypes the compiled
            kernels take (others run the reference).
        register (Callable[[], None]): Registers the fake kernels, autograd and autocast.

    Returns:
        bool: Whether the family is registered.
    """
    if family in _REGISTERED_FAMILIES:
        return True
    if not has_ext() or not all(hasattr(torch.ops.mmboat, name) for name in op_names):
        return False
    try:
        register()
    except Exception as exc:  # never fail at import; the reference path still works
        warnings.warn(f'mmboat: registering the {family} ops failed ({exc}); they run on the '
                      'pure-PyTorch reference', RuntimeWarning)
        return False
    _REGISTERED_FAMILIES.add(family)
    for name in op_names:
        _OP_DTYPES[name] = dtypes
        for device_type, key in DISPATCH_KEYS.items():
            _KERNELS[(name, device_type)] = torch._C._dispatch_has_kernel_for_dispatch_key(
                f'mmboat::{name}', key)
    return True


def op_available(name: str, device: Union[str, torch.device] = 'cpu') -> bool:
    """Whether the compiled op ``torch.ops.mmboat.<name>`` has a kernel for ``device``
    (``'meta'``: its fake kernel)."""
    return _KERNELS.get((name, torch.device(device).type), False)


def kernel_dtypes(name: str, device_type: str) -> Tuple[torch.dtype, ...]:
    """The dtypes the compiled ``name`` takes on ``device_type`` (empty: no kernel)."""
    if not _KERNELS.get((name, device_type), False):
        return ()
    return tuple(_OP_DTYPES.get(name, {}).get(device_type, ()))


def use_compiled(impl: Optional[str], what: str, name: str, device: torch.device,
                 dtype: torch.dtype) -> bool:
    """Whether a call of ``what`` runs the compiled op ``name`` for inputs on ``device`` of
    ``dtype``: :func:`use_ext`, then a kernel for the device and dtype (else
    :func:`missing_kernel`: the reference after one warning, or an error for ``impl='ext'``)."""
    if not use_ext(impl, what):
        return False
    if dtype in kernel_dtypes(name, device.type):
        return True
    return missing_kernel(impl, what, name, device, dtype)
