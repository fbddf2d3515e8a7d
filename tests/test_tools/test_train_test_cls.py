"""tools/train.py and tools/test.py on an mmpretrain (classification) config, as subprocesses."""
import os
import os.path as osp
import re

import cv2
import numpy as np
from tool_helpers import TOOLS, run_script

CLASSES = ('horizontal', 'vertical', 'checker')
SIZE = 32

CONFIG = '''
default_scope = 'mmpretrain'
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)

data_root = {data_root!r}
num_classes = {num_classes}
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(
        type='ClsDataPreprocessor', num_classes=num_classes,
        mean=[127.5, 127.5, 127.5], std=[64.0, 64.0, 64.0], to_rgb=True),
    backbone=dict(
        type='mmboat.NAT',
        arch=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], mlp_ratio=2.0),
        kernel_size=3, drop_path_rate=0.0, out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=128,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0), topk=(1, )))

pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                 classes={classes!r}, pipeline=pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val',
                 classes={classes!r}, pipeline=pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05))
param_scheduler = []
train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=2)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='VisualizationHook', enable=False))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='UniversalVisualizer', vis_backends=vis_backends)
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
'''


def _image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 BGR image whose stripe/checker pattern encodes ``label``, plus noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    period = 4
    if label == 0:
        mask = (yy // period) % 2 == 0
    elif label == 1:
        mask = (xx // period) % 2 == 0
    else:
        mask = ((yy // period) + (xx // period)) % 2 == 0
    img = np.where(mask, 200, 40).astype(np.float64)[..., None].repeat(3, axis=2)
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_folder_dataset(root: str, num_train: int, num_val: int, seed: int = 0) -> None:
    """ImageNet-style layout: ``root/{train,val}/<class>/<n>.png``."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        for i in range(count):
            label = i % len(CLASSES)
            folder = osp.join(root, split, CLASSES[label])
            os.makedirs(folder, exist_ok=True)
            assert cv2.imwrite(osp.join(folder, f'{i:03d}.png'), _image(label, rng))


def test_cls_config_train_and_test(tmp_path):
    data_root = str(tmp_path / 'tinyfolder')
    _make_folder_dataset(data_root, num_train=8, num_val=6)
    config = str(tmp_path / 'nat-tiny-slim_cls.py')
    with open(config, 'w') as f:
        f.write(CONFIG.format(data_root=data_root, num_classes=len(CLASSES), classes=CLASSES))

    work_dir = str(tmp_path / 'work')
    proc = run_script([osp.join(TOOLS, 'train.py'), config, '--work-dir', work_dir])
    assert proc.returncode == 0, proc.stdout[-6000:]
    ckpt = osp.join(work_dir, 'iter_2.pth')
    assert osp.isfile(ckpt), proc.stdout[-6000:]
    # The mid-training validation ran on the 6 val images.
    assert 'accuracy/top1' in proc.stdout

    proc = run_script([osp.join(TOOLS, 'test.py'), config, ckpt, '--work-dir',
                       str(tmp_path / 'test')])
    assert proc.returncode == 0, proc.stdout[-6000:]
    found = re.findall(r'accuracy/top1:\s*([0-9.]+)', proc.stdout)
    assert found, proc.stdout[-6000:]
    top1 = float(found[-1])
    assert 0.0 <= top1 <= 100.0
    # 6 val images -> accuracy is a multiple of 100/6.
    assert abs(top1 / (100.0 / 6) - round(top1 / (100.0 / 6))) < 1e-3, top1
