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
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

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


# The op families of mmboat's backbones: (part, compiled op that carries the choice). NAT/DiNAT
# run the fused neighbourhood attention (na2d_qk/na2d_av, same kernels' build, when training
# with attention dropout); BOAT's feature-space attention clusters, then attends.
OP_FAMILIES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    'neighborhood attention': (('', 'na2d_forward'), ),
    'feature-space attention': (('clustering', 'bhc_cluster'),
                                ('attention', 'clustered_attention_forward')),
}
_logged_ops_impl = set()  # lines already logged by log_ops_impl
# The families are registered by importing mmboat.ops (its __init__ imports both op modules),
# which runs before any code can call the functions below.


def _impl_source(impl: Optional[str]) -> str:
    """Where the requested implementation comes from, for messages."""
    requested_impl(impl)  # a bad value stops here, naming the choices
    if impl is not None:
        return f'impl={impl!r} (model argument)'
    if 'MMBOAT_OPS_IMPL' in os.environ:
        return f'MMBOAT_OPS_IMPL={os.environ["MMBOAT_OPS_IMPL"]}'
    return "impl 'auto' (MMBOAT_OPS_IMPL unset)"


def _impl_choice(op_name: str, impl: Optional[str], device_type: str,
                 dtype: torch.dtype) -> Tuple[str, str]:
    """(implementation, why) for :func:`ops_impl_choice`; ``{ops}`` in ``why`` stands for the
    op, so that :func:`describe_ops_impl` can name several ops with one reason."""
    request = requested_impl(impl)
    reference = f'pure-PyTorch reference ({device_type})'
    if request == 'reference':
        return reference, 'the reference is forced'
    if not has_ext():
        why = f'mmboat._ext did not load ({ext_error()})'
    else:
        info = ext_info()
        build = (f"built with CUDA for {info['cuda_arch_list'] or 'the default archs'}"
                 if info['with_cuda'] else 'a CPU-only build')
        dtypes = kernel_dtypes(op_name, device_type)
        if not op_available(op_name, device_type):
            why = f'mmboat._ext ({build}) has no {device_type.upper()} kernel for {{ops}}'
        elif dtype not in dtypes:
            names = '/'.join(str(d).replace('torch.', '') for d in dtypes)
            why = (f'the {device_type.upper()} kernels of {{ops}} take {names}, not '
                   f"{str(dtype).replace('torch.', '')}")
        else:
            return (f'compiled {device_type.upper()} kernels (mmboat._ext)',
                    f'mmboat._ext ({build}) has {device_type.upper()} kernels for {{ops}}')
    if request == 'ext':
        return 'error at the first call', f'the compiled op is required, but {why}'
    return reference, why


def ops_impl_choice(op_name: str,
                    impl: Optional[str] = None,
                    device: Union[str, torch.device] = 'cpu',
                    dtype: Optional[torch.dtype] = None) -> Tuple[str, str]:
    """Which implementation a call of the compiled op ``op_name`` takes, and why.

    It follows the ops' dispatch (:func:`use_ext`, then the kernel and dtype checks of
    :mod:`mmboat.ops.neighborhood_attention` / :mod:`mmboat.ops.feature_space_attention`).

    Args:
        op_name (str): The compiled op, e.g. ``'na2d_forward'``.
        impl (str, optional): The ``impl`` argument of the layers (None reads
            ``MMBOAT_OPS_IMPL``). Defaults to None.
        device (str | torch.device): Where the op runs. Defaults to ``'cpu'``.
        dtype (torch.dtype, optional): The inputs' dtype (None: the default dtype).
            Defaults to None.

    Returns:
        tuple[str, str]: The implementation (``'compiled CPU kernels (mmboat._ext)'``,
        ``'pure-PyTorch reference (cpu)'`` or ``'error at the first call'``) and the reason.
    """
    source = _impl_source(impl)
    choice, why = _impl_choice(op_name, impl, torch.device(device).type,
                               dtype or torch.get_default_dtype())
    return choice, f'{source}: ' + why.format(ops=f'mmboat::{op_name}')


def describe_ops_impl(families: Optional[Sequence[str]] = None,
                      impl: Optional[str] = None,
                      device: Optional[Union[str, torch.device]] = None,
                      dtype: Optional[torch.dtype] = None) -> str:
    """One line saying which implementation each mmboat op family runs on, and why.

    Args:
        families (Sequence[str], optional): Keys of :data:`OP_FAMILIES` (None: all).
            Defaults to None.
        impl (str, optional): As for :func:`ops_impl_choice`. Defaults to None.
        device (str | torch.device, optional): Where the model runs (None: mmengine's
            ``get_device()``, i.e. CUDA when available). Defaults to None.
        dtype (torch.dtype, optional): The inputs' dtype (None: the default dtype).
            Defaults to None.

    Returns:
        str: e.g. ``"mmboat ops (cpu, float32): neighborhood attention -> compiled CPU kernels
        (mmboat._ext); reason: impl 'auto' (MMBOAT_OPS_IMPL unset): mmboat._ext (a CPU-only
        build) has CPU kernels for mmboat::na2d_forward"``.
    """
    if device is None:
        from mmengine.device import get_device
        device = get_device()
    device_type = torch.device(device).type
    dtype = dtype or torch.get_default_dtype()
    families = list(OP_FAMILIES) if families is None else list(families)
    unknown = [f for f in families if f not in OP_FAMILIES]
    if unknown:
        raise ValueError(f'unknown mmboat op families {unknown}; known: {list(OP_FAMILIES)}')
    parts = []
    reasons: Dict[str, List[str]] = {}  # why -> the ops it is about
    for family in families:
        choices = [(part, op, *_impl_choice(op, impl, device_type, dtype))
                   for part, op in OP_FAMILIES[family]]
        if len({choice for _, _, choice, _ in choices}) == 1:
            parts.append(f'{family} -> {choices[0][2]}')
        else:
            parts.append(f'{family} -> ' + ', '.join(f'{part}: {choice}'
                                                     for part, _, choice, _ in choices))
        for _, op, _, why in choices:
            reasons.setdefault(why, []).append(f'mmboat::{op}')
    why = '; '.join(w.format(ops=', '.join(ops)) for w, ops in reasons.items())
    return (f"mmboat ops ({device_type}, {str(dtype).replace('torch.', '')}): " +
            '; '.join(parts) + f'; reason: {_impl_source(impl)}: {why}')


def log_ops_impl(families: Optional[Sequence[str]] = None, impl: Optional[str] = None) -> str:
    """Log :func:`describe_ops_impl` through mmengine's current logger, once per process per
    distinct line (the backbones call it when they are built). Returns the line."""
    line = describe_ops_impl(families, impl)
    if line not in _logged_ops_impl:
        _logged_ops_impl.add(line)
        from mmengine.logging import print_log
        print_log(line, logger='current')
    return line
