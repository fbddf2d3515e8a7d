"""Every NAT/DiNAT config loads and builds; one cls, det and seg config train a CPU step."""
import glob
import importlib
import os.path as osp

import pytest
import torch
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = sorted(
    glob.glob(osp.join(ROOT, 'configs', 'nat', '*.py')) +
    glob.glob(osp.join(ROOT, 'configs', 'dinat', '*.py')))

# A 4-stage arch small enough for a CPU training step.
SMALL_BACKBONE = dict(
    arch=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], mlp_ratio=1.),
    kernel_size=3, dilations=None, init_cfg=None)
SMALL_WIDTHS = [16, 32, 64, 128]


def registry_for(scope: str):
    """The downstream MODELS registry, with that library's modules registered."""
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
    return importlib.import_module(f'{scope}.registry').MODELS


def build(cfg: Config):
    from mmengine.registry import DefaultScope
    scope = cfg.default_scope
    registry = registry_for(scope)
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:  # as mmengine's Runner does
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(model_cfg)


def task_of(path: str) -> str:
    name = osp.basename(path)
    if 'coco' in name:
        return 'det'
    if 'ade20k' in name:
        return 'seg'
    return 'cls'


def test_config_names_and_coverage():
    names = {osp.relpath(p, osp.join(ROOT, 'configs')) for p in CONFIGS}
    for arch in ('mini', 'tiny', 'small', 'base'):
        assert f'nat/nat-{arch}_8xb128_in1k.py' in names
        assert f'dinat/dinat-{arch}_8xb128_in1k.py' in names
        assert f'nat/nat-{arch}_upernet_8xb2-amp-160k_ade20k-512x512.py' in names
    for arch in ('mini', 'tiny', 'small'):
        assert f'nat/mask-rcnn_nat-{arch}_fpn_amp-ms-crop-3x_coco.py' in names
    for model in ('nat', 'dinat'):
        assert f'{model}/mask-rcnn_{model}-tiny_fpn_amp-ms-crop-3x_coco.py' in names
        assert f'{model}/cascade-mask-rcnn_{model}-tiny_fpn_amp-ms-crop-3x_coco.py' in names
    assert 'dinat/dinat-large_in21k-pre_8xb128_in1k.py' in names
    assert 'dinat/dinat-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py' in names
    for folder in ('nat', 'dinat'):
        assert osp.isfile(osp.join(ROOT, 'configs', folder, 'README.md'))
        assert osp.isfile(osp.join(ROOT, 'configs', folder, 'metafile.yml'))


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.basename(p) for p in CONFIGS])
def test_config_loads_and_builds(path):
    cfg = Config.fromfile(path)
    task = task_of(path)
    assert cfg.default_scope == {'det': 'mmdet', 'seg': 'mmseg', 'cls': 'mmpretrain'}[task]
    assert cfg.custom_imports == dict(imports=['mmboat.models'], allow_failed_imports=False)
    backbone_cfg = cfg.model.backbone
    is_dinat = osp.basename(osp.dirname(path)) == 'dinat'
    assert backbone_cfg.type == ('mmboat.DiNAT' if is_dinat else 'mmboat.NAT')
    if is_dinat:
        expected = {'det': 'coco', 'seg': 'ade20k', 'cls': 'imagenet'}[task]
        assert backbone_cfg.dilations == expected
    if task != 'cls':
        assert backbone_cfg.out_indices == (0, 1, 2, 3)
        assert backbone_cfg.init_cfg.type == 'Pretrained'
        assert 'depth' not in backbone_cfg  # ResNet keys did not leak in (_delete_)
    if task == 'seg':
        assert cfg.model.pretrained is None
    # Build with a light backbone arch of the same family of widths to keep it fast, but check
    # the real arch's widths against the neck/head of the config.
    from mmboat.models import NAT, DiNAT
    arch_cls = DiNAT if is_dinat else NAT
    widths = [arch_cls.arch_zoo[backbone_cfg.arch]['embed_dims'] * 2**i for i in range(4)]
    if task == 'det':
        assert cfg.model.neck.in_channels == widths
    elif task == 'seg':
        assert cfg.model.decode_head.in_channels == widths
        assert cfg.model.auxiliary_head.in_channels == widths[2]
    else:
        assert cfg.model.head.in_channels == widths[3]
    model = build(cfg)
    assert isinstance(model.backbone, arch_cls)
    assert model.backbone.num_features == widths


def shrink(cfg: Config) -> Config:
    cfg.model.backbone.update(SMALL_BACKBONE)
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


def train_step(model, data) -> None:
    model.train()
    data = model.data_preprocessor(data, True)
    losses = model(**data, mode='loss')
    loss = sum(v.sum() for k, v in losses.items() if 'loss' in k and isinstance(v, torch.Tensor))
    loss = loss + sum(sum(x.sum() for x in v) for k, v in losses.items()
                      if 'loss' in k and isinstance(v, list))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith('backbone.levels.')]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_cls_config_train_step():
    from mmpretrain.structures import DataSample
    cfg = shrink(Config.fromfile(osp.join(ROOT, 'configs', 'nat', 'nat-tiny_8xb128_in1k.py')))
    torch.manual_seed(0)
    model = build(cfg)
    data = dict(inputs=[torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8)
                        for _ in range(2)],
                data_samples=[DataSample().set_gt_label(i) for i in (3, 7)])
    train_step(model, data)


def test_det_config_train_step():
    from mmdet.testing import demo_mm_inputs
    cfg = shrink(Config.fromfile(
        osp.join(ROOT, 'configs', 'nat', 'mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py')))
    torch.manual_seed(0)
    model = build(cfg)
    data = demo_mm_inputs(batch_size=1, image_shapes=[(3, 64, 80)], num_items=[2],
                          num_classes=80, with_mask=True)
    train_step(model, data)


def test_seg_config_train_step():
    from mmengine.model import revert_sync_batchnorm
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    cfg = shrink(Config.fromfile(osp.join(
        ROOT, 'configs', 'nat', 'nat-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py')))
    torch.manual_seed(0)
    model = revert_sync_batchnorm(build(cfg))  # SyncBN needs a process group
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64),
                                             pad_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 64, 64)))
        samples.append(sample)
    data = dict(inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
                        for _ in range(2)], data_samples=samples)
    train_step(model, data)


@pytest.mark.parametrize('folder', ['nat', 'dinat'])
def test_metafile_points_at_configs(folder):
    import yaml
    with open(osp.join(ROOT, 'configs', folder, 'metafile.yml')) as f:
        meta = yaml.safe_load(f)
    configs = {m['Config'] for m in meta['Models']}
    assert all(osp.isfile(osp.join(ROOT, c)) for c in configs), configs
    assert configs == {osp.relpath(p, ROOT) for p in CONFIGS
                       if osp.basename(osp.dirname(p)) == folder}
