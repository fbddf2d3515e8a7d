_base_ = ['./mask-rcnn_nat-mini_fpn_amp-ms-crop-3x_coco.py']

# The tiny arch on the mini recipe; only what differs is set here.
pretrained = 'checkpoints/nat-tiny_in1k_mmboat.pth'
model = dict(
    backbone=dict(arch='tiny', init_cfg=dict(checkpoint=pretrained)))
