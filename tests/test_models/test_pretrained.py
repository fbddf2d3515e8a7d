"""init_cfg Pretrained on mmboat backbones (mmboat/models/utils/pretrained.py): official layouts
read in memory, converted files, and a clear error instead of a silent random init.

The official-layout checkpoints are made here from small models: mmboat keeps the released
parameter names, so an official checkpoint is the backbone's state dict in the release's wrapper
(raw dict / ``model`` / timm ``state_dict`` + ``args``) with the release's extra entries (the
classification ``norm`` and ``head``, Swin's derived buffers, CSWin's ``Sequential`` stem).
"""
import argparse
from copy import deepcopy

import pytest
import torch

from mmboat.models import NAT
from mmboat.models.backbones.boat_cswin import BOATCSWinTransformer
from mmboat.models.backbones.boat_swin import BOATSwinTransformer
from mmboat.models.utils.checkpoint_keys import CSWIN_STEM_RENAMES

NAT_ARCH = dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2.)
SWIN_ARCH = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
CSWIN_ARCH = dict(embed_dims=16, depths=(1, 2, 2, 1), num_heads=(2, 2, 4, 4),
                  stripe_widths=(1, 2, 3, 3))


def nat(**kwargs):
    return NAT(arch=deepcopy(kwargs.pop('arch', NAT_ARCH)), kernel_size=3, **kwargs)


def swin(**kwargs):
    return BOATSwinTransformer(arch=SWIN_ARCH, window_size=4, img_size=64,
                               fsla_cfg=dict(cluster_size=8, overlap=3), **kwargs)


def cswin(**kwargs):
    return BOATCSWinTransformer(arch=CSWIN_ARCH, fsla_cfg=dict(cluster_size=8, overlap=3),
                                **kwargs)


def _randomised(model):
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _cls_extras(dims):
    return {'norm.weight': torch.randn(dims), 'norm.bias': torch.randn(dims),
            'head.weight': torch.randn(10, dims), 'head.bias': torch.randn(10)}


def official_nat(path, source):
    """NAT/DiNAT classification release: a raw dict of timm names."""
    state = {k: v for k, v in source.state_dict().items() if not k.startswith('norm')}
    torch.save({**state, **_cls_extras(128)}, path)


def official_boat_swin(path, source):
    state = {k: v for k, v in source.state_dict().items() if not k.startswith('norm')}
    state['layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(16, 16,
                                                                        dtype=torch.long)
    state['layers.0.blocks.1.attn_mask'] = torch.zeros(16, 16, 16)
    torch.save({'model': {**state, **_cls_extras(128)}, 'epoch': 300}, path)


def official_boat_cswin(path, source):
    state = {}
    for k, v in source.state_dict().items():
        if k.startswith('norm'):
            continue
        for old, new in CSWIN_STEM_RENAMES.items():
            if k.startswith(new):
                k = old + k[len(new):]
        state[k] = v
    state.update(_cls_extras(128))
    torch.save({'state_dict': state, 'state_dict_ema': state, 'epoch': 300,
                'args': argparse.Namespace(model='BOAT_CSWin_tiny', lr=1e-3)}, path)


CASES = {
    'nat': (nat, official_nat, 'an official NAT/DiNAT classification checkpoint'),
    'boat_swin': (swin, official_boat_swin, 'an official BOAT-Swin checkpoint'),
    'boat_cswin': (cswin, official_boat_cswin, 'an official BOAT-CSWin (timm) checkpoint'),
}


@pytest.fixture
def log():
    """The text mmengine's current logger receives during the test."""
    import io
    import logging

    from mmengine.logging import MMLogger

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


def _assert_loaded(model, source, skip_norms=True):
    own, ref = model.state_dict(), source.state_dict()
    for key, value in ref.items():
        if skip_norms and key.split('.')[0].startswith('norm'):
            continue
        torch.testing.assert_close(own[key], value, msg=key, rtol=0, atol=0)


