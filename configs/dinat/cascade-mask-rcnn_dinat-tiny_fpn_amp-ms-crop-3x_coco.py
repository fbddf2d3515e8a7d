_base_ = ['../nat/cascade-mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py']

# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_tiny_in1k_224.pth'
model = dict(backbone=dict(
        _delete_=True,
        type='mmboat.DiNAT',
        arch='tiny', dilations='coco',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,  # as the official detection/configs/dinat/cascade_mask_rcnn_dinat_tiny_3x_coco.py
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')))
