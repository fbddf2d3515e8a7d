"""BOAT-Swin / BOAT-CSWin checkpoint converters on synthetic checkpoints of the released layout.

The key lists are written from the official naming (Swin / CSWin code + BOAT's additions), not
from mmboat's modules, so a renamed mmboat parameter makes these tests fail.
"""
import importlib.util
import os.path as osp

import pytest
import torch

from mmboat.models.backbones import BOATCSWinTransformer, BOATSwinTransformer

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def load_tool(name):
    path = osp.join(ROOT, 'tools', 'model_converters', f'{name}.py')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_boat_swin(embed_dims, depths, num_heads, window, fsla_blocks, img_size=224,
                       num_classes=10):
    """Key -> shape of a released BOAT-Swin ``model`` state dict (official Swin names)."""
    shapes = {'patch_embed.proj.weight': (embed_dims, 3, 4, 4),
              'patch_embed.proj.bias': (embed_dims, ),
              'patch_embed.norm.weight': (embed_dims, ), 'patch_embed.norm.bias': (embed_dims, )}
    res = img_size // 4
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dims * 2**i
        w = min(window, res)
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            shapes.update({
                p + 'norm1.weight': (dim, ), p + 'norm1.bias': (dim, ),
                p + 'attn.relative_position_bias_table': ((2 * w - 1)**2, heads),
                p + 'attn.relative_position_index': (w * w, w * w),
                p + 'attn.qkv.weight': (3 * dim, dim), p + 'attn.qkv.bias': (3 * dim, ),
                p + 'attn.proj.weight': (dim, dim), p + 'attn.proj.bias': (dim, ),
                p + 'norm2.weight': (dim, ), p + 'norm2.bias': (dim, ),
                p + 'mlp.fc1.weight': (4 * dim, dim), p + 'mlp.fc1.bias': (4 * dim, ),
                p + 'mlp.fc2.weight': (dim, 4 * dim), p + 'mlp.fc2.bias': (dim, ),
            })
            if j % 2 == 1 and res > window:
                shapes[p + 'attn_mask'] = ((res // w)**2, w * w, w * w)
            if j in fsla_blocks[i]:
                shapes.update({
                    p + 'attnC.qkv.weight': (3 * dim, dim), p + 'attnC.qkv.bias': (3 * dim, ),
                    p + 'attnC.proj.weight': (dim, dim), p + 'attnC.proj.bias': (dim, ),
                    p + 'attnC.get_v.weight': (dim, 1, 3, 3), p + 'attnC.get_v.bias': (dim, ),
                    p + 'norm4.weight': (dim, ), p + 'norm4.bias': (dim, ),
                })
        if i < len(depths) - 1:
            shapes[f'layers.{i}.downsample.reduction.weight'] = (2 * dim, 4 * dim)
            shapes[f'layers.{i}.downsample.norm.weight'] = (4 * dim, )
            shapes[f'layers.{i}.downsample.norm.bias'] = (4 * dim, )
            res //= 2
    last = embed_dims * 2**(len(depths) - 1)
    shapes.update({'norm.weight': (last, ), 'norm.bias': (last, ),
                   'head.weight': (num_classes, last), 'head.bias': (num_classes, )})
    return shapes


def official_boat_cswin(embed_dims, depths, fsla_blocks, num_classes=10):
    """Key -> shape of a released BOAT-CSWin (timm) state dict (official CSWin names)."""
    shapes = {'stage1_conv_embed.0.weight': (embed_dims, 3, 7, 7),
              'stage1_conv_embed.0.bias': (embed_dims, ),
              'stage1_conv_embed.2.weight': (embed_dims, ),
              'stage1_conv_embed.2.bias': (embed_dims, )}
    for k, depth in enumerate(depths, start=1):
        dim = embed_dims * 2**(k - 1)
        last = k == len(depths)
        for j in range(depth):
            p = f'stage{k}.{j}.'
            shapes.update({
                p + 'qkv.weight': (3 * dim, dim), p + 'qkv.bias': (3 * dim, ),
                p + 'norm1.weight': (dim, ), p + 'norm1.bias': (dim, ),
                p + 'proj.weight': (dim, dim), p + 'proj.bias': (dim, ),
                p + 'norm2.weight': (dim, ), p + 'norm2.bias': (dim, ),
                p + 'mlp.fc1.weight': (4 * dim, dim), p + 'mlp.fc1.bias': (4 * dim, ),
                p + 'mlp.fc2.weight': (dim, 4 * dim), p + 'mlp.fc2.bias': (dim, ),
            })
            branch_dim = dim if last else dim // 2
            for b in range(1 if last else 2):
                shapes[p + f'attns.{b}.get_v.weight'] = (branch_dim, 1, 3, 3)
                shapes[p + f'attns.{b}.get_v.bias'] = (branch_dim, )
            if j in fsla_blocks[k - 1]:
                shapes.update({
                    p + 'content_attn.qkv.weight': (3 * dim, dim),
                    p + 'content_attn.qkv.bias': (3 * dim, ),
                    p + 'content_attn.proj.weight': (dim, dim),
                    p + 'content_attn.proj.bias': (dim, ),
                    p + 'content_attn.get_v.weight': (dim, 1, 3, 3),
                    p + 'content_attn.get_v.bias': (dim, ),
                    p + 'norm3.weight': (dim, ), p + 'norm3.bias': (dim, ),
                })
        if not last:
            shapes[f'merge{k}.conv.weight'] = (2 * dim, dim, 3, 3)
            shapes[f'merge{k}.conv.bias'] = (2 * dim, )
            shapes[f'merge{k}.norm.weight'] = (2 * dim, )
            shapes[f'merge{k}.norm.bias'] = (2 * dim, )
    last_dim = embed_dims * 2**(len(depths) - 1)
    shapes.update({'norm.weight': (last_dim, ), 'norm.bias': (last_dim, ),
                   'head.weight': (num_classes, last_dim), 'head.bias': (num_classes, )})
    return shapes


def synthetic(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 9, s, generator=gen) if k.endswith('relative_position_index')
                else torch.randn(s, generator=gen)) for k, s in shapes.items()}


