_base_ = ['./mask-rcnn_boat-swin-tiny_fpn_ms-crop-3x_coco.py']

# The base arch on the tiny recipe; only what differs is set here.
pretrained = 'checkpoints/boat-swin-base_in1k_mmboat.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
