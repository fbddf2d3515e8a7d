_base_ = ['../nat/nat-base_8xb128_in1k.py']

# DiNAT-Base: the NAT-Base recipe with dilated NA in alternating blocks (ImageNet schedule).
model = dict(backbone=dict(type='mmboat.DiNAT', dilations='imagenet'))
