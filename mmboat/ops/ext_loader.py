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
from typing import Dict, List, Optional, Sequence, Tuple, Union

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


# The op families of mmboat's backbones: (part, compiled op that carries the choice). NAT/DiNAT
# run the fused neighbourhood attention (na2d_qk/na2d_av, same kernels' build, when training
# with attention dropout); BOAT's feature-space attention clusters, then attends.
OP_FAMILIES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    'neighborhood attention': (('', 'na2d_forward'), ),
    'feature-space attention': (('clustering', 'bhc_cluster'),
                                ('attention', 'clustered_attention_forward')),
}
_logged_ops_impl = set()  # lines already logged by log_ops_impl


def _op_has_kernel(op_name: str, device_type: str) -> bool:
    """Whether the ops' own dispatch finds a compiled kernel of ``op_name`` for the device."""
    if op_name.startswith('na'):
        from .neighborhood_attention import neighborhood_attention_op_available
        return neighborhood_attention_op_available(op_name, device_type)
    key = {'cpu': 'CPU', 'cuda': 'CUDA'}.get(device_type)
    if key is None or not hasattr(torch.ops.mmboat, op_name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f'mmboat::{op_name}', key)


def _op_dtypes(op_name: str) -> Optional[Dict[str, Sequence[torch.dtype]]]:
    """The dtypes the compiled ``op_name`` takes per device type (None: any)."""
    if op_name.startswith('na'):
        from .neighborhood_attention import _KERNEL_DTYPES
        return _KERNEL_DTYPES
    if op_name == 'clustered_attention_forward':
        from .feature_space_attention import _ATTENTION_DTYPES
        return _ATTENTION_DTYPES
    return None


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
        dtypes = _op_dtypes(op_name)
        if not _op_has_kernel(op_name, device_type):
            why = f'mmboat._ext ({build}) has no {device_type.upper()} kernel for {{ops}}'
        elif dtypes is not None and dtype not in dtypes.get(device_type, ()):
            names = '/'.join(str(d).replace('torch.', '') for d in dtypes.get(device_type, ()))
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
