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
import os.path as osp
import sys
from typing import Dict, List, Optional

# The repository root, so that `python tools/test.py` finds mmboat without installing it.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmboat.engine.runner_setup import (  # noqa: E402,F401  (re-exported for the tests)
    build_runner, check_checkpoint, load_config, parse_with_launcher_args, prepare_environment,
    register_downstream, register_modules, release_distributed, setup_cpu_ddp)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a model (mmboat)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics and logs')
    parser.add_argument('--show-dir', help='directory for painted predictions')
    parser.add_argument(
        '--out', help='mmseg: directory for predicted label maps; mmdet/mmpretrain: a .pkl '
        'file for the raw predictions')
    return parse_with_launcher_args(parser, argv)


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
    prepare_environment(args.launcher)

    if not osp.isfile(args.checkpoint) and '://' not in args.checkpoint:
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    cfg.load_from = args.checkpoint
    scope = register_modules(cfg)

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

    runner = build_runner(cfg)
    check_checkpoint(runner, args.checkpoint, args.allow_partial_checkpoint)
    if dump_file is not None:
        if scope == 'mmdet':
            from mmdet.evaluation import DumpDetResults as Dump
        else:
            from mmengine.evaluator import DumpResults as Dump
        runner.test_evaluator.metrics.append(Dump(out_file_path=dump_file))
    metrics = runner.test()
    release_distributed()
    return metrics


if __name__ == '__main__':
    main()
