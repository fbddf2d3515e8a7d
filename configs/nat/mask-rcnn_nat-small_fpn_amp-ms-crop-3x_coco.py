_base_ = ['./mask-rcnn_nat-mini_fpn_amp-ms-crop-3x_coco.py']

# The small arch on the mini recipe; only what differs is set here.
# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.35,  # as the official detection/configs/nat/mask_rcnn_nat_small_3x_coco.py
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
