_base_ = ['./boat-swin-tiny_16xb64_in1k.py']

# The base arch on the tiny recipe; only what differs is set here.
model = dict(backbone=dict(arch='base', drop_path_rate=0.5), head=dict(in_channels=1024))