def backbone_part(state_dict):
    return {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}


def check_loadable(path, expected):
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {'state_dict', 'meta'}
    assert all(isinstance(v, (str, int)) for v in loaded['meta'].values())
    for key, value in expected.items():
        torch.testing.assert_close(loaded['state_dict'][key], value)
    return loaded


SWIN_SMALL = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
CSWIN_SMALL = dict(embed_dims=16, depths=(1, 2, 2, 1), num_heads=(2, 2, 4, 4),
                   stripe_widths=(1, 2, 3, 3))


def test_boat_swin_converter_strict_load_and_cli(tmp_path):
    tool = load_tool('boat_swin_to_mmboat')
    fsla_blocks = [[1], [1], [1], []]  # maps 16, 8, 4, 2 with window 2
    official = synthetic(official_boat_swin(16, (2, 2, 2, 2), (1, 2, 2, 4), 2, fsla_blocks,
                                            img_size=64))
    src = tmp_path / 'boat_swin.pth'
    torch.save({'model': official, 'epoch': 300}, src)
    dst = tmp_path / 'out' / 'converted.pth'
    tool.main([str(src), str(dst)])
    loaded = check_loadable(dst, {'backbone.norm3.weight': official['norm.weight'],
                                  'head.fc.weight': official['head.weight'],
                                  'backbone.layers.0.blocks.1.attnC.get_v.weight':
                                  official['layers.0.blocks.1.attnC.get_v.weight']})
    assert 'fsla_blocks=[[1], [1], [1], []]' in loaded['meta']['arch']
    state = loaded['state_dict']
    assert not [k for k in state if 'relative_position_index' in k or 'attn_mask' in k]
    model = BOATSwinTransformer(arch=SWIN_SMALL, window_size=2, img_size=64,
                                fsla_cfg=dict(cluster_size=8, overlap=2))
    model.load_state_dict(backbone_part(state), strict=True)
    assert set(state) - {'backbone.' + k for k in model.state_dict()} == {
        'head.fc.weight', 'head.fc.bias'}


def test_boat_swin_converter_into_mmpretrain_classifier(tmp_path):
    pytest.importorskip('mmpretrain')
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    tool = load_tool('boat_swin_to_mmboat')
    official = synthetic(official_boat_swin(16, (2, 2, 2, 2), (1, 2, 2, 4), 2,
                                            [[1], [1], [1], []], img_size=64, num_classes=10))
    state = tool.convert({'model': official})['state_dict']
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        classifier = MODELS.build(dict(
            type='ImageClassifier',
            backbone=dict(type='mmboat.BOATSwinTransformer', arch=SWIN_SMALL, window_size=2,
                          img_size=64, fsla_cfg=dict(cluster_size=8, overlap=2)),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10, in_channels=128)))
    classifier.load_state_dict(state, strict=True)


