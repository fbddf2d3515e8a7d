"""BOAT-Swin / BOAT-CSWin backbones and their window, stripe and feature-space attention layers."""
import copy
import math

import pytest
import torch

import mmboat.ops  # noqa: F401  (loads the compiled ops when built)
from mmboat.models.backbones.boat_cswin import BOATCSWinTransformer
from mmboat.models.backbones.boat_swin import BOATSwinTransformer
from mmboat.models.layers.cswin_attention import StripeAttention
from mmboat.models.layers.feature_space_attention import FeatureSpaceLocalAttention
from mmboat.models.layers.window_attention import ShiftedWindowAttention
from mmboat.registry import MODELS

SWIN_SMALL_ARCH = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
CSWIN_SMALL_ARCH = dict(embed_dims=16, depths=(1, 2, 2, 1), num_heads=(2, 2, 4, 4),
                        stripe_widths=(1, 2, 3, 3))
FSLA_SMALL = dict(fsla_cfg=dict(cluster_size=8, overlap=3))


def small_swin(**kwargs):
    cfg = dict(arch=SWIN_SMALL_ARCH, window_size=4, img_size=64, drop_path_rate=0.,
               out_indices=(0, 1, 2, 3), **FSLA_SMALL)
    cfg.update(kwargs)
    model = BOATSwinTransformer(**cfg)
    model.init_weights()  # as a runner does
    return model


def small_cswin(**kwargs):
    cfg = dict(arch=CSWIN_SMALL_ARCH, drop_path_rate=0., out_indices=(0, 1, 2, 3), **FSLA_SMALL)
    cfg.update(kwargs)
    model = BOATCSWinTransformer(**cfg)
    model.init_weights()
    return model


BUILDERS = {'swin': small_swin, 'cswin': small_cswin}


def fsla_params(c: int) -> int:
    return 4 * c * c + 16 * c


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_attention(q, k, v, allowed, bias=None, scale=None):
    """Plain softmax attention over all tokens with a boolean [N, N] visibility matrix."""
    scale = q.shape[-1]**-0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~allowed, float('-inf'))
    return logits.softmax(-1) @ v


# --------------------------------------------------------------------------------------------
# Layers against dense references built from coordinates


@pytest.mark.parametrize('hw,window,shift', [((9, 11), 4, False), ((9, 11), 4, True),
                                             ((8, 8), 4, True), ((3, 6), 4, True)])