@pytest.mark.parametrize('family', sorted(CASES))
def test_official_checkpoint_in_init_cfg_loads_in_memory(family, tmp_path, log):
    build, save_official, what = CASES[family]
    source = _randomised(build(out_indices=(0, 1, 2, 3)))
    path = str(tmp_path / 'official.pth')
    save_official(path, source)
    model = build(out_indices=(0, 1, 2, 3),
                  init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    fresh_norm = deepcopy(model.norm3.state_dict())
    model.init_weights()
    _assert_loaded(model, source)
    # The dense output norms are not in a classification release: fresh, as the official
    # det/seg code leaves them, and said so in one log line.
    for key, value in fresh_norm.items():
        torch.testing.assert_close(model.norm3.state_dict()[key], value)
    out = log.getvalue()
    assert what in out and 'keep their fresh initialisation' in out
    assert 'norm0, norm1, norm2, norm3' in out


@pytest.mark.parametrize('family', sorted(CASES))
def test_mmengine_checkpoint_with_prefix_loads(family, tmp_path):
    build = CASES[family][0]
    source = _randomised(build(out_indices=(0, 1, 2, 3)))
    path = str(tmp_path / 'converted.pth')
    torch.save({'state_dict': {'backbone.' + k: v for k, v in source.state_dict().items()},
                'meta': {'converter': 'x'}}, path)
    model = build(out_indices=(0, 1, 2, 3),
                  init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    model.init_weights()
    _assert_loaded(model, source, skip_norms=False)


@pytest.mark.parametrize('given,to,message', [
    ('boat_swin', 'nat', 'of a BOAT-Swin model, given to NAT'),
    ('nat', 'boat_cswin', 'of a NAT/DiNAT model, given to BOATCSWinTransformer'),
    ('boat_cswin', 'boat_swin', 'of a BOAT-CSWin model, given to BOATSwinTransformer'),
])
def test_checkpoint_of_another_family_stops_with_the_reason(given, to, message, tmp_path):
    path = str(tmp_path / 'other.pth')
    CASES[given][1](path, CASES[given][0]())
    model = CASES[to][0](init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    with pytest.raises(RuntimeError, match=message) as info:
        model.init_weights()
    assert path in str(info.value) and 'allow_partial=True' in str(info.value)


def test_other_architecture_and_unrecognised_checkpoints_stop(tmp_path):
    mini = str(tmp_path / 'mini.pth')
    official_nat(mini, nat(arch=dict(NAT_ARCH, embed_dims=8)))
    model = nat(init_cfg=dict(type='Pretrained', checkpoint=mini, prefix='backbone.'))
    with pytest.raises(RuntimeError, match='another NAT/DiNAT architecture'):
        model.init_weights()
    junk = str(tmp_path / 'junk.pth')
    torch.save({'state_dict': {'encoder.weight': torch.zeros(3)}}, junk)
    model = nat(init_cfg=dict(type='Pretrained', checkpoint=junk, prefix='backbone.'))
    with pytest.raises(RuntimeError, match=r'unrecognised checkpoint .*nat_to_mmboat.py'):
        model.init_weights()


def test_allow_partial_opts_out(tmp_path, log):
    path = str(tmp_path / 'half.pth')
    source = _randomised(nat())
    state = {k: v for k, v in source.state_dict().items() if k.startswith('patch_embed')}
    torch.save({'state_dict': {'backbone.' + k: v for k, v in state.items()}}, path)
    cfg = dict(type='Pretrained', checkpoint=path, prefix='backbone.')
    with pytest.raises(RuntimeError, match='would load only'):
        nat(init_cfg=cfg).init_weights()
    model = nat(init_cfg=dict(cfg, allow_partial=True))
    model.init_weights()
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert 'not loaded from' in log.getvalue()
    with pytest.raises(ValueError, match='init_cfg Pretrained takes checkpoint'):
        nat(init_cfg=dict(cfg, strict=True)).init_weights()


def test_downstream_model_with_official_checkpoint(tmp_path):
    """An mmseg EncoderDecoder whose backbone init_cfg names the official file directly."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope('mmseg')
    path = str(tmp_path / 'nat_official.pth')
    source = _randomised(nat(out_indices=(0, 1, 2, 3)))
    official_nat(path, source)
    model = MODELS.build(dict(
        type='EncoderDecoder',
        backbone=dict(type='mmboat.NAT', arch=deepcopy(NAT_ARCH), kernel_size=3,
                      init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.')),
        decode_head=dict(type='FCNHead', in_channels=128, in_index=3, channels=8, num_convs=1,
                         num_classes=3, norm_cfg=dict(type='BN'))))
    model.init_weights()
    _assert_loaded(model.backbone, source)


@pytest.mark.parametrize('family', sorted(CASES))
def test_classification_backbone_takes_the_release_final_norm(family, tmp_path):
    """With only the last stage out (a classifier's backbone), the release's final ``norm`` is
    that stage's output norm, as the converters map it."""
    build, save_official, _ = CASES[family]
    path = str(tmp_path / 'official.pth')
    save_official(path, _randomised(build(out_indices=(0, 1, 2, 3))))
    released = torch.load(path, weights_only=True)
    released = released.get('model', released.get('state_dict', released))
    model = build(init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    model.init_weights()
    torch.testing.assert_close(model.norm3.weight, released['norm.weight'])
    torch.testing.assert_close(model.norm3.bias, released['norm.bias'])


def _classifier(family):
    from mmpretrain.registry import MODELS

    backbone = {'nat': dict(type='mmboat.NAT', arch=deepcopy(NAT_ARCH), kernel_size=3),
                'boat_swin': dict(type='mmboat.BOATSwinTransformer', arch=SWIN_ARCH,
                                  window_size=4, img_size=64,
                                  fsla_cfg=dict(cluster_size=8, overlap=3)),
                'boat_cswin': dict(type='mmboat.BOATCSWinTransformer', arch=CSWIN_ARCH,
                                   fsla_cfg=dict(cluster_size=8, overlap=3))}[family]
    return MODELS.build(dict(type='ImageClassifier', backbone=backbone,
                             neck=dict(type='GlobalAveragePooling'),
                             head=dict(type='LinearClsHead', num_classes=10, in_channels=128)))


@pytest.mark.parametrize('family', sorted(CASES))
def test_official_release_into_an_mmpretrain_classifier(family, tmp_path):
    from mmengine.runner import load_checkpoint

    from mmboat.models.utils.pretrained import official_release, official_to_classifier

    build, save_official, _ = CASES[family]
    path = str(tmp_path / 'official.pth')
    save_official(path, _randomised(build(out_indices=(0, 1, 2, 3))))
    family_found, weights, _ = official_release(torch.load(path, weights_only=True))
    assert family_found == family
    # strict: every classifier tensor comes from the release, nothing is left over.
    _classifier(family).load_state_dict(official_to_classifier(family, weights), strict=True)
    # The same through mmengine's load_checkpoint of the local file (load_from, tools/test.py).
    classifier = _classifier(family)
    load_checkpoint(classifier, path, map_location='cpu', strict=True)
    torch.testing.assert_close(classifier.head.fc.weight, weights['head.weight'])


class _Detector(torch.nn.Module):
    """A whole model around an mmboat backbone (keys under ``backbone.``)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(4, 2)


@pytest.mark.parametrize('loader', ['torch', 'mmengine'])
def test_any_load_that_leaves_the_backbone_random_stops(loader, monkeypatch):
    """torch's and mmengine's strict=False loads (load_from, resume, the downstream tools'
    test.py, inferencers) reach the backbone's own check."""
    from mmengine.runner.checkpoint import load_state_dict

    from mmboat.models.utils.pretrained import ALLOW_PARTIAL_ENV, partial_loads_allowed

    monkeypatch.delenv(ALLOW_PARTIAL_ENV, raising=False)
    model = _Detector(nat())
    load = (lambda sd: model.load_state_dict(sd, strict=False)) if loader == 'torch' else (
        lambda sd: load_state_dict(model, sd, strict=False))
    good = _randomised(_Detector(nat())).state_dict()
    load(good)  # a full load passes, and loads
    torch.testing.assert_close(model.backbone.state_dict(),
                               {k[len('backbone.'):]: v for k, v in good.items()
                                if k.startswith('backbone.')})
    boat = _Detector(swin()).state_dict()
    with pytest.raises(RuntimeError, match="NAT: .*fill only 0% .*BOAT-Swin model, given to NAT"):
        load(boat)
    unprefixed = {k[len('backbone.'):]: v for k, v in good.items()}
    with pytest.raises(RuntimeError, match=f"at 'backbone.'.*{ALLOW_PARTIAL_ENV}=1"):
        load(unprefixed)
    # Two thirds of the backbone missing: still random for the most part.
    keys = [k for k in good if k.startswith('backbone.')]
    with pytest.raises(RuntimeError, match='fill only'):
        load({k: good[k] for k in keys[:len(keys) // 3]})
    with partial_loads_allowed():
        load(boat)  # only the output norms of the same width fit, and load
    torch.testing.assert_close(model.backbone.norm3.bias, boat['backbone.norm3.bias'])
    monkeypatch.setenv(ALLOW_PARTIAL_ENV, '1')
    load({k: good[k] for k in keys[:3]})
