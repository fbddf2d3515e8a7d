_base_ = ['./nat-mini_8xb128_in1k.py']

# NAT-Tiny: the NAT-Mini ImageNet-1K recipe with the tiny arch.
model = dict(
    backbone=dict(arch='tiny', drop_path_rate=0.2),
    head=dict(in_channels=512))