def test_window_attention_matches_dense_reference(hw, window, shift):
    torch.manual_seed(0)
    H, W = hw
    attn = ShiftedWindowAttention(8, 2, window_size=window).double().eval()
    x = torch.randn(2, H * W, 8, dtype=torch.float64)
    out = attn(x, hw, shift=shift)

    # Swin's rule from coordinates: windows on the (cyclically shifted) padded map, and the three
    # shift regions per axis on the shifted map.
    w = window
    s = w // 2 if shift else 0
    if min(H, W) <= window:
        w, s = min(H, W), 0
    Hp, Wp = math.ceil(H / w) * w, math.ceil(W / w) * w
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    ry, rx = (ys - s) % Hp, (xs - s) % Wp

    def region(r, size):
        return (r >= size - w).long() + (r >= size - s).long() if s else torch.zeros_like(r)

    key = torch.stack([ry // w, rx // w, region(ry, Hp), region(rx, Wp)], 1)
    allowed = (key[:, None] == key[None]).all(-1)
    dy = ys[:, None] - ys[None]
    dx = xs[:, None] - xs[None]
    table = attn.relative_position_bias_table
    index = ((dy + window - 1) * (2 * window - 1) + dx + window - 1).where(allowed, 0)
    bias = table[index].permute(2, 0, 1)
    q, k, v = attn.qkv(x).reshape(2, H * W, 3, 2, 4).permute(2, 0, 3, 1, 4)
    ref = dense_attention(q, k, v, allowed, bias=bias.masked_fill(~allowed, 0))
    ref = attn.proj(ref.transpose(1, 2).reshape(2, H * W, 8))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize('direction', ['vertical', 'horizontal', 'full'])
@pytest.mark.parametrize('hw', [(6, 4), (5, 7)])
def test_stripe_attention_matches_dense_reference(direction, hw):
    torch.manual_seed(0)
    H, W = hw
    sw = 3
    attn = StripeAttention(8, 2, stripe_width=sw, direction=direction).double()
    q, k, v = torch.randn(3, 2, H * W, 8, dtype=torch.float64).unbind(0)
    out = attn(q, k, v, hw)

    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    stripe = {'vertical': xs // sw, 'horizontal': ys // sw, 'full': torch.zeros_like(xs)}
    allowed = stripe[direction][:, None] == stripe[direction][None]
    heads = [t.reshape(2, H * W, 2, 4).transpose(1, 2) for t in (q, k, v)]
    ref = dense_attention(*heads, allowed).transpose(1, 2).reshape(2, H * W, 8)
    # LePE: the depthwise conv applied to each stripe on its own (zero padding at its borders).
    v_map = v.transpose(1, 2).reshape(2, 8, H, W)
    lepe = torch.zeros_like(v_map)
    step = {'vertical': (H, sw), 'horizontal': (sw, W), 'full': (H, W)}[direction]
    for y0 in range(0, H, step[0]):
        for x0 in range(0, W, step[1]):
            sl = (slice(None), slice(None), slice(y0, y0 + step[0]), slice(x0, x0 + step[1]))
            lepe[sl] = attn.get_v(v_map[sl])
    ref = ref + lepe.flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_fsla_single_cluster_is_global_attention():
    """With N <= cluster_size there is one cluster: FSLA is global attention + get_v."""
    torch.manual_seed(0)
    H, W = 3, 5
    attn = FeatureSpaceLocalAttention(8, 2, cluster_size=16, overlap=4, qk_scale=0.7).double()
    x = torch.randn(2, H * W, 8, dtype=torch.float64)
    out = attn(x, (H, W))
    q, k, v = attn.qkv(x).reshape(2, H * W, 3, 2, 4).permute(2, 0, 3, 1, 4)
    ref = dense_attention(q, k, v, torch.ones(H * W, H * W, dtype=torch.bool), scale=0.7)
    v_map = v.transpose(1, 2).reshape(2, H * W, 8).transpose(1, 2).reshape(2, 8, H, W)
    ref = ref.transpose(1, 2).reshape(2, H * W, 8) + attn.get_v(v_map).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, attn.proj(ref))


def test_fsla_clusters_in_float32_without_grad_under_autocast():
    torch.manual_seed(0)
    attn = FeatureSpaceLocalAttention(8, 2, cluster_size=4, overlap=2)
    x = torch.randn(2, 7 * 5, 8)
    q = attn.qkv(x).reshape(2, 35, 3, 2, 4).permute(2, 0, 3, 1, 4)[0]
    perm32, inv32 = attn.cluster(q)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        perm_ac, _ = attn.cluster(q)
        out = attn(x, (7, 5))
    assert perm_ac.dtype == torch.int64 and not perm_ac.requires_grad
    torch.testing.assert_close(perm_ac, perm32)
    torch.testing.assert_close(torch.gather(perm32, -1, inv32), torch.arange(35).expand(2, 2, 35))
    assert torch.isfinite(out).all()


def test_fsla_compiled_and_reference_impls_agree():
    if not hasattr(torch.ops.mmboat, 'bhc_cluster'):
        pytest.skip('the compiled FSLA ops are not built')
    torch.manual_seed(0)
    fast = FeatureSpaceLocalAttention(16, 2, cluster_size=6, overlap=2, impl='ext')
    ref = FeatureSpaceLocalAttention(16, 2, cluster_size=6, overlap=2, impl='reference')
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 7 * 9, 16, requires_grad=True)
    out_fast = fast(x, (7, 9))
    out_ref = ref(x, (7, 9))
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    grad_fast, = torch.autograd.grad(out_fast.square().sum(), x)
    grad_ref, = torch.autograd.grad(out_ref.square().sum(), x)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-4, atol=1e-5)


