"""Official release URLs through mmengine's checkpoint loading (no network: the download is
replaced by a locally made release of the right layout and shapes)."""
from copy import deepcopy

import pytest
import torch

import mmboat.models  # noqa: F401  (registers the official-URL loader)
from mmboat.models import NAT

URL = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_mini.pth'


@pytest.fixture
def nat_mini_release(monkeypatch):
    """The official NAT-Mini release layout (raw timm dict), served for URL."""
    import mmengine.runner.checkpoint as ckpt

    torch.manual_seed(0)
    backbone = NAT(arch='mini', out_indices=(0, 1, 2, 3))
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_()
    release = {k: v for k, v in backbone.state_dict().items() if not k.startswith('norm')}
    release.update({'norm.weight': torch.randn(512), 'norm.bias': torch.randn(512),
                    'head.weight': torch.randn(1000, 512), 'head.bias': torch.randn(1000)})
    served = []

    def load_from_http(filename, map_location=None, model_dir=None, progress=False):
        served.append(filename)
        assert filename == URL
        return deepcopy(release)

    monkeypatch.setattr(ckpt, 'load_from_http', load_from_http)
    return release, served


def test_get_model_pretrained_converts_the_release_in_memory(nat_mini_release):
    from mmpretrain import get_model

    release, served = nat_mini_release
    model = get_model('nat-mini_8xb128_in1k', pretrained=True)
    assert served == [URL]
    own = model.state_dict()
    torch.testing.assert_close(own['backbone.levels.2.blocks.0.attn.rpb'],
                               release['levels.2.blocks.0.attn.rpb'])
    torch.testing.assert_close(own['backbone.norm3.weight'], release['norm.weight'])
    torch.testing.assert_close(own['head.fc.weight'], release['head.weight'])


def test_dense_backbone_from_the_release_url_keeps_fresh_norms(nat_mini_release):
    release, _ = nat_mini_release
    model = NAT(arch='mini', out_indices=(0, 1, 2, 3),
                init_cfg=dict(type='Pretrained', checkpoint=URL, prefix='backbone.'))
    fresh = model.norm3.weight.detach().clone()
    model.init_weights()
    torch.testing.assert_close(model.levels[1].blocks[0].attn.rpb,
                               release['levels.1.blocks.0.attn.rpb'])
    torch.testing.assert_close(model.norm3.weight, fresh)
