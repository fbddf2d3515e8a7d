_base_ = ['./boat-cswin-tiny_upernet_8xb2-160k_ade20k-512x512.py']

# The base arch on the tiny recipe; only what differs is set here.
# The official ImageNet-1K release, read in memory by the backbone (a local path to it, or
# to its conversion by tools/model_converters/, works the same way).
pretrained = 'https://www.dropbox.com/s/92sr8r8zhng1mqg/cswin_base.pth.tar?dl=1'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,  # as the official BOAT-CSWin/segmentation/configs/cswin
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
checkpoint_file = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/swin/swin_base_patch4_window7_224_20220317-e9b98025.pth'
