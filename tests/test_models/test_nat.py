"""NAT / DiNAT backbones and the NeighborhoodAttention2d layer."""
import math
import re
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmboat.models import NAT, DiNAT, NeighborhoodAttention2d
from mmboat.models.backbones.nat import DILATION_SCHEDULES, resolve_dilations
from mmboat.ops import neighborhood_attention_op_available
from mmboat.registry import MODELS

# A 4-stage arch small enough for CPU tests (kernel 3).
SMALL_ARCH = dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2.)


def small_nat(**kwargs) -> NAT:
    cfg = dict(arch=deepcopy(SMALL_ARCH), kernel_size=3, drop_path_rate=0.)
    cfg.update(kwargs)
    return NAT(**cfg)


def ceil_div(x: int, d: int) -> int:
    return -(-x // d)


# ----------------------------------------------------------------------------------------------
# Arch zoo: parameter counts and FLOPs of the published models
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('cls, arch, params_m', [
    (NAT, 'mini', 20), (NAT, 'tiny', 28), (NAT, 'small', 51), (NAT, 'base', 90),
    (DiNAT, 'mini', 20), (DiNAT, 'tiny', 28), (DiNAT, 'small', 51), (DiNAT, 'base', 90),
    (DiNAT, 'large', 200)])
def test_arch_zoo_param_counts(cls, arch, params_m):
    with torch.device('meta'):
        model = cls(arch=arch)
    backbone = sum(p.numel() for p in model.parameters())
    head = model.num_features[-1] * 1000 + 1000  # the 1000-class linear head
    assert abs((backbone + head) / 1e6 - params_m) / params_m < 0.02


def test_arch_zoo_settings():
    assert NAT(arch='small').layer_scale == 1e-5
    assert DiNAT(arch='small').layer_scale is None  # DiNAT-Small has no layer scale
    with torch.device('meta'):
        base = DiNAT(arch='base')
    assert base.layer_scale == 1e-5
    assert base.levels[0].blocks[0].gamma1.shape == (128, )
    nat = NAT(arch='mini')
    assert nat.dilations == [[1] * 3, [1] * 4, [1] * 6, [1] * 5]
    assert nat.levels[0].blocks[1].gamma1 is None
    dinat = DiNAT(arch='mini')
    assert dinat.dilations == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5]
    assert dinat.levels[0].blocks[1].attn.dilation == 8


def test_dilation_schedules_match_spec():
    tiny = [3, 4, 18, 5]
    assert resolve_dilations('coco', tiny) == [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3,
                                               [1, 3, 1, 3, 1]]
    assert resolve_dilations('ade20k', tiny) == [[1, 16, 1], [1, 4, 1, 8],
                                                 [1, 2, 1, 3, 1, 4] * 3, [1, 2, 1, 2, 1]]
    assert resolve_dilations('imagenet', tiny)[2] == [1, 2] * 9
    assert resolve_dilations(None, [1, 2]) == [[1], [1, 1]]
    assert resolve_dilations(3, [1, 2]) == [[3], [3, 3]]
    assert set(DILATION_SCHEDULES) == {'imagenet', 'coco', 'ade20k'}


@pytest.mark.parametrize('dilations, message', [
    ('cityscapes', 'Unknown dilation schedule'),
    ([[1], [1, 2, 1], [1], [1]], r'dilations\[1\] has 3 entries but stage 1 has 2 blocks'),
    ([[1], [1, 2]], 'dilations has 2 stages but the arch has 4'),
    ([[1], [1, 0], [1], [1]], r'dilations\[1\] must hold ints >= 1'),
    (0, 'dilations must be >= 1'),
])
def test_bad_dilations(dilations, message):
    with pytest.raises(ValueError, match=message):
        NAT(arch=deepcopy(SMALL_ARCH), kernel_size=3, dilations=dilations)


def test_named_schedule_needs_tiling_depths():
    with pytest.raises(ValueError, match=r"schedule 'coco': stage 2 pattern .* does not tile 4"):
        NAT(arch=dict(SMALL_ARCH, depths=[3, 4, 4, 5]), dilations='coco')
    with pytest.raises(ValueError, match='has 4 stages but the arch has 2'):
        NAT(arch=dict(SMALL_ARCH, depths=[3, 4], num_heads=[1, 2]), dilations='imagenet',
            out_indices=(1, ))  # a valid output, so that only the schedule is wrong


