_base_ = ['./boat-cswin-tiny_upernet_8xb2-160k_ade20k-512x512.py']

# The base arch on the tiny recipe; only what differs is set here.
pretrained = 'checkpoints/boat-cswin-base_in1k_mmboat.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
checkpoint_file = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/swin/swin_base_patch4_window7_224_20220317-e9b98025.pth'
