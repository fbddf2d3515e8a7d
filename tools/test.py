"""Test (evaluate) a checkpoint of an mmpretrain, mmdet or mmseg config with mmboat's backbones.

Flags mirror the downstream ``tools/test.py``::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--out PATH]
        [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

``--out``: for mmseg configs a directory for the predicted label maps (the evaluator's
``output_dir``); for mmdet/mmpretrain a ``.pkl`` file with the raw predictions.
``--show-dir``: painted predictions are written there (the library's visualization hook).
The metrics are logged and written to ``<work-dir>/<timestamp>/<timestamp>.json``.
"""
import argparse
import importlib
import os
import os.path as osp
import sys
from typing import Dict, List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

_SCOPES = {'mmdet': 'mmdet', 'mmseg': 'mmseg', 'mmpretrain': 'mmpretrain'}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description='Test (and evaluate) a model (mmboat)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics and logs')
    parser.add_argument('--show-dir', help='directory for painted predictions')
    parser.add_argument(
        '--out', help='mmseg: directory for predicted label maps; mmdet/mmpretrain: a .pkl '
        'file for the raw predictions')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value pairs in xxx=yyy format')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def register_downstream(cfg) -> str:
    """Register the modules of the library named by the config's ``default_scope``."""
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


def setup_show_dir(cfg, scope: str, show_dir: str) -> None:
    """Turn on the library's visualization hook and point it at ``show_dir``."""
    hooks = cfg.get('default_hooks', None) or {}
    if 'visualization' not in hooks:
        raise RuntimeError('--show-dir needs a `visualization` entry in the config\'s '
                           'default_hooks (e.g. SegVisualizationHook / DetVisualizationHook)')
    hook = hooks['visualization']
    if scope == 'mmseg':
        hook['draw'] = True
        hook['interval'] = 1
        cfg.visualizer['save_dir'] = show_dir
    elif scope == 'mmdet':
        hook['draw'] = True
        hook['test_out_dir'] = osp.abspath(show_dir)
    else:  # mmpretrain
        hook['enable'] = True
        hook['out_dir'] = osp.abspath(show_dir)


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)

    from mmboat.utils import apply_stack_fixes, limit_cpu_threads

    apply_stack_fixes()
    world_size = int(os.environ.get('WORLD_SIZE', 1)) if args.launcher != 'none' else 1
    limit_cpu_threads(world_size=world_size)

    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    if not osp.isfile(args.checkpoint) and '://' not in args.checkpoint:
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    setup_cpu_ddp(cfg)

    scope = register_downstream(cfg)
    import mmboat.models  # noqa: F401  (registers mmboat's backbones)

    if args.show_dir:
        setup_show_dir(cfg, scope, args.show_dir)
    dump_file = None
    if args.out is not None:
        if scope == 'mmseg':
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True
        else:
            if not args.out.endswith(('.pkl', '.pickle')):
                raise ValueError(f'--out must be a .pkl or .pickle file for {scope} configs, '
                                 f'got {args.out!r}')
            dump_file = args.out

    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    if dump_file is not None:
        if scope == 'mmdet':
            from mmdet.evaluation import DumpDetResults as Dump
        else:
            from mmengine.evaluator import DumpResults as Dump
        runner.test_evaluator.metrics.append(Dump(out_file_path=dump_file))
    return runner.test()


if __name__ == '__main__':
    main()
