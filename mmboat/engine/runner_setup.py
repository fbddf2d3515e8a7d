"""The setup shared by ``tools/train.py`` and ``tools/test.py``.

Both tools parse the same launcher flags, apply mmboat's stack fixes and a CPU thread budget
before anything imports mmdet/mmseg/mmpretrain, load a config with ``--cfg-options`` and the
``work_dir`` rule of the downstream tools, register the downstream library named by the config's
``default_scope`` plus mmboat's backbones, make mmengine's DDP wrapper work on CPU (gloo) and build
the runner (whose environment print-out names the backend and the device in use), and release the
process group after a successful run.

Importing this module is light: mmengine, torch and the downstream libraries are imported inside
the functions that need them.
"""
import argparse
import functools
import importlib
import os
import os.path as osp
from typing import Dict, List, Optional

__all__ = [
    'SCOPES', 'add_launcher_args', 'export_local_rank', 'prepare_environment', 'load_config',
    'register_downstream', 'setup_cpu_ddp', 'register_modules', 'build_runner',
    'parse_with_launcher_args', 'release_distributed', 'configure_amp', 'check_checkpoint',
    'runner_class'
]

# Downstream package per config ``default_scope``.
SCOPES: Dict[str, str] = {'mmdet': 'mmdet', 'mmseg': 'mmseg', 'mmpretrain': 'mmpretrain'}


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--cfg-options``, ``--launcher`` and ``--local_rank``/``--local-rank``.

    Args:
        parser (argparse.ArgumentParser): The tool's parser.

    Returns:
        argparse.ArgumentParser: ``parser``.
    """
    from mmengine.config import DictAction

    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value pairs in xxx=yyy format')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; older launchers --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    parser.add_argument(
        '--allow-partial-checkpoint', action='store_true',
        help='go on when the checkpoint (load_from / the test checkpoint) would load less than '
        'half of the model or of an mmboat backbone (by default that stops with an error naming '
        'the checkpoint); sets MMBOAT_ALLOW_PARTIAL_CHECKPOINT=1')
    return parser


def export_local_rank(args: argparse.Namespace) -> argparse.Namespace:
    """Set ``LOCAL_RANK`` from ``--local_rank`` unless the launcher already set it."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def prepare_environment(launcher: str) -> None:
    """Apply mmboat's stack fixes and one CPU thread budget per process.

    Call it before importing mmdet/mmseg/mmpretrain models.

    Args:
        launcher (str): ``'none'`` for one process; otherwise ``WORLD_SIZE`` processes share the
            machine.
    """
    from mmboat.utils import apply_stack_fixes, limit_cpu_threads

    apply_stack_fixes()
    world_size = int(os.environ.get('WORLD_SIZE', 1)) if launcher != 'none' else 1
    limit_cpu_threads(world_size=world_size)


def load_config(config: str,
                launcher: str,
                cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None):
    """Load ``config``, set its launcher, merge ``cfg_options`` and settle ``work_dir``.

    ``work_dir`` priority: the argument > the config > ``./work_dirs/<config name>``.

    Args:
        config (str): The config file.
        launcher (str): The ``--launcher`` value.
        cfg_options (dict, optional): ``--cfg-options`` overrides. Defaults to None.
        work_dir (str, optional): The ``--work-dir`` value. Defaults to None.

    Returns:
        mmengine.config.Config: The config.
    """
    from mmengine.config import Config

    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


def register_downstream(cfg) -> str:
    """Register the modules of the library named by the config's ``default_scope``.

    Returns:
        str: the scope.
    """
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(
            f'config default_scope must be one of {sorted(SCOPES)} (mmboat plugs into those '
            f"libraries; keep the downstream scope, not 'mmboat'), got {scope!r}")
    try:
        utils = importlib.import_module(f'{SCOPES[scope]}.utils')
    except ImportError as exc:
        raise ImportError(f'the config needs {SCOPES[scope]} (default_scope={scope!r}), which '
                          f'could not be imported: {exc}') from exc
    utils.register_all_modules(init_default_scope=False)
    return scope


# Process-group backends that need an accelerator; a CPU run uses gloo instead.
_DEVICE_BACKENDS = ('nccl', 'hccl', 'cncl', 'mccl')


def setup_cpu_ddp(cfg) -> None:
    """Make mmengine's DDP wrapper work on CPU (gloo): ``device_ids`` must be None there, and
    the config's ``env_cfg.dist_cfg.backend`` names gloo (the backend the CPU launcher of
    :func:`mmboat.utils.apply_stack_fixes` initialises) instead of nccl."""
    import torch

    if cfg.launcher == 'none' or torch.cuda.is_available():
        return
    if cfg.get('env_cfg', None) is None:
        cfg.env_cfg = dict(dist_cfg=dict(backend='nccl'))  # mmengine's default
    if cfg.env_cfg.get('dist_cfg', None) is None:
        cfg.env_cfg.dist_cfg = dict()
    if cfg.env_cfg.dist_cfg.get('backend', 'nccl') in _DEVICE_BACKENDS:
        cfg.env_cfg.dist_cfg.backend = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        wrapper = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                       find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper


def register_modules(cfg) -> str:
    """:func:`setup_cpu_ddp`, :func:`register_downstream` and mmboat's backbones.

    Returns:
        str: the config's scope.
    """
    setup_cpu_ddp(cfg)
    scope = register_downstream(cfg)
    import mmboat.models  # noqa: F401  (registers mmboat's backbones)
    return scope


