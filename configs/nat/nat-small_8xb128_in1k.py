_base_ = ['./nat-mini_8xb128_in1k.py']

# NAT-Small: the NAT-Mini ImageNet-1K recipe with the small arch.
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.3),
    head=dict(in_channels=768))
