_base_ = ['../nat/nat-mini_8xb128_in1k.py']

# DiNAT-Mini: the NAT-Mini recipe with dilated NA in alternating blocks (ImageNet schedule).
model = dict(backbone=dict(type='mmboat.DiNAT', dilations='imagenet'))
