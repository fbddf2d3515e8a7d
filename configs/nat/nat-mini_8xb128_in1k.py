_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)

# NAT-Mini: the official recipe (the NAT repository's classification/configs/nat_mini.yml with
# its timm train.py defaults): ImageNet-1K, 224x224, AdamW lr 1e-3 (batch 1024 = 8 x 128), wd 0.05,
# 20 warm-up epochs from 1e-6, per-iteration cosine to 5e-6 at epoch 300, then 10 cool-down
# epochs at 5e-6 (310 in all), gradient clipping at norm 5, mixed precision (dynamic loss scale).
# Differences, and why: see README.md. The released `norm` is `backbone.norm3` here.
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='mmboat.NAT', arch='mini', out_indices=(3, ), drop_path_rate=0.2),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=512,
        init_cfg=None,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        cal_acc=False),
    init_cfg=[
        dict(type='TruncNormal', layer='Linear', std=0.02, bias=0.),
        dict(type='Constant', layer='LayerNorm', val=1., bias=0.)
    ],
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)

# 8 GPUs x 128 images
train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0))  # as timm: 1-D tensors undecayed; `rpb` decayed (see README)

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=20,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=5e-6, by_epoch=True, begin=20, end=300,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=310)  # 300 + 10 cool-down epochs at the last lr
