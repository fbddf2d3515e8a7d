_base_ = ['mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py']
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)

# BOAT-CSWin-T: the official recipe (pytorch-boat's BOAT-CSWin README command and its timm main.py
# defaults) on mmpretrain's Swin pipeline: AdamW wd 0.05, lr 1e-3 for batch 1024 (the official
# 2e-3 for batch 2048 = 8 x 256, linearly scaled; mmengine's auto_scale_lr rescales it for other
# batch sizes), 20 warm-up epochs from 1e-6 and a cosine to 1e-5 at epoch 300, both stepped per
# epoch, then 10 cool-down epochs (310 in all), no gradient clipping, mixed precision (dynamic
# loss scale), EMA of the weights and buffers (decay 0.99984 per iteration, evaluated instead of
# the raw weights), test crop ratio 0.9 (resize to 248, crop 224). Mixup 0.8 / CutMix 1.0,
# RandAugment, random erasing 0.25, label smoothing 0.1 as in Swin's recipe.
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmboat.BOATCSWinTransformer',
        arch='tiny',
        drop_path_rate=0.2,
        fsla_cfg=dict(qk_scale=1.0),  # the scale the released BOAT-CSWin weights use
        out_indices=(3, )),
    head=dict(in_channels=512))

optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic', clip_grad=None)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=20),  # per epoch, as timm's
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20, end=300),  # default
]
train_cfg = dict(max_epochs=310)  # 300 + 10 cool-down epochs at the last lr
custom_hooks = [
    dict(type='EMAHook', momentum=1.6e-4, update_buffers=True,  # decay 1 - 1.6e-4
         priority='ABOVE_NORMAL')
]

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=248, edge='short', backend='pillow',
         interpolation='bicubic'),  # 224 / 0.9 (timm's crop_pct of CSWin)
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
