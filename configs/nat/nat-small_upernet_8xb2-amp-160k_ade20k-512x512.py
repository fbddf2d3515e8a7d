_base_ = ['./nat-mini_upernet_8xb2-amp-160k_ade20k-512x512.py']

# The small arch on the mini recipe; only what differs is set here.
# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.5,  # as the official segmentation/configs/nat/upernet_nat_small_512x512_160k_ade20k.py
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