@pytest.mark.parametrize('arch,fsla_blocks', [
    ('tiny', [[1], [1], [1, 3, 5], []]),
    ('base', [[1], [1], list(range(1, 18, 2)), []]),
])
def test_boat_swin_converter_released_sizes(arch, fsla_blocks):
    tool = load_tool('boat_swin_to_mmboat')
    cfg = BOATSwinTransformer.arch_zoo[arch]
    shapes = official_boat_swin(cfg['embed_dims'], cfg['depths'], cfg['num_heads'], 7,
                                fsla_blocks, num_classes=1000)
    official = {k: torch.empty(s, device='meta') for k, s in shapes.items()}
    state = tool.convert_state_dict(official)
    with torch.device('meta'):
        model = BOATSwinTransformer(arch=arch)
    expected = {'backbone.' + k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected.update({'head.fc.weight': (1000, cfg['embed_dims'] * 8), 'head.fc.bias': (1000, )})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_boat_cswin_converter_strict_load_and_ema(tmp_path):
    tool = load_tool('boat_cswin_to_mmboat')
    fsla_blocks = [[0], [0], [0], [0]]
    shapes = official_boat_cswin(16, (1, 2, 2, 1), fsla_blocks)
    raw, ema = synthetic(shapes, seed=0), synthetic(shapes, seed=1)
    src = tmp_path / 'boat_cswin.pth.tar'
    torch.save({'state_dict': raw, 'state_dict_ema': ema, 'epoch': 299}, src)
    for use_ema, weights in ((False, raw), (True, ema)):
        dst = tmp_path / f'converted_{use_ema}.pth'
        tool.main([str(src), str(dst)] + (['--ema'] if use_ema else []))
        loaded = check_loadable(dst, {
            'backbone.stage1_conv_embed.conv.weight': weights['stage1_conv_embed.0.weight'],
            'backbone.stage1_conv_embed.norm.bias': weights['stage1_conv_embed.2.bias'],
            'backbone.norm3.weight': weights['norm.weight'],
            'head.fc.bias': weights['head.bias'],
            'backbone.stage3.0.content_attn.qkv.weight':
            weights['stage3.0.content_attn.qkv.weight']})
        assert loaded['meta']['weights'] == ('state_dict_ema' if use_ema else 'state_dict')
        model = BOATCSWinTransformer(arch=CSWIN_SMALL, fsla_cfg=dict(cluster_size=8, overlap=2))
        model.load_state_dict(backbone_part(loaded['state_dict']), strict=True)


@pytest.mark.parametrize('arch', ['tiny', 'small'])
def test_boat_cswin_converter_released_sizes(arch):
    tool = load_tool('boat_cswin_to_mmboat')
    cfg = BOATCSWinTransformer.arch_zoo[arch]
    fsla_blocks = [list(range(0, d, 2)) for d in cfg['depths']]
    shapes = official_boat_cswin(cfg['embed_dims'], cfg['depths'], fsla_blocks, 1000)
    state = tool.convert_state_dict({k: torch.empty(s, device='meta') for k, s in shapes.items()})
    with torch.device('meta'):
        model = BOATCSWinTransformer(arch=arch)
    expected = {'backbone.' + k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected.update({'head.fc.weight': (1000, cfg['embed_dims'] * 8), 'head.fc.bias': (1000, )})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_converter_errors(tmp_path):
    swin = load_tool('boat_swin_to_mmboat')
    cswin = load_tool('boat_cswin_to_mmboat')
    with pytest.raises(ValueError, match='not a BOAT-Swin checkpoint'):
        swin.convert({'model': {'stage1.0.qkv.weight': torch.zeros(1)}})
    with pytest.raises(KeyError, match="unexpected key 'pos_embed'"):
        swin.convert({'model': {'layers.0.blocks.0.norm1.weight': torch.zeros(1),
                                'pos_embed': torch.zeros(1)}})
    with pytest.raises(ValueError, match='not a BOAT-CSWin checkpoint'):
        cswin.convert({'state_dict': {'layers.0.blocks.0.norm1.weight': torch.zeros(1)}})
    with pytest.raises(KeyError, match='state_dict_ema'):
        cswin.convert({'state_dict': {'stage1_conv_embed.0.weight': torch.zeros(1)}},
                      use_ema=True)
    src = tmp_path / 'pickled.pth'
    torch.save({'model': {}, 'args': torch.nn.Identity()}, src)  # a non-tensor pickled object
    with pytest.raises(RuntimeError, match='--trust-checkpoint'):
        swin.load_official(str(src))
