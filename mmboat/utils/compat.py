"""The one place where mmboat works around known breakages of its stack on current torch.

Each fix is idempotent, narrowly targeted, and documented here (and in README "Known stack
issues"). :func:`apply_stack_fixes` applies all of them; mmboat's tools and test-suite call it
before importing mmdet/mmseg/mmpretrain models. Outside mmboat's tools, with no extra call:

* fix 1 must run before torchvision is first imported: ``tools/setup_env.sh`` installs a
  ``.pth`` start-up hook (:mod:`mmboat._startup`; ``python -m mmboat._startup`` installs it in
  another environment) that applies it right before that import;
* fix 2 runs when ``mmboat.models`` is imported (what configs' ``custom_imports`` do).

1. **torchvision on a CPU-only torch** (:func:`fix_torchvision_import`). The reachable
   torchvision 0.28 wheels are CUDA builds; their ``_C`` extension cannot load next to a CPU torch,
   and ``import torchvision`` then fails with "operator torchvision::nms does not exist" (its fake
   kernel registration does not check that the ops loaded). mmpretrain imports torchvision, and
   mmdet/mmseg import mmpretrain, so ``import mmdet.models`` breaks too. Fix: when torchvision's
   ``_C`` cannot be loaded, define the ``torchvision::nms``/``qnms`` schemas (no kernel) so the
   import completes; torchvision's own ops still report that they are unavailable when called.
   OpenMMLab models use mmcv's ops, which are built from source with their CPU kernels.
2. **torch >= 2.6 ``weights_only`` loading** (:func:`fix_checkpoint_loading`). mmengine 0.10.7
   calls ``torch.load`` with the default ``weights_only=True``; its own training checkpoints carry
   a message hub (``HistoryBuffer``, numpy arrays and scalars) and fail to load for resume/test,
   and timm's checkpoints (the official BOAT-CSWin release) carry an ``argparse.Namespace``.
   Fix: allow-list exactly those types with ``torch.serialization.add_safe_globals``
   (loading stays weights-only: no arbitrary pickle is executed).
3. **mmengine's launcher on CPU** (:func:`fix_cpu_distributed_launch`). mmengine 0.10.7's
   ``_init_dist_pytorch`` calls ``torch.cuda.set_device`` unconditionally and configs default to
   the ``nccl`` backend, so ``--launcher pytorch`` fails without a GPU. Fix: without CUDA, skip
   the device call and use ``gloo``.
4. **OpenMP oversubscription** (:func:`limit_cpu_threads`). On a small shared CPU, torch's
   default intra-op threads times data-loader workers times processes oversubscribes the cores
   and makes CPU training 3-50x slower. Fix: one explicit thread budget per process.
"""
import argparse
import functools
import os
from typing import Optional

import torch

__all__ = [
    'apply_stack_fixes', 'fix_torchvision_import', 'fix_checkpoint_loading',
    'fix_cpu_distributed_launch', 'limit_cpu_threads'
]


@functools.lru_cache(None)
def fix_torchvision_import() -> bool:
    """Make ``import torchvision`` work when its compiled ops cannot load.

    Returns:
        bool: True when the schemas were defined (the workaround is active).
    """
    import importlib.util
    spec = importlib.util.find_spec('torchvision')
    if spec is None or spec.origin is None:
        return False  # not installed: nothing to fix
    if hasattr(torch.ops, 'torchvision') and hasattr(torch.ops.torchvision, 'nms'):
        return False  # ops already loaded
    lib_dir = os.path.dirname(spec.origin)
    candidates = [f for f in os.listdir(lib_dir) if f.startswith('_C.') and f.endswith('.so')]
    for name in candidates:
        try:
            torch.ops.load_library(os.path.join(lib_dir, name))
            return False  # its ops load: a matching torchvision, nothing to fix
        except (OSError, RuntimeError):
            pass
    lib = torch.library.Library('torchvision', 'DEF')  # noqa: TOR901
    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    # Keep the library object alive for the life of the process.
    fix_torchvision_import.library = lib  # type: ignore[attr-defined]
    return True