@pytest.mark.parametrize('arch, message', [
    ('huge', "Arch 'huge' is not in the arch zoo of NAT"),
    (dict(embed_dims=16, depths=[1, 1]), r"missing \['mlp_ratio', 'num_heads'\]"),
    (dict(SMALL_ARCH, window_size=7), r"unknown \['window_size'\]"),
    (dict(SMALL_ARCH, num_heads=[1, 2]), 'must be non-empty and of equal length'),
    (dict(SMALL_ARCH, num_heads=[3, 2, 2, 4]), 'stage 0 has 1 blocks and 3 heads for 16'),
])
def test_bad_arch(arch, message):
    with pytest.raises(ValueError, match=message):
        NAT(arch=arch)
    with pytest.raises(TypeError, match='arch must be a str or a dict'):
        NAT(arch=['tiny'])


def test_bad_constructor_args():
    with pytest.raises(ValueError, match='out_indices entry 4 is out of range for 4 stages'):
        small_nat(out_indices=(0, 4))
    with pytest.raises(ValueError, match=r'frozen_stages must be in \[-1, 4\], got 5'):
        small_nat(frozen_stages=5)
    with pytest.raises(ValueError, match='kernel_size has 2 entries but the arch has 4 stages'):
        small_nat(kernel_size=[3, 3])
    with pytest.raises(ValueError, match='kernel_size must be an odd int >= 3'):
        small_nat(kernel_size=4)
    with pytest.raises(TypeError, match='__init__'):
        NAT(arch='tiny', window_size=7)  # no kwargs sponge


# ----------------------------------------------------------------------------------------------
# Parameter names of the released checkpoints (docs/models.md)
# ----------------------------------------------------------------------------------------------
def test_parameter_names_follow_released_layout():
    model = small_nat(arch=dict(SMALL_ARCH, layer_scale=1e-5), out_indices=(0, 1, 2, 3))
    names = set(model.state_dict())
    C = SMALL_ARCH['embed_dims']
    expected = {
        'patch_embed.proj.0.weight': (C // 2, 3, 3, 3), 'patch_embed.proj.0.bias': (C // 2, ),
        'patch_embed.proj.1.weight': (C, C // 2, 3, 3), 'patch_embed.proj.1.bias': (C, ),
        'patch_embed.norm.weight': (C, ),
        'levels.0.blocks.0.attn.qkv.weight': (3 * C, C),
        'levels.0.blocks.0.attn.rpb': (1, 5, 5),
        'levels.0.blocks.0.attn.proj.weight': (C, C),
        'levels.1.blocks.1.mlp.fc1.weight': (4 * C, 2 * C),
        'levels.1.blocks.1.mlp.fc2.weight': (2 * C, 4 * C),
        'levels.1.blocks.1.gamma1': (2 * C, ), 'levels.1.blocks.1.gamma2': (2 * C, ),
        'levels.1.blocks.1.norm1.weight': (2 * C, ), 'levels.1.blocks.1.norm2.bias': (2 * C, ),
        'levels.2.downsample.reduction.weight': (8 * C, 4 * C, 3, 3),
        'levels.2.downsample.norm.weight': (8 * C, ),
        'norm0.weight': (C, ), 'norm3.weight': (8 * C, ),
    }
    state = model.state_dict()
    for name, shape in expected.items():
        assert tuple(state[name].shape) == shape, name
    assert 'levels.2.downsample.reduction.bias' not in names
    assert not any(n.startswith('levels.3.downsample') for n in names)
    pattern = re.compile(r'^(patch_embed\.(proj\.[01]|norm)|norm\d|levels\.\d\.(downsample\.'
                         r'(reduction|norm)|blocks\.\d+\.(norm1|norm2|attn\.(qkv|proj|rpb)|'
                         r'mlp\.fc[12]|gamma[12])))(\.weight|\.bias)?$')
    assert all(pattern.match(n) for n in names), sorted(n for n in names
                                                        if not pattern.match(n))


# ----------------------------------------------------------------------------------------------
# Forward: shapes, odd sizes, maps smaller than the window
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (3, ), (1, -1), 2])
def test_output_shapes(out_indices):
    model = small_nat(out_indices=out_indices).eval()
    outs = model(torch.rand(2, 3, 64, 64))
    indices = [out_indices] if isinstance(out_indices, int) else [i % 4 for i in out_indices]
    assert len(outs) == len(indices)
    for out, i in zip(outs, sorted(indices)):
        assert out.shape == (2, 16 * 2**i, 16 // 2**i, 16 // 2**i)
        assert out.is_contiguous()


@pytest.mark.parametrize('size', [(33, 47), (64, 31), (17, 9)])
def test_odd_and_dynamic_sizes(size):
    # (17, 9): stage sizes 5x3 -> 3x2 -> 2x1 -> 1x1, below k*d=3*2 from stage 1 on.
    model = small_nat(out_indices=(0, 1, 2, 3), dilations=[[2], [1, 2], [2], [1]]).eval()
    outs = model(torch.rand(1, 3, *size))
    h, w = ceil_div(ceil_div(size[0], 2), 2), ceil_div(ceil_div(size[1], 2), 2)
    for i, out in enumerate(outs):
        assert out.shape == (1, 16 * 2**i, h, w)
        assert torch.isfinite(out).all()
        h, w = ceil_div(h, 2), ceil_div(w, 2)


def test_dinat_default_dilations_and_forward():
    model = DiNAT(arch=dict(embed_dims=16, depths=[3, 4, 6, 5], num_heads=[1, 1, 2, 2],
                            mlp_ratio=1.), kernel_size=3, out_indices=(0, 3)).eval()
    assert model.levels[0].blocks[1].attn.dilation == 8
    outs = model(torch.rand(1, 3, 40, 24))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 10, 6), (1, 128, 2, 1)]


