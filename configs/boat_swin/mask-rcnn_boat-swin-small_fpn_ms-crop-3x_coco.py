_base_ = ['./mask-rcnn_boat-swin-tiny_fpn_ms-crop-3x_coco.py']

# The small arch on the tiny recipe; only what differs is set here.
# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://www.dropbox.com/s/7ih1zvii3bvdcgd/small.pth?dl=1'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=pretrained)))
