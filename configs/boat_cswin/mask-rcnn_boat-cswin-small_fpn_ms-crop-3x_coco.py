_base_ = ['./mask-rcnn_boat-cswin-tiny_fpn_ms-crop-3x_coco.py']

# The small arch on the tiny recipe; only what differs is set here.
pretrained = 'checkpoints/boat-cswin-small_in1k_mmboat.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.4,
        init_cfg=dict(checkpoint=pretrained)))
