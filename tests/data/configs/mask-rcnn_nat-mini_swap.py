# A stock mmdet Mask R-CNN with its ResNet-50 swapped for mmboat's NAT-Mini.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='mmboat.NAT', arch='mini', drop_path_rate=0.1,
                  out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[64, 128, 256, 512]))
