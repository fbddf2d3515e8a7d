"""tools/train.py and tools/test.py: train, resume (path and auto), test a checkpoint, bad input."""
import glob
import json
import os
import os.path as osp
import pickle

import cv2
import numpy as np
import pytest
import torch
from tool_helpers import (DET_CONFIG, ROOT, SEG_CONFIG, load_tool, run_script, synthetic,
                          tiny_det_options, tiny_seg_options)

train_tool = load_tool('train.py')
test_tool = load_tool('test.py')


@pytest.fixture(scope='module')
def seg_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synthseg'))
    synthetic().make_seg_dataset(root, num_train=6, num_val=4, size=64, seed=1)
    return root


def _trained_iters(work_dir: str):
    """Training iterations logged by the (single) run in ``work_dir``."""
    files = glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))
    assert len(files) == 1, files
    with open(files[0]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return sorted({r['iter'] for r in records if 'loss' in r})


@pytest.mark.slow
def test_train_resume_and_test(seg_root, tmp_path):
    first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
    train_tool.main([SEG_CONFIG, '--work-dir', first, '--cfg-options'] +
                    tiny_seg_options(seg_root, iters=2))
    ckpt2 = osp.join(first, 'iter_2.pth')
    assert osp.isfile(ckpt2)
    assert _trained_iters(first) == [1, 2]
    # torch >= 2.6 loads weights-only by default; the stack fixes make mmengine's checkpoints load.
    state = torch.load(ckpt2, map_location='cpu', weights_only=True)
    assert state['meta']['iter'] == 2
    assert 'message_hub' in state and 'optimizer' in state

    # Resume from an explicit path: only iterations 3 and 4 run, from the saved state.
    train_tool.main([SEG_CONFIG, '--work-dir', second, '--resume', ckpt2, '--cfg-options'] +
                    tiny_seg_options(seg_root, iters=4))
    assert _trained_iters(second) == [3, 4]
    ckpt4 = osp.join(second, 'iter_4.pth')
    state4 = torch.load(ckpt4, map_location='cpu', weights_only=True)
    assert state4['meta']['iter'] == 4
    steps = {int(s['step']) for s in state4['optimizer']['state'].values()}
    assert steps == {4}, 'AdamW state must continue from the resumed optimizer (step 4)'

    # --resume (auto): the latest checkpoint of the work dir (iter_4) -> iteration 5 only.
    third = str(tmp_path / 'third')
    import shutil
    shutil.copytree(second, third, ignore=shutil.ignore_patterns('2*'))
    with open(osp.join(third, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(third, 'iter_4.pth'))
    train_tool.main([SEG_CONFIG, '--work-dir', third, '--resume', '--cfg-options'] +
                    tiny_seg_options(seg_root, iters=5))
    assert _trained_iters(third) == [5]

    # Test the saved checkpoint: metrics, predicted label maps (--out), painted images.
    out_dir, show_dir = str(tmp_path / 'pred'), str(tmp_path / 'show')
    metrics = test_tool.main([SEG_CONFIG, ckpt4, '--work-dir', str(tmp_path / 'test'),
                              '--out', out_dir, '--show-dir', show_dir, '--cfg-options'] +
                             tiny_seg_options(seg_root))
    assert 0.0 <= metrics['mIoU'] <= 100.0
    preds = sorted(glob.glob(osp.join(out_dir, '*.png')))
    assert len(preds) == 4
    for path in preds:
        pred = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        assert pred.shape == (64, 64)
        # ADE20K convention back on disk: class c is written as c + 1.
        assert pred.min() >= 1 and pred.max() <= 4
    shown = glob.glob(osp.join(show_dir, '**', '*.png'), recursive=True)
    assert len(shown) == 4


def test_bad_input_messages(seg_root, tmp_path):
    opts = tiny_seg_options(seg_root)
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        test_tool.main([SEG_CONFIG, str(tmp_path / 'missing.pth'), '--cfg-options'] + opts)
    with pytest.raises(FileNotFoundError, match='--resume checkpoint not found'):
        train_tool.main([SEG_CONFIG, '--work-dir', str(tmp_path), '--resume',
                         str(tmp_path / 'missing.pth'), '--cfg-options'] + opts)
    with pytest.raises(ValueError, match='default_scope'):
        train_tool.main([SEG_CONFIG, '--work-dir', str(tmp_path), '--cfg-options'] + opts +
                        ['default_scope=mmboat'])


AMP_SEG_CONFIG = osp.join(ROOT, 'configs', 'nat',
                          'nat-mini_upernet_8xb2-amp-160k_ade20k-512x512.py')
CPU_AMP_WARNING = 'no CUDA device is available. Training on the CPU with bfloat16 autocast'


def _tiny_amp_config(path, data_root: str) -> str:
    """The packaged NAT-Mini UperNet AMP config (mmseg's ADE20K pipeline and AmpOptimWrapper)
    shrunk to a tiny NAT, 64x64 crops of the synthetic ADE20K-layout set and 2 iterations."""
    path.write_text(f"""_base_ = [{AMP_SEG_CONFIG!r}]
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
model = dict(
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(arch=dict(_delete_=True, embed_dims=16, depths=[1, 1, 1, 1],
                            num_heads=[1, 2, 2, 4], mlp_ratio=2.0),
                  drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=16, pool_scales=(1, 2)),
    auxiliary_head=dict(in_channels=64, channels=16))
loader = dict(batch_size=2, num_workers=0, persistent_workers=False,
              dataset=dict(data_root={data_root!r}, pipeline=pipeline))
train_dataloader = loader
val_dataloader = dict(loader, batch_size=1)
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
""")
    return str(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason='tests the CPU replacement of AMP')
def test_amp_config_trains_on_cpu_with_bfloat16(seg_root, tmp_path):
    """As a user types it: a packaged AMP config through tools/train.py on a CPU machine."""
    config = _tiny_amp_config(tmp_path / 'amp_tiny.py', seg_root)
    work_dir = tmp_path / 'work'
    run = run_script([osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir', str(work_dir)],
                     timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    assert run.stdout.count(CPU_AMP_WARNING) == 1, run.stdout[-4000:]
    assert 'AmpOptimWrapper is only available' not in run.stdout
    assert _trained_iters(str(work_dir)) == [1, 2]
    dumped = open(work_dir / 'amp_tiny.py').read()
    assert "type='mmboat.CPUAmpOptimWrapper'" in dumped
    losses = [json.loads(line)['loss'] for line in open(glob.glob(
        osp.join(str(work_dir), '*', 'vis_data', 'scalars.json'))[0]) if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert osp.isfile(work_dir / 'iter_2.pth')


def test_configure_amp_rules(tmp_path):
    from mmengine.config import Config

    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='SGD'))))
    train_tool.configure_amp(cfg, enable=False)
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    train_tool.configure_amp(cfg, enable=True)
    expected = 'AmpOptimWrapper' if torch.cuda.is_available() else 'mmboat.CPUAmpOptimWrapper'
    assert cfg.optim_wrapper.type == expected and cfg.optim_wrapper.loss_scale == 'dynamic'
    cfg = Config(dict(optim_wrapper=dict(type='mmpretrain.SomeWrapper')))
    with pytest.raises(ValueError, match='--amp is only supported with optim_wrapper type'):
        train_tool.configure_amp(cfg, enable=True)


def test_cpu_amp_optim_wrapper():
    from mmboat.engine.optim_wrappers import CPUAmpOptimWrapper
    from mmboat.registry import OPTIM_WRAPPERS

    model = torch.nn.Linear(4, 2)
    wrapper = OPTIM_WRAPPERS.build(dict(type='CPUAmpOptimWrapper', loss_scale=512.,
                                        dtype='float16',
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    assert isinstance(wrapper, CPUAmpOptimWrapper)
    with wrapper.optim_context(model):
        assert torch.is_autocast_enabled('cpu')
        assert torch.get_autocast_dtype('cpu') == torch.bfloat16
        loss = model(torch.randn(3, 4)).float().sum()
    wrapper.update_params(loss)
    assert model.weight.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
    # A GPU AMP checkpoint's optimizer state (with the GradScaler's entry) resumes on the CPU.
    state = wrapper.state_dict()
    state['loss_scaler'] = {'scale': 512.}
    wrapper.load_state_dict(state)
    with pytest.raises(ValueError, match='CPU autocast runs in bfloat16'):
        CPUAmpOptimWrapper(dtype='float64', optimizer=torch.optim.SGD(model.parameters(), lr=1))


def test_cpu_ddp_wrapper_config():
    from mmengine.config import Config

    cfg = Config(dict(launcher='pytorch', find_unused_parameters=True))
    train_tool.setup_cpu_ddp(cfg)
    if torch.cuda.is_available():
        assert 'model_wrapper_cfg' not in cfg
        return
    assert cfg.model_wrapper_cfg == dict(type='MMDistributedDataParallel',
                                         broadcast_buffers=False, find_unused_parameters=True,
                                         device_ids=None)
    cfg = Config(dict(launcher='pytorch',
                      model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                                             find_unused_parameters=False)))
    train_tool.setup_cpu_ddp(cfg)
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.find_unused_parameters is False
    cfg = Config(dict(launcher='none'))
    train_tool.setup_cpu_ddp(cfg)
    assert 'model_wrapper_cfg' not in cfg


@pytest.mark.slow
def test_det_config_train_and_test(tmp_path):
    root = str(tmp_path / 'synthdet') + '/'
    synthetic().make_det_dataset(root, num_train=6, num_val=3, size=64, seed=2)
    opts = tiny_det_options(root)
    work_dir = str(tmp_path / 'work')
    train_tool.main([DET_CONFIG, '--work-dir', work_dir, '--cfg-options'] + opts)
    ckpt = osp.join(work_dir, 'iter_2.pth')
    assert osp.isfile(ckpt)
    out = str(tmp_path / 'dets.pkl')
    metrics = test_tool.main([DET_CONFIG, ckpt, '--work-dir', str(tmp_path / 'test'), '--out',
                              out, '--cfg-options'] + opts)
    assert 'coco/bbox_mAP' in metrics
    with open(out, 'rb') as f:
        dets = pickle.load(f)
    assert len(dets) == 3
    for det in dets:
        boxes = np.asarray(det['pred_instances']['bboxes'])
        assert boxes.ndim == 2 and boxes.shape[1] == 4
    with pytest.raises(ValueError, match='.pkl'):
        test_tool.main([DET_CONFIG, ckpt, '--out', str(tmp_path / 'dets.json'),
                        '--cfg-options'] + opts)


class _Reduces:
    """Pickles as ``getattr(owner, name)``, as protocol 2 pickles a class's function."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_weights_only_loading_allows_only_history_buffer_getattr(tmp_path):
    from mmengine.logging import HistoryBuffer

    buffer = HistoryBuffer()
    buffer.update(1.5)
    good = str(tmp_path / 'good.pth')
    torch.save({'hub': buffer, 'w': torch.ones(2)}, good)
    loaded = torch.load(good, weights_only=True)
    assert loaded['hub'].mean() == 1.5  # statistics methods restored through getattr
    bad = str(tmp_path / 'bad.pth')
    torch.save({'x': _Reduces(np.ndarray, 'tofile')}, bad)
    with pytest.raises(pickle.UnpicklingError, match='getattr only for the statistics methods'):
        torch.load(bad, weights_only=True)
    torch.save({'x': _Reduces(HistoryBuffer, '__init__')}, bad)
    with pytest.raises(pickle.UnpicklingError, match='is not allowed'):
        torch.load(bad, weights_only=True)


def test_wrong_checkpoint_stops_training_and_testing(seg_root, tmp_path, monkeypatch):
    """A checkpoint of another model in tools/test.py or load_from stops with the reason instead
    of running a model that is mostly random (mmengine loads with strict=False)."""
    from mmboat.models.backbones.boat_swin import BOATSwinTransformer
    from mmboat.models.utils.pretrained import ALLOW_PARTIAL_ENV

    # --allow-partial-checkpoint sets it in this process; undone after the test.
    monkeypatch.setenv(ALLOW_PARTIAL_ENV, '0')

    boat = BOATSwinTransformer(arch=dict(embed_dims=16, depths=(2, 2, 2, 2),
                                         num_heads=(1, 2, 2, 4)), window_size=4, img_size=64)
    official = str(tmp_path / 'boat_swin_release.pth')
    torch.save({'model': boat.state_dict()}, official)
    opts = tiny_seg_options(seg_root)
    with pytest.raises(RuntimeError, match=r'would load only 0% of the model.*BOAT-Swin model, '
                       r'given to a NAT/DiNAT EncoderDecoder'):
        test_tool.main([SEG_CONFIG, official, '--work-dir', str(tmp_path / 't'),
                        '--cfg-options'] + opts)
    with pytest.raises(RuntimeError, match='--allow-partial-checkpoint'):
        train_tool.main([SEG_CONFIG, '--work-dir', str(tmp_path / 'w'), '--cfg-options'] + opts +
                        [f'load_from={official}'])
    metrics = test_tool.main([SEG_CONFIG, official, '--work-dir', str(tmp_path / 't2'),
                              '--allow-partial-checkpoint', '--cfg-options'] + opts)
    assert 'mIoU' in metrics and os.environ[ALLOW_PARTIAL_ENV] == '1'