def test_fsla_gradients_reach_every_parameter():
    torch.manual_seed(0)
    attn = FeatureSpaceLocalAttention(8, 2, cluster_size=4, overlap=2)
    attn(torch.randn(2, 6 * 6, 8), (6, 6)).square().sum().backward()
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_layer_bad_inputs_give_clear_errors():
    attn = FeatureSpaceLocalAttention(8, 2)
    with pytest.raises(ValueError, match='hw_shape'):
        attn(torch.randn(1, 10, 8), (3, 4))
    with pytest.raises(ValueError, match='divisible'):
        FeatureSpaceLocalAttention(9, 2)
    with pytest.raises(ValueError, match='attn_drop'):
        FeatureSpaceLocalAttention(8, 2, attn_drop=0.1)
    with pytest.raises(ValueError, match='direction'):
        StripeAttention(8, 2, 2, direction='diagonal')
    with pytest.raises(ValueError, match='hw_shape'):
        ShiftedWindowAttention(8, 2, 4)(torch.randn(1, 10, 8), (3, 4))


# --------------------------------------------------------------------------------------------
# Backbones


@pytest.mark.parametrize('name', ['swin', 'cswin'])
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (3, ), (1, 2)])
def test_output_shapes(name, out_indices):
    model = BUILDERS[name](out_indices=out_indices).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert len(outs) == len(out_indices)
    for out, i in zip(outs, out_indices):
        assert out.shape == (1, 16 * 2**i, 16 // 2**i, 16 // 2**i)


@pytest.mark.parametrize('name,expected', [
    ('swin', [(17, 25), (9, 13), (5, 7), (3, 4)]),  # ceil(65/4) = 17, then ceil(/2)
    ('cswin', [(16, 24), (8, 12), (4, 6), (2, 3)]),  # conv 7x7 s4 p2, then 3x3 s2 p1
])
def test_odd_non_square_input(name, expected):
    model = BUILDERS[name]().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 65, 97))
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('name', ['swin', 'cswin'])
def test_batch_independence(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    x = torch.randn(2, 3, 44, 60)
    with torch.no_grad():
        alone = model(x[:1])
        together = model(x)
        swapped = model(x.flip(0))
    for a, t, s in zip(alone, together, swapped):
        torch.testing.assert_close(t[:1], a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s[1:], a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['swin', 'cswin'])
def test_backward_and_with_cp(name):
    torch.manual_seed(0)
    model = BUILDERS[name]()
    model_cp = BUILDERS[name](with_cp=True)
    model_cp.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 28)
    outs = model(x)
    outs_cp = model_cp(x)
    sum(o.square().mean() for o in outs).backward()
    sum(o.square().mean() for o in outs_cp).backward()
    for a, b in zip(outs, outs_cp):
        torch.testing.assert_close(a, b)
    grads = dict(model.named_parameters())
    for key, param in model_cp.named_parameters():
        assert param.grad is not None, key
        torch.testing.assert_close(param.grad, grads[key].grad, rtol=1e-4, atol=1e-6)
    fsla = [k for k in grads if 'attnC.qkv.weight' in k or 'content_attn.qkv.weight' in k]
    assert fsla and all(grads[k].grad.abs().sum() > 0 for k in fsla)


@pytest.mark.parametrize('name', ['swin', 'cswin'])
@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 3, 4])
def test_frozen_stages(name, frozen_stages):
    model = BUILDERS[name](frozen_stages=frozen_stages)
    model.train()
    stem = 'patch_embed' if name == 'swin' else 'stage1_conv_embed'

    def stage_of(param_name):
        if param_name.startswith(stem):
            return -1
        head = param_name.split('.')
        if head == ['layers']:
            return 99  # the container of all stages
        if name == 'swin':
            return int(head[1]) if head[0] == 'layers' else int(head[0][4:])
        for p in ('stage', 'merge'):
            if head[0].startswith(p):
                return int(head[0][5:]) - 1
        return int(head[0][4:])  # norm{i}

    for param_name, param in model.named_parameters():
        expect_frozen = stage_of(param_name) < frozen_stages and frozen_stages >= 0
        assert param.requires_grad != expect_frozen, param_name
    for module_name, module in model.named_modules():
        if module_name and stage_of(module_name) < frozen_stages and frozen_stages >= 0:
            assert not module.training, module_name
    if frozen_stages == -1:
        assert all(m.training for m in model.modules())


def test_bad_frozen_stages_and_arch_messages():
    with pytest.raises(ValueError, match='frozen_stages'):
        small_swin(frozen_stages=5)
    with pytest.raises(ValueError, match='not in the arch zoo'):
        BOATSwinTransformer(arch='huge')
    with pytest.raises(ValueError, match=r"missing \['num_heads'\]"):
        BOATSwinTransformer(arch=dict(embed_dims=16, depths=(2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"missing \['stripe_widths'\]"):
        BOATCSWinTransformer(arch=dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(2, ) * 4))
    with pytest.raises(ValueError, match='out_indices'):
        small_swin(out_indices=(4, ))
    with pytest.raises(ValueError, match='fsla_blocks'):
        small_cswin(fsla_blocks=[[0], [0], [5], [0]])
    with pytest.raises(ValueError, match='expected an image batch'):
        small_swin()(torch.randn(3, 32, 32))


@pytest.mark.parametrize('name', ['swin', 'cswin'])
def test_norm_eval(name):
    model = BUILDERS[name](norm_eval=True)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and not any(m.training for m in norms)
    assert model.training
    model = BUILDERS[name](norm_eval=False)
    model.train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize('name', ['swin', 'cswin'])
def test_pretrained_init_cfg(name, tmp_path):
    torch.manual_seed(0)
    source = BUILDERS[name]()
    ckpt = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()}}, ckpt)
    model = BUILDERS[name](
        init_cfg=dict(type='Pretrained', checkpoint=str(ckpt), prefix='backbone.'))
    model.init_weights()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)


def test_registry_and_fp16_safe():
    model = MODELS.build(dict(type='BOATSwinTransformer', arch=SWIN_SMALL_ARCH, window_size=4,
                              img_size=64, out_indices=(0, 3), **FSLA_SMALL))
    model.init_weights()
    model.eval()
    assert isinstance(MODELS.build(dict(type='mmboat.BOATCSWinTransformer', arch=CSWIN_SMALL_ARCH,
                                        **FSLA_SMALL)), BOATCSWinTransformer)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
    with torch.no_grad():
        ref = model(x)
    for o, r in zip(outs, ref):
        assert torch.isfinite(o).all()
        assert (o.float() - r).abs().mean() < 0.1 * r.abs().mean()


def test_fsla_placement_and_switches():
    # Released BOAT-Swin placement at 224: odd blocks of stages with maps larger than the window.
    assert BOATSwinTransformer.released_fsla_blocks((2, 2, 18, 2), (224, 224), 7) == [
        [1], [1], list(range(1, 18, 2)), []]
    model = small_swin()  # maps 16, 8, 4, 2 with window 4
    assert model.fsla_blocks == ((1, ), (1, ), (), ())
    block = model.layers[0].blocks[1]
    assert block.shift and hasattr(block, 'attnC') and hasattr(block, 'norm4')
    assert isinstance(block.fsla_drop_path, torch.nn.Identity)
    assert not hasattr(model.layers[0].blocks[0], 'attnC')
    assert small_swin(fsla_cfg=dict(cluster_size=8, overlap=3, drop_path=True), drop_path_rate=0.2).layers[1].blocks[1] \
        .fsla_drop_path.drop_prob > 0
    assert small_swin(fsla_cfg=dict(cluster_size=8, overlap=3, qk_scale=1.)).layers[0].blocks[1].attnC.scale == 1.
    cswin = small_cswin(drop_path_rate=0.2)
    assert cswin.fsla_blocks == ((0, ), (0, ), (0, ), (0, ))
    assert cswin.stage2[0].content_attn.scale == 1.  # the released BOAT-CSWin scale
    assert cswin.stage4[0].fsla_drop_path.drop_prob > 0
    assert small_cswin(fsla_cfg=dict(cluster_size=8, overlap=3, qk_scale=None)).stage2[0].content_attn.scale == 16**-0.5  # C=32, 2 heads
    assert len(cswin.stage4[0].attns) == 1 and len(cswin.stage3[0].attns) == 2
    assert [a.direction for a in cswin.stage1[0].attns] == ['vertical', 'horizontal']


@pytest.mark.parametrize('arch,num_fsla', [('tiny', 5), ('small', 11), ('base', 11)])
def test_boat_swin_param_count(arch, num_fsla):
    with torch.device('meta'):  # counting needs no memory or init
        model = BOATSwinTransformer(arch=arch)
        plain = BOATSwinTransformer(arch=arch, fsla_blocks=[[], [], [], []])
    assert model.num_fsla_modules == num_fsla
    C = model.embed_dims
    dims = [C * 2**i for i in range(4)]
    extra = sum(fsla_params(dims[i]) * len(b) for i, b in enumerate(model.fsla_blocks))
    assert num_params(model) - num_params(plain) == extra
    if arch == 'tiny':
        # Swin-T has 28.3 M parameters with its 1000-class head; BOAT-Swin-T about 30 M.
        head = 768 * 1000 + 1000
        assert abs(num_params(plain) + head - 28.29e6) < 0.01e6
        assert 29.9e6 < num_params(model) + head < 30.5e6
        mmpretrain_backbones = pytest.importorskip('mmpretrain.models.backbones')
        swin = mmpretrain_backbones.SwinTransformer(arch='tiny')
        assert num_params(plain) == num_params(swin)


