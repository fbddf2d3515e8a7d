# A stock mmseg UperNet with its ResNet-50 swapped for mmboat's NAT-Mini.
_base_ = ['mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN needs a process group
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(_delete_=True, type='mmboat.NAT', arch='mini', drop_path_rate=0.1,
                  out_indices=(0, 1, 2, 3)),
    decode_head=dict(in_channels=[64, 128, 256, 512], norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=256, norm_cfg=norm_cfg))