def test_registry_build():
    model = MODELS.build(dict(type='DiNAT', arch=dict(SMALL_ARCH, depths=[3, 4, 6, 5]),
                              kernel_size=3))
    assert isinstance(model, DiNAT) and model.dilations[0] == [1, 8, 1]
    with pytest.raises(ValueError, match="schedule 'imagenet': stage 0 pattern"):
        MODELS.build(dict(type='DiNAT', arch=deepcopy(SMALL_ARCH)))
    from mmengine.registry import MODELS as ROOT_MODELS
    model = ROOT_MODELS.build(dict(type='mmboat.NAT', arch='mini'))
    assert isinstance(model, NAT) and model.depths == [3, 4, 6, 5]


# ----------------------------------------------------------------------------------------------
# The attention layer against dense attention (independent of the NA op)
# ----------------------------------------------------------------------------------------------
def dense_attention_reference(layer: NeighborhoodAttention2d, x: torch.Tensor,
                              pad_to: int) -> torch.Tensor:
    """Dense MHSA over the zero-padded map (right/bottom to ``pad_to``), cropped back."""
    B, H, W, C = x.shape
    xp = x.new_zeros(B, pad_to, pad_to, C)
    xp[:, :H, :W] = x
    heads, hd = layer.num_heads, layer.head_dims
    qkv = layer.qkv(xp.reshape(B, -1, C)).reshape(B, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=layer.scale)
    out = out.transpose(1, 2).reshape(B, pad_to, pad_to, C)[:, :H, :W]
    return layer.proj(out)


@pytest.mark.parametrize('size', [(7, 7), (5, 3), (7, 2), (1, 1)])
def test_layer_pads_small_maps_like_dense_attention(size):
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(embed_dims=8, num_heads=2, kernel_size=7).double()
    with torch.no_grad():
        layer.rpb.zero_()
        layer.qkv.bias.normal_()  # padded tokens carry the qkv bias
    x = torch.randn(2, *size, 8, dtype=torch.float64)
    # k == padded size on both axes: every query sees the whole padded 7x7 map.
    torch.testing.assert_close(layer(x), dense_attention_reference(layer, x, 7))


def test_layer_dilated_padding_window():
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(embed_dims=8, num_heads=2, kernel_size=3, dilation=3).double()
    with torch.no_grad():
        layer.rpb.zero_()
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    # H=4 is padded to 9; on a 9x9 map with k=3, d=3 each query sees its whole dilation group.
    # Compare with dense attention restricted to the group by feeding each group separately.
    out = layer(x)
    xp = F.pad(x, (0, 0, 0, 0, 0, 5))
    for gi in range(3):
        for gj in range(3):
            sub = xp[:, gi::3, gj::3]  # a 3x3 group == window: dense attention inside it
            ref = dense_attention_reference(layer, sub, 3)
            rows = [r for r in range(gi, 4, 3)]
            got = out[:, gi::3, gj::3][:, :len(rows)]
            torch.testing.assert_close(got, ref[:, :len(rows)])


def test_layer_bad_input_message():
    layer = NeighborhoodAttention2d(embed_dims=8, num_heads=2, kernel_size=3)
    with pytest.raises(ValueError, match=r'expects \[B, H, W, C=8\] .* got shape \(1, 8, 5, 5\)'):
        layer(torch.rand(1, 8, 5, 5))
    with pytest.raises(ValueError, match='embed_dims .10. must be a positive multiple of '
                       'num_heads .3.'):
        NeighborhoodAttention2d(embed_dims=10, num_heads=3)
    with pytest.raises(ValueError, match='dilation must be an int >= 1'):
        NeighborhoodAttention2d(embed_dims=8, num_heads=2, dilation=0)