def configure_amp(cfg, enable: bool = False) -> None:
    """Settle the config's mixed precision for this machine.

    ``enable`` (``--amp``) switches a plain ``OptimWrapper`` to ``AmpOptimWrapper``, as the
    downstream tools do. Without a CUDA device an ``AmpOptimWrapper`` (from the config or from
    ``--amp``) would stop at mmengine's "only available training on gpu" assertion; it becomes
    :class:`mmboat.engine.optim_wrappers.CPUAmpOptimWrapper` (CPU bfloat16 autocast) instead,
    after one warning that says how to train in float32.

    Args:
        cfg (mmengine.config.Config): The training config (changed in place).
        enable (bool): The ``--amp`` flag. Defaults to False.
    """
    import logging

    import torch
    from mmengine.logging import print_log

    optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if enable:
        if optim_wrapper == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in the config', logger='current',
                      level=logging.WARNING)
        elif optim_wrapper != 'OptimWrapper':
            raise ValueError('--amp is only supported with optim_wrapper type OptimWrapper, got '
                             f'{optim_wrapper!r}')
        else:
            cfg.optim_wrapper.type = optim_wrapper = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if optim_wrapper != 'AmpOptimWrapper' or torch.cuda.is_available():
        return
    import mmboat.engine.optim_wrappers  # noqa: F401  (registers mmboat.CPUAmpOptimWrapper)

    cfg.optim_wrapper.type = 'mmboat.CPUAmpOptimWrapper'
    print_log(
        'mixed precision: this config trains with AmpOptimWrapper (float16 autocast), which '
        'mmengine supports on GPUs only, and no CUDA device is available. Training on the CPU '
        'with bfloat16 autocast instead (mmboat.CPUAmpOptimWrapper: float32 weights and '
        'optimizer state, no loss scaling). For float32 training pass '
        '--cfg-options optim_wrapper.type=OptimWrapper.', logger='current',
        level=logging.WARNING)


def check_checkpoint(runner, checkpoint, allow_partial: bool = False) -> None:
    """Stop before ``runner`` trains or tests from a ``checkpoint`` (``load_from``, the test
    checkpoint) that would leave most of its model unloaded (mmengine loads with ``strict=False``
    and only logs the missing keys); see
    :func:`mmboat.models.utils.pretrained.check_model_checkpoint`. Nothing to do without one."""
    from mmboat.models.utils.pretrained import ALLOW_PARTIAL_ENV, check_model_checkpoint

    if allow_partial:  # also for the backbones' own check when mmengine loads
        os.environ[ALLOW_PARTIAL_ENV] = '1'
    if checkpoint:
        check_model_checkpoint(runner.model, checkpoint, allow_partial)


def _log_env(runner, env_cfg: dict) -> None:
    """The environment print-out of mmboat's runner: mmengine's system environment plus
    mmboat's extension, and :func:`mmboat.utils.collect_env.collect_runtime_env` (the backend
    in use, the world size, the device), then the config, as mmengine does."""
    from collections import OrderedDict

    from mmengine.utils.dl_utils import collect_env as engine_env

    from mmboat.utils.collect_env import collect_env, collect_runtime_env

    system = OrderedDict(engine_env())
    system.update((k, v) for k, v in collect_env().items() if k.startswith('mmboat'))
    runtime = collect_runtime_env(env_cfg, runner._launcher, runner._world_size)
    runtime.update(runner._randomness_cfg)
    runtime['seed'] = runner._seed
    sections = [f'{title}:\n' + '\n'.join(f'    {k}: {v}' for k, v in env.items())
                for title, env in (('System environment', system),
                                   ('Runtime environment', runtime))]
    dashes = '-' * 60
    runner.logger.info('\n'.join(['', dashes, sections[0], '', sections[1], dashes, '']))
    if runner.cfg._cfg_dict:
        runner.logger.info(f'Config:\n{runner.cfg.pretty_text}')


@functools.lru_cache(None)
def runner_class():
    """mmengine's ``Runner`` with mmboat's environment print-out (see :func:`_log_env`)."""
    from mmengine.runner import Runner

    return type('Runner', (Runner, ), dict(_log_env=_log_env, __module__=__name__))


def build_runner(cfg):
    """``Runner.from_cfg(cfg)`` (:func:`runner_class`), or the config's ``runner_type`` from
    ``RUNNERS``."""
    from mmengine.registry import RUNNERS

    if 'runner_type' not in cfg:
        return runner_class().from_cfg(cfg)
    return RUNNERS.build(cfg)


def release_distributed(settle: float = 0.2) -> None:
    """End a distributed run cleanly: barrier, destroy the default process group, settle.

    A gloo worker thread frees a finished collective's tensors only after the caller has moved
    on, and freeing a tensor that Python created needs the GIL. When that happens after the
    interpreter has begun to shut down, the thread is killed inside a C++ destructor and the
    process aborts (``terminate called without an active exception``) after a good run, so
    torchrun reports the job failed. The barrier's wait and a short sleep release the GIL to
    let those threads finish first. ``destroy_process_group`` alone does not stop them while
    the DDP wrapper still refers to the group. The tools call this after ``runner.train()`` /
    ``runner.test()`` return; on an exception they leave the group alone, as a pending
    collective could block the barrier.

    Args:
        settle (float): Seconds to sleep (GIL released) after the barrier. Defaults to 0.2.
    """
    import time

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    time.sleep(settle)


def parse_with_launcher_args(parser: argparse.ArgumentParser,
                             argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Add the launcher flags to ``parser``, parse ``argv`` and export ``LOCAL_RANK``."""
    add_launcher_args(parser)
    return export_local_rank(parser.parse_args(argv))
