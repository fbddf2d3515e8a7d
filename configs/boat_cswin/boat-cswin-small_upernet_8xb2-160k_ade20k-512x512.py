_base_ = ['mmseg::swin/swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)

# ImageNet-1K classification weights converted with tools/model_converters/boat_cswin_to_mmboat.py
pretrained = 'checkpoints/boat-cswin-small_in1k_mmboat.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='mmboat.BOATCSWinTransformer',
        arch='small',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        fsla_qk_scale=1.0,  # the scale the released BOAT-CSWin weights use
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150))

# AdamW lr 6e-5, wd 0.01, no decay on position biases and norms, 1500-iteration linear warm-up
# then poly, 160k iterations, batch 16 (8 GPUs x 2).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
