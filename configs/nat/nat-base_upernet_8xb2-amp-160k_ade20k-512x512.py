_base_ = ['./nat-mini_upernet_8xb2-amp-160k_ade20k-512x512.py']

# The base arch on the mini recipe; only what differs is set here.
# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_base.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
