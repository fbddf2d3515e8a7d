"""Shared helpers for the tools tests: paths, the synthetic data generator and tiny configs."""
import importlib.util
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(ROOT, 'tools')
DEMO_CONFIGS = osp.join(ROOT, 'configs', '_demo_')
SEG_CONFIG = osp.join(DEMO_CONFIGS, 'nat-mini-slim_upernet_1xb8-600i_synthseg-64x64.py')
DET_CONFIG = osp.join(DEMO_CONFIGS, 'nat-mini-slim_retinanet_1xb4-100i_synthdet-64x64.py')


def load_tool(relpath: str, name: Optional[str] = None):
    """Import a script under tools/ as a module."""
    path = osp.join(TOOLS, relpath)
    name = name or 'mmboat_tool_' + relpath.replace('/', '_').replace('.py', '')
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, osp.dirname(path))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(osp.dirname(path))
    sys.modules[name] = module
    return module


def synthetic():
    return load_tool('demo/synthetic.py', 'synthetic')


def tiny_seg_options(data_root: str, iters: int = 2, batch: int = 2) -> List[str]:
    """``--cfg-options`` turning the demo config into a seconds-long run on ``data_root``."""
    opts = [f'{loader}.dataset.data_root={data_root}'
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    opts += [
        'model.backbone.arch.embed_dims=16', 'model.backbone.arch.depths=[1,1,1,1]',
        'model.backbone.arch.num_heads=[1,2,2,4]', 'model.backbone.arch.mlp_ratio=2.0',
        'model.decode_head.in_channels=[16,32,64,128]', 'model.decode_head.channels=16',
        'model.decode_head.pool_scales=[1,2]',
        f'train_dataloader.batch_size={batch}', 'val_dataloader.batch_size=2',
        'test_dataloader.batch_size=2',
        f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
        'param_scheduler.0.end=1', 'param_scheduler.1.begin=1', f'param_scheduler.1.end={iters}',
        f'default_hooks.checkpoint.interval={iters}', 'default_hooks.logger.interval=1',
    ]
    return opts


def tiny_det_options(data_root: str) -> List[str]:
    """``--cfg-options`` turning the demo RetinaNet config into a 2-iteration run on the
    synthetic COCO-json set at ``data_root`` (ending in ``/``)."""
    ann = data_root + 'annotations/instances_val.json'
    opts = [f'{loader}.dataset.data_root={data_root}'
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    opts += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}',
             'model.backbone.arch.embed_dims=16', 'model.backbone.arch.depths=[1,1,1,1]',
             'model.backbone.arch.num_heads=[1,2,2,4]', 'model.neck.in_channels=[32,64,128]',
             'model.neck.out_channels=16', 'model.bbox_head.in_channels=16',
             'model.bbox_head.feat_channels=16', 'model.bbox_head.norm_cfg.num_groups=4',
             'train_dataloader.batch_size=2', 'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
             'param_scheduler.0.end=1', 'param_scheduler.1.end=2',
             'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
             'model.test_cfg.score_thr=0.0']  # untrained: keep low-score boxes
    return opts


def run_script(argv: List[str], env: Optional[Dict[str, str]] = None, timeout: int = 600,
               cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Run ``argv`` (a python script or a shell script) with the repo on PYTHONPATH."""
    full_env = dict(os.environ)
    full_env['PYTHONPATH'] = ROOT + (os.pathsep + full_env['PYTHONPATH']
                                     if full_env.get('PYTHONPATH') else '')
    full_env.setdefault('MMBOAT_NUM_THREADS', '1')
    if env:
        full_env.update(env)
    if argv[0].endswith('.py'):
        argv = [sys.executable] + argv
    proc = subprocess.run(argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc
