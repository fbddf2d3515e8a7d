"""The three backbone families share one toolkit (mmboat/models/utils/backbone.py, mlp.py, the
FSLA settings of mmboat/models/layers/feature_space_attention.py): the same arch, out_indices,
checkpointing, initialisation and impl behaviour, the same errors."""
import inspect
from copy import deepcopy

import pytest
import torch

from mmboat.models import NAT
from mmboat.models.backbones.boat_cswin import BOATCSWinTransformer
from mmboat.models.backbones.boat_swin import BOATSwinTransformer
from mmboat.models.layers import FeatureSpaceLocalAttention, resolve_fsla_cfg
from mmboat.models.utils import DEFAULT_INIT_CFG, MLP

SMALL = {
    NAT: dict(arch=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                        mlp_ratio=2.), kernel_size=3),
    BOATSwinTransformer: dict(arch=dict(embed_dims=16, depths=[2, 2, 2, 2],
                                        num_heads=[1, 2, 2, 4]), window_size=4, img_size=64,
                              fsla_cfg=dict(cluster_size=8, overlap=3)),
    BOATCSWinTransformer: dict(arch=dict(embed_dims=16, depths=[2, 2, 2, 2],
                                         num_heads=[2, 2, 4, 4], stripe_widths=[1, 2, 3, 3]),
                               fsla_cfg=dict(cluster_size=8, overlap=3)),
}
FAMILIES = list(SMALL)


def build(cls, **kwargs):
    return cls(**{**deepcopy(SMALL[cls]), **kwargs})


@pytest.mark.parametrize('cls', FAMILIES)
def test_same_arch_errors(cls):
    with pytest.raises(ValueError, match=f'Arch .huge. is not in the arch zoo of {cls.__name__}'):
        cls(arch='huge')
    with pytest.raises(TypeError, match='arch must be a str or a dict'):
        cls(arch=3)
    bad = dict(SMALL[cls]['arch'], extra=1)
    with pytest.raises(ValueError, match=r"Custom arch of .*unknown \['extra'\]"):
        build(cls, arch=bad)
    bad = dict(SMALL[cls]['arch'], num_heads=[1, 2, 2])
    with pytest.raises(ValueError, match='same length|equal length'):
        build(cls, arch=bad)
    bad = dict(SMALL[cls]['arch'], num_heads=[3, 2, 2, 4])  # 3 heads for 16 channels
    with pytest.raises(ValueError, match='heads dividing the channels'):
        build(cls, arch=bad)
    assert isinstance(cls(arch='TINY'), cls)  # names in any case


@pytest.mark.parametrize('cls', FAMILIES)
def test_same_out_indices_rule(cls):
    model = build(cls, out_indices=(3, -4, 0, 1))
    assert model.out_indices == (0, 1, 3)  # sorted, repeats gone, negative from the end
    outs = model.eval()(torch.rand(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [16, 32, 128]
    assert build(cls, out_indices=-1).out_indices == (3, )
    with pytest.raises(ValueError, match='out_indices entry 4 is out of range for 4 stages'):
        build(cls, out_indices=(4, ))
    with pytest.raises(TypeError, match='out_indices must be an int or a non-empty sequence'):
        build(cls, out_indices=())


@pytest.mark.parametrize('cls', FAMILIES)
def test_checkpointing_only_when_gradients_flow(cls, monkeypatch):
    torch.manual_seed(0)
    plain = build(cls, drop_path_rate=0.)
    plain.init_weights()
    cp_model = build(cls, drop_path_rate=0., with_cp=True)
    cp_model.load_state_dict(plain.state_dict())
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint',
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    with torch.no_grad():
        cp_model(x)
    assert not calls  # inference: no recomputation
    out_cp = cp_model(x)[0].sum()
    assert calls
    out = plain(x)[0].sum()
    torch.testing.assert_close(out_cp, out)
    torch.testing.assert_close(torch.autograd.grad(out_cp, x)[0], torch.autograd.grad(out, x)[0])


@pytest.mark.parametrize('cls', FAMILIES)
def test_same_initialisation(cls):
    model = build(cls)
    assert model.init_cfg == DEFAULT_INIT_CFG
    torch.manual_seed(0)
    model.init_weights()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linear])
    assert abs(float(weights.detach().std()) - 0.02) < 0.002  # truncated normal, std 0.02
    assert all(m.bias is None or not m.bias.any() for m in linear)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert mlps and all(type(m) is MLP for m in mlps)  # one MLP for every family


@pytest.mark.parametrize('cls', FAMILIES)
def test_every_backbone_takes_impl(cls):
    assert 'impl' in inspect.signature(cls.__init__).parameters
    model = build(cls, impl='reference')
    layers = [m for m in model.modules() if hasattr(m, 'impl')]
    assert layers and all(m.impl == 'reference' for m in layers)


def test_fsla_defaults_live_in_the_layer():
    layer = inspect.signature(FeatureSpaceLocalAttention.__init__).parameters
    swin = build(BOATSwinTransformer, fsla_cfg=None)
    for key in ('cluster_size', 'overlap', 'iters', 'tau', 'qk_scale'):
        assert swin.fsla_cfg[key] == layer[key].default
    assert swin.fsla_cfg['drop_path'] is False
    cswin = build(BOATCSWinTransformer, fsla_cfg=dict(tau=50.))
    # The released BOAT-CSWin weights' compatibility defaults, then the user's settings.
    assert cswin.fsla_cfg == dict(swin.fsla_cfg, qk_scale=1., drop_path=True, tau=50.)
    attn = cswin.stage1[0].content_attn
    assert (attn.scale, attn.tau, attn.cluster_size) == (1., 50., layer['cluster_size'].default)
    with pytest.raises(ValueError, match=r"fsla_cfg has unknown keys \['size'\]"):
        build(BOATSwinTransformer, fsla_cfg=dict(size=8))
    with pytest.raises(ValueError, match='unknown keys'):
        resolve_fsla_cfg(None, dict(clusters=3), 'X')
