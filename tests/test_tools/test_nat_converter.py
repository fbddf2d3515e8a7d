"""tools/model_converters/nat_to_mmboat.py on synthetic checkpoints in the released layout."""
import argparse
import importlib.util
import os.path as osp
from collections import OrderedDict

import pytest
import torch
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    'nat_to_mmboat', osp.join(ROOT, 'tools', 'model_converters', 'nat_to_mmboat.py'))
converter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(converter)

ARCH = dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2.)
KERNEL = 3


def released_backbone(arch=ARCH, kernel=KERNEL, layer_scale=False, dense_norms=False,
                      prefix='') -> 'OrderedDict[str, torch.Tensor]':
    """Random weights with the released NAT key layout and shapes (docs/models.md)."""
    g = torch.Generator().manual_seed(0)
    sd = OrderedDict()

    def add(name, *shape):
        sd[prefix + name] = torch.randn(*shape, generator=g)

    C = arch['embed_dims']
    add('patch_embed.proj.0.weight', C // 2, 3, 3, 3)
    add('patch_embed.proj.0.bias', C // 2)
    add('patch_embed.proj.1.weight', C, C // 2, 3, 3)
    add('patch_embed.proj.1.bias', C)
    add('patch_embed.norm.weight', C)
    add('patch_embed.norm.bias', C)
    n = len(arch['depths'])
    for i, (depth, heads) in enumerate(zip(arch['depths'], arch['num_heads'])):
        dim = C * 2**i
        hidden = int(dim * arch['mlp_ratio'])
        for j in range(depth):
            p = f'levels.{i}.blocks.{j}.'
            add(p + 'norm1.weight', dim)
            add(p + 'norm1.bias', dim)
            add(p + 'attn.qkv.weight', 3 * dim, dim)
            add(p + 'attn.qkv.bias', 3 * dim)
            add(p + 'attn.rpb', heads, 2 * kernel - 1, 2 * kernel - 1)
            add(p + 'attn.proj.weight', dim, dim)
            add(p + 'attn.proj.bias', dim)
            add(p + 'norm2.weight', dim)
            add(p + 'norm2.bias', dim)
            add(p + 'mlp.fc1.weight', hidden, dim)
            add(p + 'mlp.fc1.bias', hidden)
            add(p + 'mlp.fc2.weight', dim, hidden)
            add(p + 'mlp.fc2.bias', dim)
            if layer_scale:
                add(p + 'gamma1', dim)
                add(p + 'gamma2', dim)
        if i < n - 1:
            add(f'levels.{i}.downsample.reduction.weight', 2 * dim, dim, 3, 3)
            add(f'levels.{i}.downsample.norm.weight', 2 * dim)
            add(f'levels.{i}.downsample.norm.bias', 2 * dim)
        if dense_norms:
            add(f'norm{i}.weight', dim)
            add(f'norm{i}.bias', dim)
    return sd


def released_cls_checkpoint(num_classes=1000, layer_scale=False):
    sd = released_backbone(layer_scale=layer_scale)
    width = ARCH['embed_dims'] * 8
    sd['norm.weight'] = torch.randn(width)
    sd['norm.bias'] = torch.randn(width)
    sd['head.weight'] = torch.randn(num_classes, width)
    sd['head.bias'] = torch.randn(num_classes)
    return sd


def shrunk_cfg(name: str) -> Config:
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'nat', name))
    cfg.model.backbone.update(arch=ARCH, kernel_size=KERNEL, init_cfg=None)
    return cfg


def build(cfg: Config, scope: str):
    from mmengine.registry import DefaultScope
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(cfg.model)


@pytest.mark.parametrize('layer_scale', [False, True])
def test_cls_checkpoint_loads_strict_into_mmpretrain(tmp_path, layer_scale):
    official = released_cls_checkpoint(layer_scale=layer_scale)
    src, dst = tmp_path / 'nat_official.pth', tmp_path / 'out' / 'nat_mmboat.pth'
    ema = OrderedDict((k, v + 1) for k, v in official.items())
    torch.save({'state_dict': OrderedDict(('module.' + k, v) for k, v in official.items()),
                'state_dict_ema': ema, 'epoch': 299}, src)
    converter.main([str(src), str(dst)])

    result = torch.load(dst, weights_only=True)
    assert set(result['meta']) == {'converter', 'task', 'arch', 'num_tensors',
                                   'official_final_norm'}
    assert result['meta']['official_final_norm'] == 'norm3'
    assert result['meta']['task'] == 'cls'
    assert result['meta']['arch'] == (
        f'embed_dims=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], kernel_size=3, '
        f'mlp_ratio=2, layer_scale={layer_scale}')
    state = result['state_dict']
    assert torch.equal(state['backbone.norm3.weight'], official['norm.weight'])
    assert torch.equal(state['head.fc.weight'], official['head.weight'])
    assert torch.equal(state['backbone.levels.1.blocks.1.attn.rpb'],
                       official['levels.1.blocks.1.attn.rpb'])

    cfg = shrunk_cfg('nat-tiny_8xb128_in1k.py')
    cfg.model.backbone.arch = dict(ARCH, layer_scale=1e-5 if layer_scale else None)
    cfg.model.head.in_channels = 128
    model = build(cfg, 'mmpretrain')
    model.load_state_dict(state, strict=True)

    converter.main([str(src), str(dst), '--ema'])
    state = torch.load(dst, weights_only=True)['state_dict']
    assert torch.equal(state['head.fc.bias'], official['head.bias'] + 1)


@pytest.mark.parametrize('config, scope, heads', [
    ('mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py', 'mmdet', ('neck.', 'rpn_head.',
                                                               'roi_head.')),
    ('nat-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py', 'mmseg', ('decode_head.',
                                                                  'auxiliary_head.')),
])
def test_dense_checkpoint_loads_strict(tmp_path, config, scope, heads):
    cfg = shrunk_cfg(config)
    if scope == 'mmdet':
        cfg.model.neck.in_channels = [16, 32, 64, 128]
    else:
        cfg.model.decode_head.in_channels = [16, 32, 64, 128]
        cfg.model.decode_head.channels = 16
        cfg.model.auxiliary_head.in_channels = 64
        cfg.model.auxiliary_head.channels = 8
    model = build(cfg, scope)
    # Released det/seg checkpoint: spec backbone layout + the (unchanged) head names.
    official = released_backbone(dense_norms=True, prefix='backbone.')
    for name, value in model.state_dict().items():
        if not name.startswith('backbone.'):
            assert name.startswith(heads), name
            official[name] = torch.randn_like(value.float()).to(value.dtype)
    src, dst = tmp_path / 'official.pth', tmp_path / 'converted.pth'
    torch.save({'state_dict': official, 'meta': {'epoch': 36},
                'optimizer': {'state': {}, 'param_groups': []}}, src)
    converter.main([str(src), str(dst)])
    result = torch.load(dst, weights_only=True)
    assert result['meta']['task'] == 'dense'
    model.load_state_dict(result['state_dict'], strict=True)
    for name, value in official.items():
        assert torch.equal(model.state_dict()[name], value), name


class TrainerState:
    """A pickled object of a type no restricted loader allows."""


def test_untrusted_pickle_needs_flag(tmp_path):
    # timm's argparse.Namespace ``args`` is allowed by the restricted loader...
    src = tmp_path / 'with_args.pth'
    torch.save({'state_dict': released_cls_checkpoint(),
                'args': argparse.Namespace(model='nat_mini')}, src)
    allowed_before = argparse.Namespace in torch.serialization.get_safe_globals()
    converter.main([str(src), str(tmp_path / 'args_out.pth')])
    # ... without dropping a process-wide allow-list entry (torch's safe_globals context would).
    assert (argparse.Namespace in torch.serialization.get_safe_globals()) == allowed_before
    # ... any other pickled object needs the flag.
    src = tmp_path / 'with_object.pth'
    torch.save({'state_dict': released_cls_checkpoint(), 'trainer': TrainerState()}, src)
    with pytest.raises(RuntimeError, match='--trust-checkpoint'):
        converter.main([str(src), str(tmp_path / 'out.pth')])
    converter.main([str(src), str(tmp_path / 'out.pth'), '--trust-checkpoint'])
    assert 'backbone.norm3.bias' in torch.load(tmp_path / 'out.pth',
                                               weights_only=True)['state_dict']


def test_bad_checkpoints_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match='not a NAT/DiNAT checkpoint'):
        converter.convert({'state_dict': {'conv1.weight': torch.zeros(1)}})
    bad = released_cls_checkpoint()
    bad['fc_extra.weight'] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected key 'fc_extra.weight'"):
        converter.convert(bad)
    with pytest.raises(KeyError, match='no "state_dict_ema"'):
        converter.convert({'state_dict': released_cls_checkpoint()}, use_ema=True)
    with pytest.raises(ValueError, match='--task dense but the checkpoint looks like a cls'):
        converter.convert(released_cls_checkpoint(), task='dense')


def test_converter_papercuts(tmp_path, capsys):
    src, dst = tmp_path / 'nat_mini.pth', tmp_path / 'converted.pth'
    torch.save(released_cls_checkpoint(), src)
    converter.main([str(src), str(dst)])
    # A second run on the output says it is converted already.
    with pytest.raises(ValueError, match='already converted by mmboat .*use it as it is'):
        converter.main([str(dst), str(tmp_path / 'twice.pth')])
    # Errors name the checkpoint's top-level keys.
    other = tmp_path / 'other.pth'
    torch.save({'model_state': {'encoder.weight': torch.zeros(1)}, 'epoch': 3}, other)
    with pytest.raises(ValueError, match=r"top-level keys: \['epoch', 'model_state'\]"):
        converter.main([str(other), str(tmp_path / 'x.pth')])
    # --help explains classification vs dense use.
    with pytest.raises(SystemExit):
        converter.main(['--help'])
    out = capsys.readouterr().out
    assert 'classification vs dense use' in out and "prefix='backbone.'" in out
