_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_amp-ms-crop-3x_coco.py']
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)

# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_tiny_in1k_224.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmboat.DiNAT',
        arch='tiny', dilations='coco',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=[64, 128, 256, 512]))

# Swin's 3x recipe (multi-scale + crop, 36 epochs, steps at 27 and 33, mixed precision);
# AdamW lr 1e-4, wd 0.05, no decay on rpb and norms.

optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale=512.,  # static, as the official configs' Fp16OptimizerHook (mmcv default)
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys={'.rpb': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))

# The official schedule_3x: 500-iteration linear warm-up (ratio 0.001), steps at 27 and 33.
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1)
]
