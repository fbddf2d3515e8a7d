"""Helpers the config tests share: build a config's model, shrink it, take a CPU train step."""
import glob
import importlib
import os.path as osp
from typing import Dict, List, Set

import torch
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# Widths of the small 4-stage archs the train-step tests swap in.
SMALL_WIDTHS = [16, 32, 64, 128]


def task_of(path: str) -> str:
    """'det' (COCO), 'seg' (ADE20K) or 'cls' from a config's file name."""
    name = osp.basename(path)
    if 'coco' in name:
        return 'det'
    if 'ade20k' in name:
        return 'seg'
    return 'cls'


def build(cfg: Config) -> torch.nn.Module:
    """Build ``cfg.model`` with the downstream registry of ``cfg.default_scope``."""
    from mmengine.registry import DefaultScope
    scope = cfg.default_scope
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:  # as mmengine's Runner does
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(model_cfg)


def shrink(cfg: Config, backbone: dict) -> Config:
    """Swap in a small backbone (widths ``SMALL_WIDTHS``) and resize the neck/heads to match."""
    cfg.model.backbone.update(backbone)
    task = task_of(cfg.filename)
    if task == 'det':
        cfg.model.neck.in_channels = SMALL_WIDTHS
    elif task == 'seg':
        cfg.model.decode_head.in_channels = SMALL_WIDTHS
        cfg.model.decode_head.channels = 32
        cfg.model.auxiliary_head.in_channels = SMALL_WIDTHS[2]
        cfg.model.auxiliary_head.channels = 16
        cfg.model.data_preprocessor.size = (64, 64)
    else:
        cfg.model.head.in_channels = SMALL_WIDTHS[3]
    return cfg


def train_step(model: torch.nn.Module, data: dict, grad_prefix: str) -> Dict[str, torch.Tensor]:
    """One loss + backward; asserts a finite loss and a gradient on every parameter whose name
    starts with ``grad_prefix``, and returns those gradients by name."""
    model.train()
    data = model.data_preprocessor(data, True)
    losses = model(**data, mode='loss')
    loss = sum(v.sum() for k, v in losses.items() if 'loss' in k and isinstance(v, torch.Tensor))
    loss = loss + sum(sum(x.sum() for x in v) for k, v in losses.items()
                      if 'loss' in k and isinstance(v, list))
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith(grad_prefix)}
    assert grads and all(g is not None for g in grads.values())
    return grads


def cls_data() -> dict:
    """Two 48x40 images with class labels 3 and 7."""
    from mmpretrain.structures import DataSample
    return dict(inputs=[torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8)
                        for _ in range(2)],
                data_samples=[DataSample().set_gt_label(i) for i in (3, 7)])


def det_data() -> dict:
    """One 64x80 image with two boxes and masks of 80 classes."""
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=1, image_shapes=[(3, 64, 80)], num_items=[2],
                          num_classes=80, with_mask=True)


def seg_data() -> dict:
    """Two 64x64 images with 150-class label maps."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64),
                                             pad_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 64, 64)))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
                        for _ in range(2)], data_samples=samples)


def config_train_step(cfg: Config, grad_prefix: str) -> Dict[str, torch.Tensor]:
    """Build ``cfg``'s model with seed 0 and run :func:`train_step` on tiny data of its task."""
    torch.manual_seed(0)
    model = build(cfg)
    task = task_of(cfg.filename)
    if task == 'seg':
        from mmengine.model import revert_sync_batchnorm
        model = revert_sync_batchnorm(model)  # SyncBN needs a process group
    data = {'cls': cls_data, 'det': det_data, 'seg': seg_data}[task]()
    return train_step(model, data, grad_prefix)


def metafile_configs(folder: str) -> Set[str]:
    """The ``Config`` paths (relative to the repo) listed in ``configs/{folder}/metafile.yml``;
    asserts they all exist."""
    import yaml
    with open(osp.join(ROOT, 'configs', folder, 'metafile.yml')) as f:
        meta = yaml.safe_load(f)
    configs = {m['Config'] for m in meta['Models']}
    assert all(osp.isfile(osp.join(ROOT, c)) for c in configs), configs
    return configs


def config_paths(folders: List[str]) -> List[str]:
    """Sorted config files of ``configs/{folder}/*.py`` for each folder."""
    return sorted(p for f in folders for p in glob.glob(osp.join(ROOT, 'configs', f, '*.py')))
