_base_ = ['./mask-rcnn_nat-mini_fpn_amp-ms-crop-3x_coco.py']

# The tiny arch on the mini recipe; only what differs is set here.
# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth'
model = dict(
    backbone=dict(arch='tiny', init_cfg=dict(checkpoint=pretrained)))
