_base_ = ['./boat-cswin-tiny_16xb64_in1k.py']

# The base arch on the tiny recipe; what differs officially: batch 1024 (8 x 128) at lr 1e-3,
# wd 0.1, EMA decay 0.99992.
model = dict(backbone=dict(arch='base', drop_path_rate=0.5), head=dict(in_channels=768))
optim_wrapper = dict(optimizer=dict(weight_decay=0.1))
custom_hooks = [
    dict(type='EMAHook', momentum=8e-5, update_buffers=True,  # decay 1 - 8e-5
         priority='ABOVE_NORMAL')
]
