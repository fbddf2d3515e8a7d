_base_ = ['./nat-mini_upernet_8xb2-amp-160k_ade20k-512x512.py']

# The base arch on the mini recipe; only what differs is set here.
pretrained = 'checkpoints/nat-base_in1k_mmboat.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