def test_layer_rpb_init_and_attn_drop_path():
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(embed_dims=8, num_heads=2, kernel_size=3, attn_drop=0.5)
    assert layer.rpb.shape == (2, 5, 5)
    assert 0.005 < layer.rpb.std().item() < 0.05
    x = torch.rand(1, 6, 6, 8)
    layer.eval()
    ref = layer(x)
    layer.train()
    out = layer(x)  # unfused path with attention dropout
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    out.sum().backward()
    assert layer.rpb.grad is not None and layer.rpb.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Training surface: frozen stages, norm_eval, with_cp, init, layer depth
# ----------------------------------------------------------------------------------------------
def frozen_modules(model: NAT, frozen_stages: int):
    frozen = []
    if frozen_stages >= 0:
        frozen.append(model.patch_embed)
    for i in range(frozen_stages):
        frozen.append(model.levels[i])
        frozen.append(getattr(model, f'norm{i}'))
    return frozen


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 3, 4])
def test_frozen_stages(frozen_stages):
    torch.manual_seed(0)
    model = small_nat(out_indices=(0, 1, 2, 3), frozen_stages=frozen_stages,
                      drop_rate=0.1, drop_path_rate=0.1)
    model.init_weights()
    model.train()
    frozen = frozen_modules(model, frozen_stages)
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    for module in frozen:
        assert all(not m.training for m in module.modules())
    for name, param in model.named_parameters():
        assert param.requires_grad == (id(param) not in frozen_ids), name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad] or
                                [nn.Parameter(torch.zeros(1))], lr=0.1)
    loss = sum(out.square().mean() for out in model(torch.rand(2, 3, 32, 32)))
    if frozen_stages == 4:
        assert not loss.requires_grad  # nothing left to train
    else:
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    frozen_names = {n for n, p in model.named_parameters() if id(p) in frozen_ids}
    for name in before:
        if name in frozen_names:
            assert torch.equal(before[name], after[name]), name
    trainable = [n for n, p in model.named_parameters() if id(p) not in frozen_ids]
    assert all(not torch.equal(before[n], after[n]) for n in trainable
               if n.endswith('.weight') and 'norm' not in n)
    assert bool(trainable) == (frozen_stages < 4)
    # train() after eval() re-freezes
    model.eval()
    model.train()
    for module in frozen:
        assert all(not m.training for m in module.modules())
    if frozen_stages < 4:
        assert model.levels[max(frozen_stages, 0)].training


def test_norm_eval():
    model = small_nat(norm_eval=True)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(not m.training for m in norms)
    assert model.levels[1].blocks[0].mlp.training
    model = small_nat(norm_eval=False).train()
    assert all(m.training for m in model.modules() if isinstance(m, nn.LayerNorm))


def test_with_cp_same_output_and_gradients():
    torch.manual_seed(0)
    model = small_nat(out_indices=(0, 1, 2, 3), arch=dict(SMALL_ARCH, layer_scale=0.5))
    model_cp = small_nat(out_indices=(0, 1, 2, 3), arch=dict(SMALL_ARCH, layer_scale=0.5),
                         with_cp=True)
    model_cp.load_state_dict(model.state_dict())
    assert all(block.with_cp for level in model_cp.levels for block in level.blocks)
    x = torch.rand(2, 3, 40, 36)
    outs = model(x)
    outs_cp = model_cp(x)
    for a, b in zip(outs, outs_cp):
        torch.testing.assert_close(a, b)
    sum(o.square().sum() for o in outs).backward()
    sum(o.square().sum() for o in outs_cp).backward()
    grads = dict(model.named_parameters())
    for name, param in model_cp.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, msg=name)


def test_init_weights_default_and_pretrained(tmp_path):
    torch.manual_seed(0)
    model = small_nat(out_indices=(0, 1, 2, 3))
    model.init_weights()
    qkv = model.levels[2].blocks[0].attn.qkv
    assert 0.01 < qkv.weight.std().item() < 0.03 and torch.all(qkv.bias == 0)
    assert torch.all(model.norm1.weight == 1)
    checkpoint = tmp_path / 'nat.pth'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in model.state_dict().items()},
                'meta': {'note': 'synthetic'}}, checkpoint)

    loaded = small_nat(out_indices=(0, 1, 2, 3), init_cfg=dict(
        type='Pretrained', checkpoint=str(checkpoint), prefix='backbone.'))
    loaded.init_weights()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)


