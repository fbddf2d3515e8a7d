_base_ = ['./nat-mini_8xb128_in1k.py']

# NAT-Base: the NAT-Mini ImageNet-1K recipe with the base arch.
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.5),
    head=dict(in_channels=1024))
