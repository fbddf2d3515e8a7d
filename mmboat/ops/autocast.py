"""Autocast (mixed precision) behaviour of the mmboat ops, in one place.

Under ``torch.autocast`` for the inputs' device type (``cpu`` or ``cuda``):

* **Neighborhood attention** (fused ``na1d/na2d/na3d`` and unfused ``na2d_qk/na2d_av``): the
  floating inputs (query, key, value, attention weights) *and* the positional bias ``rpb`` are
  cast to the autocast dtype (float16 / bfloat16), the compute dtype. The kernels (and the
  pure-PyTorch reference) accumulate in float32 and keep the log-sum-exp in float32; the output
  is in the compute dtype.
* **Clustered attention** (``clustered_attention``): inputs are cast to float32, like the ops on
  torch's own float32 autocast list. BOAT's released models use large logit scales whose
  logits overflow float16, and the CPU kernels are float32/float64 only.
* **Clustering** (``balanced_hierarchical_clustering``): computed in float32 from any floating
  input, with no gradient, autocast or not (under autocast its input is cast to float32 and its
  cosines are not re-cast to the autocast dtype); the output is int64.

As with torch's autocast, float64 tensors are never cast. The casts are ordinary
differentiable ``Tensor.to`` calls, so every input receives its gradient in its own dtype: a
float32 ``rpb`` parameter stays float32 and gets a float32 gradient.

The policy is applied twice from this module, so that it holds on every path:

* by the Python entry points (:mod:`mmboat.ops.neighborhood_attention`,
  :mod:`mmboat.ops.feature_space_attention`) before they choose between the compiled op and the
  reference, which then run with autocast disabled (the reference computes in float32 itself);
  ``torch.compile`` traces these casts;
* as ``AutocastCPU`` / ``AutocastCUDA`` dispatcher kernels of the compiled forward ops, for
  direct ``torch.ops.mmboat.*`` callers (:func:`register_autocast_kernels`).
"""
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    'autocast_dtype', 'compute_dtype', 'cast_inputs', 'call_with_policy',
    'register_autocast_kernels'
]

# Ops families and the dtype they compute in under autocast: None means "the autocast dtype".
_POLICY = {
    'neighborhood_attention': None,
    'clustered_attention': torch.float32,
    'clustering': torch.float32,
}
_AUTOCAST_KEYS = {'cpu': 'AutocastCPU', 'cuda': 'AutocastCUDA'}


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    if device.type not in _AUTOCAST_KEYS or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def compute_dtype(family: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype an op ``family`` computes in on ``device`` under the active autocast, or None
    when autocast is off (the inputs' own dtype is used)."""
    amp = autocast_dtype(device)
    return None if amp is None else _policy_dtype(family, amp)


def _policy_dtype(family: str, amp: torch.dtype) -> torch.dtype:
    policy = _POLICY[family]
    return amp if policy is None else policy


def cast_inputs(dtype: Optional[torch.dtype], *args) -> Tuple:
    """Cast the floating, non-float64 tensors among ``args`` to ``dtype`` (differentiably);
    everything else (None, ints, lists, int64 index tensors, float64) passes unchanged."""
    if dtype is None:
        return args
    return tuple(
        a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point()
        and a.dtype not in (dtype, torch.float64) else a for a in args)


def first_device(*args) -> Optional[torch.device]:
    """Device of the first tensor among ``args`` (None when there is none)."""
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    return None


# Keeps the Library objects (and so the registrations) alive.
_LIBRARIES = []


def _autocast_kernel(op: Callable, family: str, device_type: str) -> Callable:
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey,
                                               _AUTOCAST_KEYS[device_type]))

    def kernel(keyset, *args):
        # Reached only with autocast on (torch.is_autocast_enabled reads False in here, as the
        # dispatcher is inside the Autocast key); its dtype is still the active one.
        dtype = _policy_dtype(family, torch.get_autocast_dtype(device_type))
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*cast_inputs(dtype, *args))

    return kernel


def register_autocast_kernels(family: str, op_names) -> None:
    """Register the ``family``'s autocast policy as the AutocastCPU/AutocastCUDA kernels of the
    compiled ops ``torch.ops.mmboat.<name>`` (forward ops only: the backward ops see tensors that
    the forward already cast)."""
    lib = torch.library.Library('mmboat', 'IMPL')
    for name in op_names:
        op = getattr(torch.ops.mmboat, name).default
        for device_type, key in _AUTOCAST_KEYS.items():
            lib.impl(name, _autocast_kernel(op, family, device_type), key, with_keyset=True)
    _LIBRARIES.append(lib)


def call_with_policy(family: str, fn: Callable, *args):
    """``fn(*args)`` under the autocast policy of ``family``: with autocast on for the device of
    the first tensor argument, the floating tensor arguments are cast to the family's compute
    dtype and ``fn`` runs with autocast disabled (so neither the compiled ops nor the reference
    re-cast anything inside); otherwise a plain call."""
    device = first_device(*args)
    dtype = None if device is None else compute_dtype(family, device)
    if dtype is None:
        return fn(*args)
    with torch.autocast(device.type, enabled=False):
        return fn(*cast_inputs(dtype, *args))
