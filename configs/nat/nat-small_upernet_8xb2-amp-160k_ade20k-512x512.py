_base_ = ['./nat-mini_upernet_8xb2-amp-160k_ade20k-512x512.py']

# The small arch on the mini recipe; only what differs is set here.
pretrained = 'checkpoints/nat-small_in1k_mmboat.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
