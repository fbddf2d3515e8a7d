"""The ImageNet-1K configs follow the official training recipes (configs/*/README.md,
"Recipes"): the schedule each config's schedulers produce, stepped like mmengine's runner, and the
optimisation settings, against the official values (NAT repository classification/configs/*.yml
with its timm train.py defaults; pytorch-boat's BOAT-Swin config.py and BOAT-CSWin README
commands)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim.scheduler import _ParamScheduler
from mmengine.registry import PARAM_SCHEDULERS

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ITERS = 4  # iterations per epoch in the simulation

# config -> (lr, warm-up start lr, min lr, epochs incl. cool-down, cosine end epoch, clip,
#            amp, weight decay, EMA decay)
OFFICIAL = {
    'nat/nat-mini_8xb128_in1k.py': (1e-3, 1e-6, 5e-6, 310, 300, 5.0, True, 0.05, None),
    'nat/nat-base_8xb128_in1k.py': (1e-3, 1e-6, 5e-6, 310, 300, 5.0, True, 0.05, None),
    'dinat/dinat-tiny_8xb128_in1k.py': (1e-3, 1e-6, 5e-6, 310, 300, 5.0, True, 0.05, None),
    'boat_swin/boat-swin-tiny_16xb64_in1k.py': (1e-3, 1e-6, 1e-5, 300, 300, 5.0, True, 0.05,
                                                None),
    'boat_cswin/boat-cswin-tiny_16xb64_in1k.py': (1e-3, 1e-6, 1e-5, 310, 300, None, True, 0.05,
                                                  0.99984),
    'boat_cswin/boat-cswin-base_16xb64_in1k.py': (1e-3, 1e-6, 1e-5, 310, 300, None, True, 0.1,
                                                  0.99992),
}


def _lr_per_epoch(cfg: Config):
    """The lr at the first iteration of every epoch, stepping the config's schedulers the way
    mmengine's runner does (iteration-based ones every iteration, epoch-based ones per epoch)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.optim_wrapper.optimizer.lr)
    epochs = cfg.train_cfg.max_epochs
    schedulers = []
    for sched in cfg.param_scheduler:
        sched = dict(sched, optimizer=optimizer)
        sched.pop('_scope_', None)
        sched.setdefault('end', epochs)
        cls = PARAM_SCHEDULERS.get(sched.pop('type'))
        if sched.pop('convert_to_iter_based', False):
            schedulers.append(cls.build_iter_from_epoch(epoch_length=ITERS, **sched))
        else:
            schedulers.append(cls(**sched))
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]['lr'])
        for _ in range(ITERS):
            for s in schedulers:
                if not s.by_epoch:
                    s.step()
        for s in schedulers:
            if s.by_epoch:
                s.step()
    assert all(isinstance(s, _ParamScheduler) for s in schedulers)
    return lrs


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_imagenet_recipe_matches_the_official_one(name):
    lr, warm, min_lr, epochs, cosine_end, clip, amp, wd, ema = OFFICIAL[name]
    cfg = Config.fromfile(osp.join(ROOT, 'configs', name))
    wrapper = cfg.optim_wrapper
    assert wrapper.optimizer.type == 'AdamW' and wrapper.optimizer.lr == lr
    assert wrapper.optimizer.weight_decay == wd
    assert (wrapper.get('type') == 'AmpOptimWrapper') == amp
    assert (wrapper.get('clip_grad') or {}).get('max_norm') == clip
    # timm (NAT) decays every tensor of 2 or more dimensions, the relative position bias too.
    custom = wrapper.paramwise_cfg.get('custom_keys', {})
    assert wrapper.paramwise_cfg.flat_decay_mult == 0.0 and '.rpb' not in custom
    hooks = [h for h in cfg.get('custom_hooks', []) if h.type == 'EMAHook']
    assert [1 - h.momentum for h in hooks] == pytest.approx([ema] if ema else [])
    lrs = _lr_per_epoch(cfg)
    assert len(lrs) == epochs
    assert lrs[0] == pytest.approx(warm)
    peak = max(range(epochs), key=lambda e: lrs[e])
    assert 19 <= peak <= 20 and lrs[peak] == pytest.approx(lr, rel=0.02)
    # Cosine down to the minimum at the official end, then flat through the cool-down.
    assert all(a >= b - 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[cosine_end - 1] == pytest.approx(min_lr, rel=0.05, abs=1e-7)
    assert all(v == pytest.approx(min_lr, rel=0.01) for v in lrs[cosine_end:])


def test_dinat_large_is_the_official_fine_tuning():
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'dinat',
                                   'dinat-large_in21k-pre_8xb64_in1k.py'))
    assert cfg.model.backbone.init_cfg.checkpoint.endswith('imagenet22k/dinat_large_in22k_224.pth')
    assert cfg.model.train_cfg is None  # no Mixup / CutMix
    assert cfg.optim_wrapper.get('type') == 'OptimWrapper'  # float32
    assert cfg.optim_wrapper.optimizer.weight_decay == 1e-4
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 512
    assert _lr_per_epoch(cfg) == pytest.approx([5e-5] * 30)
