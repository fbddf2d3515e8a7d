"""``type='mmboat.<Name>'`` resolves from every downstream scope; swapped-in backbones train."""
import os

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope, init_default_scope

import mmboat.models  # noqa: F401
from mmboat.models.backbones import NAT
from mmboat.registry import MODELS

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'configs')


def _downstream_models(scope):
    if scope == 'mmdet':
        from mmdet.registry import MODELS as registry
        from mmdet.utils import register_all_modules
    elif scope == 'mmseg':
        from mmseg.registry import MODELS as registry
        from mmseg.utils import register_all_modules
    else:
        from mmpretrain.registry import MODELS as registry
        from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return registry


def test_registry_node():
    assert MODELS.scope == 'mmboat'
    assert MODELS.parent.scope == 'mmengine'
    assert MODELS.get('NAT') is NAT


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_prefixed_type_resolves_from_downstream_scope(scope):
    registry = _downstream_models(scope)
    with DefaultScope.overwrite_default_scope(scope):
        assert registry.get('mmboat.NAT') is NAT
        backbone = registry.build(dict(type='mmboat.NAT', arch='mini', out_indices=(3, )))
    assert isinstance(backbone, NAT)
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 512, 2, 2)]


def _step(model, data):
    """One real optimisation step; returns (losses, did the backbone's weights move)."""
    optim_wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    before = model.backbone.patch_embed.proj[0].weight.detach().clone()
    model.train()
    losses = model.train_step(data, optim_wrapper)
    moved = not torch.equal(before, model.backbone.patch_embed.proj[0].weight)
    return losses, moved


@pytest.mark.slow
def test_nat_in_stock_mask_rcnn_trains_one_step():
    from mmdet.testing import demo_mm_inputs
    registry = _downstream_models('mmdet')
    cfg = Config.fromfile(os.path.join(DATA, 'mask-rcnn_nat-mini_swap.py'))
    assert cfg.model.backbone.type == 'mmboat.NAT'
    assert 'depth' not in cfg.model.backbone  # _delete_ kept ResNet's keys out
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = registry.build(cfg.model)
    model.init_weights()
    assert isinstance(model.backbone, NAT)
    packed = demo_mm_inputs(batch_size=1, image_shapes=[(3, 96, 128)], num_items=[2],
                            with_mask=True)
    losses, moved = _step(model, packed)
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert moved


@pytest.mark.slow
def test_nat_in_stock_upernet_trains_one_step():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    registry = _downstream_models('mmseg')
    cfg = Config.fromfile(os.path.join(DATA, 'upernet_nat-mini_swap.py'))
    assert cfg.model.backbone.type == 'mmboat.NAT' and cfg.model.pretrained is None
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = registry.build(cfg.model)
    model.init_weights()
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8))
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 64, 64)))
        sample.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(sample)
    losses, moved = _step(model, dict(inputs=inputs, data_samples=samples))
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert moved


def test_optim_wrapper_resolves_by_scope_in_a_fresh_interpreter():
    """``type='mmboat.CPUAmpOptimWrapper'`` in a config builds through mmengine's registry alone
    (the node's import location registers it), with nothing of mmboat.engine imported first."""
    import subprocess
    import sys

    code = ('import torch\n'
            'from mmengine.registry import OPTIM_WRAPPERS, init_default_scope\n'
            'import mmboat.models\n'
            'init_default_scope("mmpretrain")\n'
            'param = torch.nn.Parameter(torch.zeros(2))\n'
            'wrapper = OPTIM_WRAPPERS.build(dict(type="mmboat.CPUAmpOptimWrapper", '
            'optimizer=torch.optim.SGD([param], lr=0.1)))\n'
            'print("RESULT", type(wrapper).__name__)')
    run = subprocess.run([sys.executable, '-c', code], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=300)
    assert 'RESULT CPUAmpOptimWrapper' in run.stdout, run.stdout[-3000:]
