_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)

# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://www.dropbox.com/s/rsmtu6r0v2lt0y5/cswin_tiny.pth.tar?dl=1'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='mmboat.BOATCSWinTransformer',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,  # as the official BOAT-CSWin/segmentation/configs/cswin
        fsla_cfg=dict(qk_scale=1.0),  # the scale the released BOAT-CSWin weights use
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
