"""Train a model from an mmpretrain, mmdet or mmseg config with mmboat's backbones available.

Flags mirror the downstream ``tools/train.py``::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [auto|CKPT]] [--amp]
        [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

Multi-process (CPU gloo or GPU nccl): ``bash tools/dist_train.sh CONFIG NUM_PROCS [args]``.
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional

# The repository root, so that `python tools/train.py` finds mmboat without installing it.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmboat.engine.runner_setup import (  # noqa: E402,F401  (re-exported for the tests)
    build_runner, check_checkpoint, configure_amp, load_config, parse_with_launcher_args,
    prepare_environment, register_downstream, register_modules, release_distributed,
    setup_cpu_ddp)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model (mmboat)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint, or with no value (or "auto") from the latest '
        'checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true',
                        help='enable automatic mixed precision training (float16 autocast on a '
                        'GPU; without CUDA, bfloat16 autocast on the CPU after a warning)')
    return parse_with_launcher_args(parser, argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    prepare_environment(args.launcher)
    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)

    configure_amp(cfg, args.amp)
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume checkpoint not found: {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume
    register_modules(cfg)
    runner = build_runner(cfg)
    check_checkpoint(runner, None if cfg.get('resume', False) else cfg.get('load_from'),
                     args.allow_partial_checkpoint)
    runner.train()
    release_distributed()


if __name__ == '__main__':
    main()
