_base_ = ['../nat/cascade-mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py']

# ImageNet-1K classification weights converted with tools/model_converters/nat_to_mmboat.py
pretrained = 'checkpoints/dinat-tiny_in1k_mmboat.pth'
model = dict(backbone=dict(
        _delete_=True,
        type='mmboat.DiNAT',
        arch='tiny', dilations='coco',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')))
