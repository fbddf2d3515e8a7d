_base_ = ['./nat-mini_upernet_8xb2-amp-160k_ade20k-512x512.py']

# The tiny arch on the mini recipe; only what differs is set here.
pretrained = 'checkpoints/nat-tiny_in1k_mmboat.pth'
model = dict(
    backbone=dict(arch='tiny', init_cfg=dict(checkpoint=pretrained)))
