_base_ = ['mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py']
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)

# BOAT-Swin-T: Swin's ImageNet-1K recipe (300 epochs, AdamW lr 1e-3 for batch 1024,
# wd 0.05, 20 warm-up epochs, cosine, Mixup/CutMix, label smoothing).
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmboat.BOATSwinTransformer',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(3, )),
    head=dict(in_channels=768))
