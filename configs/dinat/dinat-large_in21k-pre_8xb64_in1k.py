_base_ = ['./dinat-base_8xb128_in1k.py']

# DiNAT-Large: the official recipe fine-tunes the ImageNet-22K release on ImageNet-1K
# (classification/configs/dinat_large.yml with its timm train.py defaults): 30 epochs at a
# constant lr 5e-5 (its `sched: linear` is no timm schedule, so the lr never changes), batch 512
# (8 x 64), wd 1e-4, no Mixup/CutMix (label smoothing 0.1 stays), gradient clipping at norm 5,
# float32 (amp: False), no warm-up or cool-down. The classifier head starts fresh (1000 classes).
model = dict(
    backbone=dict(
        arch='large',
        drop_path_rate=0.35,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://shi-labs.com/projects/dinat/checkpoints/imagenet22k/'
            'dinat_large_in22k_224.pth')),
    head=dict(in_channels=1536),
    train_cfg=None)

train_dataloader = dict(batch_size=64)
val_dataloader = dict(batch_size=64)
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-5, weight_decay=1e-4, eps=1e-8, betas=(0.9, 0.999)),
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0))  # as timm: 1-D tensors undecayed; `rpb` decayed (see README)
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=True, begin=0, end=30)]
train_cfg = dict(max_epochs=30)
auto_scale_lr = dict(base_batch_size=512)
