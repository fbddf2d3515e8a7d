"""Every NAT/DiNAT config loads and builds; one cls, det and seg config train a CPU step."""
import os.path as osp

import pytest
from config_helpers import (ROOT, build, config_paths, config_train_step, metafile_configs,
                            shrink, task_of)
from mmengine.config import Config

CONFIGS = config_paths(['nat', 'dinat'])

# A 4-stage arch small enough for a CPU training step.
SMALL_BACKBONE = dict(
    arch=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], mlp_ratio=1.),
    kernel_size=3, dilations=None, init_cfg=None)


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
    assert 'dinat/dinat-large_in21k-pre_8xb64_in1k.py' in names
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


def small_train_step(path: str) -> None:
    cfg = shrink(Config.fromfile(osp.join(ROOT, 'configs', path)), SMALL_BACKBONE)
    grads = config_train_step(cfg, 'backbone.levels.')
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_cls_config_train_step():
    small_train_step('nat/nat-tiny_8xb128_in1k.py')


def test_det_config_train_step():
    small_train_step('nat/mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py')


def test_seg_config_train_step():
    small_train_step('nat/nat-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py')


@pytest.mark.parametrize('folder', ['nat', 'dinat'])
def test_metafile_points_at_configs(folder):
    configs = metafile_configs(folder)
    assert configs == {osp.relpath(p, ROOT) for p in CONFIGS
                       if osp.basename(osp.dirname(p)) == folder}
