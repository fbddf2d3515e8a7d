_base_ = ['./mask-rcnn_boat-cswin-tiny_fpn_1x_coco.py']

# The base arch on the tiny recipe; only what differs is set here.
# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://www.dropbox.com/s/92sr8r8zhng1mqg/cswin_base.pth.tar?dl=1'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
