"""Every backbone trains under CPU bfloat16 autocast: forward and backward against the same
model's float32 run (the path AmpOptimWrapper takes; on GPUs the same policy casts to
float16/bfloat16).

Tolerance: bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.2% per rounding).
Autocast rounds the input of every linear/conv/attention op, so a feature after ``n`` such ops
carries a relative error of roughly ``sqrt(n) * 0.2%`` plus what LayerNorm and the softmax
amplify; these small backbones have 10-20 rounded ops per path, and measure 0.85-1.1% on the
outputs and 0.9-1.4% on the parameter gradients. The bounds, 3% on the outputs and 5% on the
gradients (which round a second time in the backward), leave a 3x margin and still catch a
wrong cast (a bias rounded after the softmax, a kernel summing in bfloat16).
"""
from copy import deepcopy

import pytest
import torch

from mmboat.models import NAT, DiNAT
from mmboat.models.backbones.boat_cswin import BOATCSWinTransformer
from mmboat.models.backbones.boat_swin import BOATSwinTransformer

ARCH = dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2.)
BUILDERS = {
    'nat': lambda: NAT(arch=deepcopy(ARCH), kernel_size=3, drop_path_rate=0.),
    'dinat': lambda: DiNAT(arch=deepcopy(ARCH), kernel_size=3, dilations=[[4], [1, 2], [1], [1]],
                           drop_path_rate=0.),
    'boat-swin': lambda: BOATSwinTransformer(
        arch=dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)), window_size=4,
        img_size=64, drop_path_rate=0., out_indices=(0, 1, 2, 3),
        fsla_cfg=dict(cluster_size=8, overlap=3)),
    'boat-cswin': lambda: BOATCSWinTransformer(
        arch=dict(embed_dims=16, depths=(1, 2, 2, 1), num_heads=(2, 2, 4, 4),
                  stripe_widths=(1, 2, 3, 3)), drop_path_rate=0., out_indices=(0, 1, 2, 3),
        fsla_cfg=dict(cluster_size=8, overlap=3)),
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _loss_and_grads(model, x, weights):
    outs = model(x)
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return outs, grads


@pytest.mark.parametrize('name', sorted(BUILDERS))
@pytest.mark.parametrize('impl', ['auto', 'reference'])
def test_backbone_bfloat16_autocast_matches_float32(name, impl, monkeypatch):
    monkeypatch.setenv('MMBOAT_OPS_IMPL', impl)
    torch.manual_seed(0)
    model = BUILDERS[name]()
    model.init_weights()  # the initialisation a runner applies
    model.train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        shapes = [o.shape for o in model(x)]
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=gen) for s in shapes]

    outs32, grads32 = _loss_and_grads(model, x, weights)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs16, grads16 = _loss_and_grads(model, x, weights)

    for o16, o32 in zip(outs16, outs32):
        assert o16.dtype == torch.bfloat16 or o16.dtype == torch.float32
        assert torch.isfinite(o16).all()
        assert _rel_err(o16, o32) < 0.03, f'{name}: output rel. error {_rel_err(o16, o32):.3f}'
    used = [(g16, g32) for g16, g32 in zip(grads16, grads32) if g32 is not None]
    assert all(g16 is not None and g16.dtype == torch.float32 for g16, _ in used)
    flat16 = torch.cat([g.flatten() for g, _ in used])
    flat32 = torch.cat([g.flatten() for _, g in used])
    assert torch.isfinite(flat16).all()
    assert _rel_err(flat16, flat32) < 0.05, (
        f'{name}: gradient rel. error {_rel_err(flat16, flat32):.3f}')
