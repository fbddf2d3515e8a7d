_base_ = ['./boat-cswin-tiny_16xb64_in1k.py']

# The small arch on the tiny recipe; only what differs is set here.
model = dict(backbone=dict(arch='small', drop_path_rate=0.4))
