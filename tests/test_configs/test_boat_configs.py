"""Every BOAT-Swin/BOAT-CSWin config loads and builds; a cls, det and seg config train a step."""
import os.path as osp

import pytest
import torch
from config_helpers import (ROOT, build, config_paths, config_train_step, metafile_configs,
                            shrink, task_of)
from mmengine.config import Config

from mmboat.models import BOATCSWinTransformer, BOATSwinTransformer

FOLDERS = ('boat_swin', 'boat_cswin')
CONFIGS = config_paths(FOLDERS)
BACKBONES = {'boat_swin': BOATSwinTransformer, 'boat_cswin': BOATCSWinTransformer}
ARCHS = ('tiny', 'small', 'base')

# Small 4-stage archs of each family for CPU training steps (widths 16, 32, 64, 128).
SMALL_BACKBONES = {
    'boat_swin': dict(arch=dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4]),
                      window_size=3, img_size=64, fsla_cfg=dict(cluster_size=8, overlap=2),
                      init_cfg=None),
    'boat_cswin': dict(arch=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 4],
                                 stripe_widths=[1, 2, 3, 3]),
                       fsla_cfg=dict(cluster_size=8, overlap=2), init_cfg=None),
}


def family(path: str) -> str:
    return osp.basename(osp.dirname(path))


def test_config_names_and_coverage():
    names = {osp.relpath(p, osp.join(ROOT, 'configs')) for p in CONFIGS}
    for folder in FOLDERS:
        model = folder.replace('_', '-')
        for arch in ARCHS:
            assert f'{folder}/{model}-{arch}_16xb64_in1k.py' in names
            assert f'{folder}/{model}-{arch}_upernet_8xb2-160k_ade20k-512x512.py' in names
            assert f'{folder}/mask-rcnn_{model}-{arch}_fpn_1x_coco.py' in names
            assert f'{folder}/mask-rcnn_{model}-{arch}_fpn_ms-crop-3x_coco.py' in names
        assert osp.isfile(osp.join(ROOT, 'configs', folder, 'README.md'))
        assert osp.isfile(osp.join(ROOT, 'configs', folder, 'metafile.yml'))
    assert len(CONFIGS) == 24


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.basename(p) for p in CONFIGS])
def test_config_loads_and_builds(path):
    cfg = Config.fromfile(path)
    task = task_of(path)
    assert cfg.default_scope == {'det': 'mmdet', 'seg': 'mmseg', 'cls': 'mmpretrain'}[task]
    assert cfg.custom_imports == dict(imports=['mmboat.models'], allow_failed_imports=False)
    backbone_cfg = cfg.model.backbone
    backbone_cls = BACKBONES[family(path)]
    assert backbone_cfg.type == f'mmboat.{backbone_cls.__name__}'
    arch = backbone_cfg.arch
    assert arch in ARCHS and f'-{arch}_' in osp.basename(path)
    if family(path) == 'boat_cswin':
        assert backbone_cfg.fsla_cfg.qk_scale == 1.0  # what the released weights need
    if task != 'cls':
        assert backbone_cfg.out_indices == (0, 1, 2, 3)
        assert backbone_cfg.init_cfg.type == 'Pretrained'
        assert backbone_cfg.init_cfg.prefix == 'backbone.'
        # The Swin/ResNet keys of the base config did not leak in (_delete_=True).
        assert not {'depth', 'embed_dims', 'depths', 'convert_weights'} & set(backbone_cfg)
    if task == 'seg':
        assert cfg.model.pretrained is None
    widths = [backbone_cls.arch_zoo[arch]['embed_dims'] * 2**i for i in range(4)]
    if task == 'det':
        assert cfg.model.neck.in_channels == widths
    elif task == 'seg':
        assert cfg.model.decode_head.in_channels == widths
        assert cfg.model.auxiliary_head.in_channels == widths[2]
    else:
        assert cfg.model.head.in_channels == widths[3]
    with torch.device('meta'):  # the real arch, without spending time on weight init
        model = build(cfg)
    assert isinstance(model.backbone, backbone_cls)
    assert model.backbone.num_features == widths
    expected_fsla = {'boat_swin': {'tiny': 5, 'small': 11, 'base': 11},
                     'boat_cswin': {'tiny': 14, 'small': 20, 'base': 20}}[family(path)][arch]
    assert model.backbone.num_fsla_modules == expected_fsla


def small_train_step(path: str) -> None:
    cfg = Config.fromfile(osp.join(ROOT, 'configs', path))
    grads = config_train_step(shrink(cfg, SMALL_BACKBONES[family(path)]), 'backbone.')
    fsla = [g for n, g in grads.items() if '.attnC.' in n or '.content_attn.' in n]
    assert fsla and any(g.abs().sum() > 0 for g in fsla)


def test_cls_config_train_step():
    small_train_step('boat_cswin/boat-cswin-tiny_16xb64_in1k.py')


@pytest.mark.slow  # ~20 s on a shared 2-core CPU (Mask R-CNN heads)
def test_det_config_train_step():
    small_train_step('boat_swin/mask-rcnn_boat-swin-tiny_fpn_1x_coco.py')


def test_seg_config_train_step():
    small_train_step('boat_cswin/boat-cswin-tiny_upernet_8xb2-160k_ade20k-512x512.py')


@pytest.mark.parametrize('folder', FOLDERS)
def test_metafile_points_at_configs(folder):
    configs = metafile_configs(folder)
    assert configs == {osp.relpath(p, ROOT) for p in CONFIGS if family(p) == folder}
