_base_ = ['./dinat-base_8xb128_in1k.py']

# DiNAT-Large: the ImageNet-1K recipe with the large arch (the released weights were
# pre-trained on ImageNet-22K; see README).
model = dict(
    backbone=dict(arch='large', drop_path_rate=0.35),
    head=dict(in_channels=1536))
