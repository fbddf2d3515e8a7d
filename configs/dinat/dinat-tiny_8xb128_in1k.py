_base_ = ['../nat/nat-tiny_8xb128_in1k.py']

# DiNAT-Tiny: the NAT-Tiny recipe with dilated NA in alternating blocks (ImageNet schedule).
model = dict(backbone=dict(type='mmboat.DiNAT', dilations='imagenet'))
