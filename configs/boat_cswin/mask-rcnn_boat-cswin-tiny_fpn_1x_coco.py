_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)

# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://www.dropbox.com/s/rsmtu6r0v2lt0y5/cswin_tiny.pth.tar?dl=1'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmboat.BOATCSWinTransformer',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        fsla_cfg=dict(qk_scale=1.0),  # the scale the released BOAT-CSWin weights use
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=[64, 128, 256, 512]))

# 1x schedule (12 epochs, steps at 8 and 11), single scale;
# AdamW lr 1e-4, wd 0.05, no decay on position biases and norms.
optim_wrapper = dict(
    paramwise_cfg=dict(_delete_=True, custom_keys={'norm': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
