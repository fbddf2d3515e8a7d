"""Every BOAT-Swin/BOAT-CSWin config loads and builds; a cls, det and seg config train a step."""
import glob
import importlib
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from mmboat.models import BOATCSWinTransformer, BOATSwinTransformer

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
FOLDERS = ('boat_swin', 'boat_cswin')
CONFIGS = sorted(p for f in FOLDERS for p in glob.glob(osp.join(ROOT, 'configs', f, '*.py')))
BACKBONES = {'boat_swin': BOATSwinTransformer, 'boat_cswin': BOATCSWinTransformer}
ARCHS = ('tiny', 'small', 'base')

# Small 4-stage archs of each family for CPU training steps (widths 16, 32, 64, 128).
SMALL_BACKBONES = {
    'boat_swin': dict(arch=dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4]),
                      window_size=3, img_size=64, fsla_cluster_size=8, fsla_overlap=2,
                      init_cfg=None),
    'boat_cswin': dict(arch=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 4],
                                 stripe_widths=[1, 2, 3, 3]),
                       fsla_cluster_size=8, fsla_overlap=2, init_cfg=None),
}
SMALL_WIDTHS = [16, 32, 64, 128]


def family(path: str) -> str:
    return osp.basename(osp.dirname(path))


def task_of(path: str) -> str:
    name = osp.basename(path)
    if 'coco' in name:
        return 'det'
    if 'ade20k' in name:
        return 'seg'
    return 'cls'


def build(cfg: Config):
    from mmengine.registry import DefaultScope
    scope = cfg.default_scope
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    if cfg.get('data_preprocessor') is not None:  # what mmengine's Runner does
        cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(cfg.model)


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
        assert backbone_cfg.fsla_qk_scale == 1.0  # what the released weights need
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


def shrink(cfg: Config) -> Config:
    folder = family(cfg.filename)
    cfg.model.backbone.update(SMALL_BACKBONES[folder])
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
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith('backbone.')}
    assert grads and all(g is not None for g in grads.values())
    fsla = [g for n, g in grads.items() if '.attnC.' in n or '.content_attn.' in n]
    assert fsla and any(g.abs().sum() > 0 for g in fsla)


def test_cls_config_train_step():
    from mmpretrain.structures import DataSample
    cfg = shrink(Config.fromfile(
        osp.join(ROOT, 'configs', 'boat_cswin', 'boat-cswin-tiny_16xb64_in1k.py')))
    torch.manual_seed(0)
    model = build(cfg)
    data = dict(inputs=[torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8)
                        for _ in range(2)],
                data_samples=[DataSample().set_gt_label(i) for i in (3, 7)])
    train_step(model, data)


@pytest.mark.slow  # ~20 s on a shared 2-core CPU (Mask R-CNN heads)
def test_det_config_train_step():
    from mmdet.testing import demo_mm_inputs
    cfg = shrink(Config.fromfile(
        osp.join(ROOT, 'configs', 'boat_swin', 'mask-rcnn_boat-swin-tiny_fpn_1x_coco.py')))
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
        ROOT, 'configs', 'boat_cswin', 'boat-cswin-tiny_upernet_8xb2-160k_ade20k-512x512.py')))
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


@pytest.mark.parametrize('folder', FOLDERS)
def test_metafile_points_at_configs(folder):
    import yaml
    with open(osp.join(ROOT, 'configs', folder, 'metafile.yml')) as f:
        meta = yaml.safe_load(f)
    configs = {m['Config'] for m in meta['Models']}
    assert all(osp.isfile(osp.join(ROOT, c)) for c in configs), configs
    assert configs == {osp.relpath(p, ROOT) for p in CONFIGS if family(p) == folder}