@pytest.mark.parametrize('arch,num_fsla', [('tiny', 14), ('small', 20), ('base', 20)])
def test_boat_cswin_param_count(arch, num_fsla):
    with torch.device('meta'):
        model = BOATCSWinTransformer(arch=arch)
        plain = BOATCSWinTransformer(arch=arch, fsla_blocks=[[], [], [], []])
    assert model.num_fsla_modules == num_fsla
    dims = [model.embed_dims * 2**i for i in range(4)]
    extra = sum(fsla_params(dims[i]) * len(b) for i, b in enumerate(model.fsla_blocks))
    assert num_params(model) - num_params(plain) == extra


@pytest.mark.slow  # builds two Swin-T (~20 s on a shared 2-core CPU)
def test_boat_swin_without_fsla_matches_mmpretrain_swin():
    """With FSLA switched off, BOAT-Swin-T is Swin-T: same outputs as mmpretrain's at 224."""
    mmpretrain_backbones = pytest.importorskip('mmpretrain.models.backbones')
    torch.manual_seed(0)
    ref = mmpretrain_backbones.SwinTransformer(arch='tiny', out_indices=(0, 1, 2, 3))
    ref.eval()  # mmpretrain's train() returns None
    for name, param in ref.named_parameters():  # non-trivial norms and biases
        param.data.normal_(0, 0.02 if param.dim() > 1 else 0.5)
    model = BOATSwinTransformer(arch='tiny', out_indices=(0, 1, 2, 3),
                                fsla_blocks=[[], [], [], []]).eval()
    state = {}
    for key, value in ref.state_dict().items():
        if 'relative_position_index' in key:
            continue
        new = (key.replace('stages.', 'layers.').replace('patch_embed.projection',
                                                           'patch_embed.proj')
               .replace('attn.w_msa.', 'attn.').replace('ffn.layers.0.0', 'mlp.fc1')
               .replace('ffn.layers.1', 'mlp.fc2'))
        if 'downsample' in key:
            # mmpretrain's Unfold order (channel, ky, kx) -> Swin's x0..x3 concatenation.
            c = value.shape[-1] // 4
            order = torch.tensor([ch * 4 + ky * 2 + kx for ky, kx in ((0, 0), (1, 0), (0, 1),
                                                                     (1, 1)) for ch in range(c)])
            value = value[..., order]
        state[new] = value
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for a, b in zip(model(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['swin', 'cswin'])
def test_get_layer_depth(name):
    model = BUILDERS[name]()
    num_layers = sum(model.depths) + 2
    names = [n for n, _ in model.named_parameters()]
    depths = {n: model.get_layer_depth('backbone.' + n, 'backbone.')[0] for n in names}
    assert all(model.get_layer_depth('backbone.' + n, 'backbone.')[1] == num_layers for n in names)
    assert model.get_layer_depth('head.fc.weight', 'backbone.') == (num_layers - 1, num_layers)
    if name == 'swin':
        assert depths['patch_embed.proj.weight'] == 0
        assert depths['layers.1.blocks.1.attnC.qkv.weight'] == 2 + 1 + 1
        assert depths['layers.1.downsample.reduction.weight'] == 4
    else:
        assert depths['stage1_conv_embed.conv.weight'] == 0
        assert depths['stage3.1.qkv.weight'] == 1 + 2 + 1 + 1
        assert depths['merge2.conv.weight'] == 3
    assert depths['norm3.weight'] == num_layers - 1
    assert set(depths.values()) == set(range(num_layers))


def test_state_dict_has_no_derived_buffers():
    keys = small_swin().state_dict().keys()
    assert not [k for k in keys if 'relative_position_index' in k or 'attn_mask' in k]
    assert copy.deepcopy(small_swin()) is not None
