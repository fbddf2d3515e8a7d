"""Train a model from an mmpretrain, mmdet or mmseg config with mmboat's backbones available.

Flags mirror the downstream ``tools/train.py``::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [auto|CKPT]] [--amp]
        [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

Multi-process (CPU gloo or GPU nccl): ``bash tools/dist_train.sh CONFIG NUM_PROCS [args]``.
"""
import argparse
import importlib
import logging
import os
import os.path as osp
import sys
from typing import List, Optional

# The repository root, so that `python tools/train.py` finds mmboat without installing it.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

# Downstream package per config ``default_scope``.
_SCOPES = {'mmdet': 'mmdet', 'mmseg': 'mmseg', 'mmpretrain': 'mmpretrain'}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description='Train a model (mmboat)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint, or with no value (or "auto") from the latest '
        'checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true',
                        help='enable automatic mixed precision training (CUDA)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value pairs in xxx=yyy format')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; older launchers --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def register_downstream(cfg) -> str:
    """Register the modules of the library named by the config's ``default_scope``.

    Returns:
        str: the scope.
    """
    scope = cfg.get('default_scope', None)
    if scope not in _SCOPES:
        raise ValueError(
            f'config default_scope must be one of {sorted(_SCOPES)} (mmboat plugs into those '
            f"libraries; keep the downstream scope, not 'mmboat'), got {scope!r}")
    try:
        utils = importlib.import_module(f'{_SCOPES[scope]}.utils')
    except ImportError as exc:
        raise ImportError(f'the config needs {_SCOPES[scope]} (default_scope={scope!r}), which '
                          f'could not be imported: {exc}') from exc
    utils.register_all_modules(init_default_scope=False)
    return scope


def setup_cpu_ddp(cfg) -> None:
    """Make mmengine's DDP wrapper work on CPU (gloo): ``device_ids`` must be None there."""
    import torch

    if cfg.launcher == 'none' or torch.cuda.is_available():
        return
    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        wrapper = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                       find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper


def setup_amp(cfg) -> None:
    """Switch the optimizer wrapper to ``AmpOptimWrapper`` (as the downstream tools do)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError('--amp needs a CUDA device (mmengine\'s AmpOptimWrapper is CUDA/NPU '
                           'only); drop --amp to train on CPU in float32')
    optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if optim_wrapper == 'AmpOptimWrapper':
        logging.getLogger('mmengine').warning('AMP training is already enabled in the config')
        return
    if optim_wrapper != 'OptimWrapper':
        raise ValueError(f'--amp is only supported with optim_wrapper type OptimWrapper, got '
                         f'{optim_wrapper!r}')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)

    from mmboat.utils import apply_stack_fixes, limit_cpu_threads

    apply_stack_fixes()
    world_size = int(os.environ.get('WORLD_SIZE', 1)) if args.launcher != 'none' else 1
    limit_cpu_threads(world_size=world_size)

    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    # work_dir priority: CLI > config > ./work_dirs/<config name>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        setup_amp(cfg)
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume checkpoint not found: {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume
    setup_cpu_ddp(cfg)

    register_downstream(cfg)
    import mmboat.models  # noqa: F401  (registers mmboat's backbones)

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    runner.train()


if __name__ == '__main__':
    main()
