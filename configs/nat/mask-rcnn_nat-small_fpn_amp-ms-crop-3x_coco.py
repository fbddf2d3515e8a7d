_base_ = ['./mask-rcnn_nat-mini_fpn_amp-ms-crop-3x_coco.py']

# The small arch on the mini recipe; only what differs is set here.
pretrained = 'checkpoints/nat-small_in1k_mmboat.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