@functools.lru_cache(None)
def fix_checkpoint_loading() -> bool:
    """Allow-list the types in mmengine's own checkpoints for ``weights_only`` loading."""
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:
        return False
    import numpy as np
    from mmengine.logging import HistoryBuffer

    # argparse.Namespace: timm's training checkpoints (the official BOAT-CSWin release) store
    # their command line as ``args``; a Namespace only holds attributes.
    safe = [HistoryBuffer, np.ndarray, np.dtype, np.core.multiarray._reconstruct,
            np.core.multiarray.scalar, argparse.Namespace]
    # numpy >= 1.25 pickles dtypes through their classes (np.dtypes.Float64DType, ...).
    dtypes_module = getattr(np, 'dtypes', None)
    if dtypes_module is not None:
        safe += [getattr(dtypes_module, n) for n in dir(dtypes_module) if n.endswith('DType')]
    # HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer, 'min')`` (pickle
    # protocol 2). Allow-listing the real ``getattr`` would let a checkpoint reach any attribute,
    # so ``builtins.getattr`` is mapped to a getattr that only resolves those methods.
    def history_buffer_getattr(obj, name):
        if (obj is HistoryBuffer and isinstance(name, str) and not name.startswith('_')
                and callable(getattr(HistoryBuffer, name, None))):
            return getattr(HistoryBuffer, name)
        import pickle
        raise pickle.UnpicklingError(
            f'weights-only checkpoint loading: getattr({obj!r}, {name!r}) is not allowed (mmboat '
            "allows getattr only for the statistics methods of mmengine's HistoryBuffer)")

    safe.append((history_buffer_getattr, 'builtins.getattr'))
    add_safe_globals(safe)
    return True


@functools.lru_cache(None)
def fix_cpu_distributed_launch() -> bool:
    """Let mmengine's ``pytorch`` launcher initialise a gloo process group without CUDA."""
    import mmengine.dist.utils as dist_utils

    original = dist_utils._init_dist_pytorch

    @functools.wraps(original)
    def _init_dist_pytorch(backend: str, init_backend: str = 'torch', **kwargs) -> None:
        if torch.cuda.is_available():
            return original(backend, init_backend=init_backend, **kwargs)
        if backend in ('nccl', 'hccl', 'cncl', 'mccl'):
            backend = 'gloo'
        if init_backend != 'torch':
            raise RuntimeError(f'init_backend={init_backend!r} needs CUDA; on CPU only '
                               "init_backend='torch' (gloo) is supported")
        torch.distributed.init_process_group(backend=backend, **kwargs)

    dist_utils._init_dist_pytorch = _init_dist_pytorch
    return True


def limit_cpu_threads(num_threads: Optional[int] = None, world_size: int = 1) -> int:
    """Give this process an explicit intra-op thread budget on CPU.

    Args:
        num_threads: threads for this process. Defaults to ``MMBOAT_NUM_THREADS`` or the number
            of usable cores divided by ``world_size`` (at least 1).
        world_size: processes sharing the machine (distributed CPU training).

    Returns:
        int: the thread count set.
    """
    if num_threads is None:
        env = os.environ.get('MMBOAT_NUM_THREADS')
        if env:
            num_threads = int(env)
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (
                os.cpu_count() or 1)
            num_threads = max(1, cores // max(1, world_size))
    if num_threads < 1:
        raise ValueError(f'num_threads must be >= 1, got {num_threads}')
    torch.set_num_threads(num_threads)
    # Data-loader workers and subprocesses read these when they start.
    os.environ['OMP_NUM_THREADS'] = os.environ.get('OMP_NUM_THREADS', '1')
    os.environ['MKL_NUM_THREADS'] = os.environ.get('MKL_NUM_THREADS', '1')
    return num_threads


def apply_stack_fixes() -> None:
    """Apply fixes 1-3 (idempotent). Thread limits are set by the caller."""
    fix_torchvision_import()
    fix_checkpoint_loading()
    fix_cpu_distributed_launch()
