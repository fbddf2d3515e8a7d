_base_ = ['../nat/nat-small_8xb128_in1k.py']

# DiNAT-Small: the NAT-Small recipe with dilated NA in alternating blocks (ImageNet schedule).
model = dict(backbone=dict(type='mmboat.DiNAT', dilations='imagenet'))
