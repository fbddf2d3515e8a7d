_base_ = ['./mask-rcnn_boat-cswin-tiny_fpn_1x_coco.py']

# The small arch on the tiny recipe; only what differs is set here.
# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://www.dropbox.com/s/cnl00d1faxxoi19/cswin_small.pth.tar?dl=1'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.4,
        init_cfg=dict(checkpoint=pretrained)))