def test_get_layer_depth():
    model = small_nat()  # depths [1, 2, 1, 1]: 5 blocks, 7 layers
    assert model.get_layer_depth('backbone.patch_embed.proj.0.weight', 'backbone.') == (0, 7)
    assert model.get_layer_depth('backbone.levels.0.blocks.0.attn.rpb', 'backbone.') == (1, 7)
    assert model.get_layer_depth('backbone.levels.1.blocks.1.mlp.fc1.weight',
                                 'backbone.') == (3, 7)
    assert model.get_layer_depth('backbone.levels.1.downsample.reduction.weight',
                                 'backbone.') == (3, 7)
    assert model.get_layer_depth('backbone.levels.3.blocks.0.norm1.weight',
                                 'backbone.') == (5, 7)
    assert model.get_layer_depth('backbone.norm3.weight', 'backbone.') == (6, 7)
    assert model.get_layer_depth('head.fc.weight', 'backbone.') == (6, 7)
    # every parameter gets a depth within range
    for name, _ in model.named_parameters():
        depth, total = model.get_layer_depth(name)
        assert 0 <= depth < total


# ----------------------------------------------------------------------------------------------
# FLOPs through mmengine's analyzer
# ----------------------------------------------------------------------------------------------
def na_macs(heads, h, w, k, head_dim, b=1):
    return 2 * b * heads * h * w * k * k * head_dim


@pytest.mark.parametrize('impl', ['reference', None])
def test_flop_handle_counts_neighborhood_attention(impl):
    from mmengine.analysis import FlopAnalyzer, get_model_complexity_info
    layer = NeighborhoodAttention2d(embed_dims=16, num_heads=2, kernel_size=3, dilation=2,
                                    impl=impl).eval()
    x = torch.rand(2, 5, 9, 16)  # H padded to 6
    analyzer = FlopAnalyzer(layer, (x, ))
    analyzer.unsupported_ops_warnings(False)
    by_op = analyzer.by_operator()
    assert by_op['na2d_traced'] == na_macs(2, 6, 9, 3, 8, b=2)
    assert by_op['linear'] == 2 * 6 * 9 * 16 * 48 + 2 * 5 * 9 * 16 * 16
    info = get_model_complexity_info(layer, inputs=(x, ), show_table=False, show_arch=False)
    assert info['flops'] == analyzer.total()


needs_compiled_na = pytest.mark.skipif(
    not neighborhood_attention_op_available('na2d_forward'),
    reason='mmboat._ext has no CPU na2d kernels')


@needs_compiled_na
def test_flop_handle_counts_compiled_op():
    from mmengine.analysis import FlopAnalyzer
    layer = NeighborhoodAttention2d(embed_dims=16, num_heads=2, kernel_size=3, dilation=2,
                                    impl='ext').eval()
    analyzer = FlopAnalyzer(layer, (torch.rand(2, 5, 9, 16), ))
    analyzer.unsupported_ops_warnings(False)
    assert analyzer.by_operator()['na2d_traced'] == na_macs(2, 6, 9, 3, 8, b=2)


@needs_compiled_na
def test_compiled_and_reference_backbones_agree():
    torch.manual_seed(0)
    model = small_nat(out_indices=(0, 1, 2, 3), dilations=[[2], [1, 2], [2], [1]],
                      impl='ext').double()
    reference = small_nat(out_indices=(0, 1, 2, 3), dilations=[[2], [1, 2], [2], [1]],
                          impl='reference').double()
    reference.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 37, 29, dtype=torch.float64)
    outs, ref_outs = model(x), reference(x)
    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref)
    sum(o.sum() for o in outs).backward()
    sum(o.sum() for o in ref_outs).backward()
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, msg=name)


def classifier(arch: str) -> nn.Module:

    class Classifier(nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = NAT(arch=arch)
            self.fc = nn.Linear(self.backbone.num_features[-1], 1000)

        def forward(self, x):
            return self.fc(self.backbone(x)[-1].mean((2, 3)))

    return Classifier().eval()


@pytest.mark.slow
@pytest.mark.parametrize('arch, gmacs', [('mini', 2.7), ('tiny', 4.3)])
def test_published_flops(arch, gmacs):
    from mmengine.analysis import FlopAnalyzer
    model = classifier(arch)
    analyzer = FlopAnalyzer(model, (torch.rand(1, 3, 224, 224), ))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    assert round(analyzer.total() / 1e9, 1) == gmacs
    na = sum(v for k, v in analyzer.by_operator().items() if k.startswith('na'))
    b = model.backbone
    expected = sum(
        depth * na_macs(heads, math.ceil(56 / 2**i), math.ceil(56 / 2**i), 7,
                        b.num_features[i] // heads)
        for i, (depth, heads) in enumerate(zip(b.depths, b.num_heads)))
    assert na == expected
