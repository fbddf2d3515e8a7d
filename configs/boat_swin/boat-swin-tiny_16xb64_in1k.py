_base_ = ['mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py']
custom_imports = dict(imports=['mmboat.models'], allow_failed_imports=False)

# BOAT-Swin-T: Swin's ImageNet-1K recipe, which the official BOAT-Swin code trains with (its
# config.py defaults): 300 epochs, AdamW lr 1e-3 for batch 1024, wd 0.05, 20 warm-up epochs,
# per-iteration cosine to 1e-5, gradient clipping at norm 5, Mixup/CutMix, label smoothing;
# mixed precision (the official apex O1, dynamic loss scale).
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmboat.BOATSwinTransformer',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(3, )),
    head=dict(in_channels=768))

optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=20,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20, end=300,
         convert_to_iter_based=True),
]
