"""GPU benchmark tables of tools/gpu_check.sh (NAT-Tiny shapes, float16 and bfloat16).

1. Fused neighborhood attention vs Swin 7x7 window attention through
   ``scaled_dot_product_attention`` (with its relative position bias as the mask) vs dense SDPA,
   forward and forward+backward, at the four NAT-Tiny stages (56x56/28x28/14x14/7x7 maps with
   2/4/8/16 heads, head_dim 32, k 7), batch 1..8, dilation 1 and DiNAT's ``min(8, L // k)``.
2. The FSLA layer vs the shifted-window layer (C = 96, 3 heads, 56x56), under autocast.
3. Whole backbones at 224: NAT-Tiny and BOAT-Swin-Tiny vs a Swin-Tiny built from the same
   layers (BOAT-Swin without FSLA), images/s for inference and for a training step, autocast.

Rows 2 and 3 need mmengine (the backbones' base class): without it they are reported as skipped
with the fix. Times are CUDA-event medians of ``--iters`` calls after warm-up.

    python tools/gpu_check/benchmark.py --out OUT_DIR [--quick]
"""
import argparse
import json
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# NAT-Tiny stages at 224: (map side, heads).
STAGES = [(56, 2), (28, 4), (14, 8), (7, 16)]
HEAD_DIM, KERNEL, WINDOW = 32, 7, 7


def dilations(side: int, kernel: int = KERNEL) -> List[int]:
    """Dilation 1 and DiNAT's largest useful dilation ``min(8, side // kernel)`` (once)."""
    return sorted({1, max(1, min(8, side // kernel))})


def cuda_time(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``iters`` calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _fwd_bwd(make: Callable[[], torch.Tensor], grad: torch.Tensor, leaves) -> Callable[[], None]:
    def run():
        out = make()
        torch.autograd.backward(out, grad)
        for t in leaves:
            t.grad = None
    return run


def attention_rows(dtype: torch.dtype, batches: List[int], iters: int) -> List[Dict]:
    from mmboat.ops import na2d

    rows = []
    for side, heads in STAGES:
        windows = (side // WINDOW)**2
        for batch in batches:
            shape = (batch, heads, side, side, HEAD_DIM)
            q, k, v = (torch.randn(shape, device='cuda', dtype=dtype, requires_grad=True)
                       for _ in range(3))
            rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, device='cuda',
                              dtype=dtype, requires_grad=True)
            grad = torch.randn(shape, device='cuda', dtype=dtype)
            # Swin: [B * windows, heads, 49, D] with its 49x49 relative position bias.
            wq, wk, wv = (torch.randn(batch * windows, heads, WINDOW * WINDOW, HEAD_DIM,
                                      device='cuda', dtype=dtype, requires_grad=True)
                          for _ in range(3))
            bias = torch.randn(heads, WINDOW * WINDOW, WINDOW * WINDOW, device='cuda',
                               dtype=dtype, requires_grad=True)
            wgrad = torch.randn_like(wq)
            dq, dk, dv = (t.detach().flatten(2, 3).requires_grad_() for t in (q, k, v))
            dgrad = grad.flatten(2, 3)
            swin = lambda: F.scaled_dot_product_attention(wq, wk, wv, attn_mask=bias)  # noqa
            dense = lambda: F.scaled_dot_product_attention(dq, dk, dv)  # noqa
            with torch.no_grad():
                swin_f, dense_f = cuda_time(swin, iters), cuda_time(dense, iters)
            swin_fb = cuda_time(_fwd_bwd(swin, wgrad, (wq, wk, wv, bias)), iters)
            dense_fb = cuda_time(_fwd_bwd(dense, dgrad, (dq, dk, dv)), iters)
            for dilation in dilations(side):
                fused = lambda: na2d(q, k, v, rpb, kernel_size=KERNEL,  # noqa
                                     dilation=dilation, impl='ext')
                with torch.no_grad():
                    na_f = cuda_time(fused, iters)
                na_fb = cuda_time(_fwd_bwd(fused, grad, (q, k, v, rpb)), iters)
                rows.append(dict(dtype=str(dtype).split('.')[-1], map=f'{side}x{side}',
                                 heads=heads, batch=batch, dilation=dilation, na_fwd=na_f,
                                 na_fwd_bwd=na_fb, swin_fwd=swin_f, swin_fwd_bwd=swin_fb,
                                 dense_fwd=dense_f, dense_fwd_bwd=dense_fb))
    return rows


def have_mmengine() -> Optional[str]:
    """None when mmengine imports, else why not."""
    try:
        import mmengine.model  # noqa: F401
        return None
    except ImportError as exc:
        return (f'mmengine is not importable ({exc}); bundle it with tools/gpu_check_wheels.sh '
                'and pass --wheels')


def layer_rows(dtype: torch.dtype, batches: List[int], iters: int) -> List[Dict]:
    from mmboat.models.layers.feature_space_attention import FeatureSpaceLocalAttention
    from mmboat.models.layers.window_attention import ShiftedWindowAttention

    rows = []
    side, dims, heads = 56, 96, 3
    fsla = FeatureSpaceLocalAttention(dims, heads).cuda()
    window = ShiftedWindowAttention(dims, heads, window_size=WINDOW).cuda()
    for batch in batches:
        x = torch.randn(batch, side * side, dims, device='cuda', requires_grad=True)
        grad = torch.randn(batch, side * side, dims, device='cuda')
        result = dict(dtype=str(dtype).split('.')[-1], batch=batch)
        for name, layer, kwargs in (('fsla', fsla, {}), ('window', window, dict(shift=True))):
            def run(layer=layer, kwargs=kwargs):
                with torch.autocast('cuda', dtype=dtype):
                    return layer(x, (side, side), **kwargs)
            with torch.no_grad():
                result[f'{name}_fwd'] = cuda_time(run, iters)
            result[f'{name}_fwd_bwd'] = cuda_time(
                _fwd_bwd(lambda run=run: run().float(), grad, [x] + list(layer.parameters())),
                iters)
        rows.append(result)
    return rows


def backbone_rows(dtype: torch.dtype, batch: int, iters: int) -> List[Dict]:
    from mmboat.models import NAT
    from mmboat.models.backbones.boat_swin import BOATSwinTransformer

    models = {
        'NAT-Tiny': lambda: NAT(arch='tiny'),
        'BOAT-Swin-Tiny': lambda: BOATSwinTransformer(arch='tiny'),
        'Swin-Tiny (same layers, no FSLA)': lambda: BOATSwinTransformer(
            arch='tiny', fsla_blocks=[[], [], [], []]),
    }
    rows = []
    x = torch.randn(batch, 3, 224, 224, device='cuda')
    for name, build in models.items():
        model = build().cuda()

        def infer(model=model):
            with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
                return model(x)

        def train(model=model):
            with torch.autocast('cuda', dtype=dtype):
                outs = model(x)
            sum(o.float().mean() for o in outs).backward()
            model.zero_grad(set_to_none=True)

        model.eval()
        infer_ms = cuda_time(infer, iters)
        model.train()
        train_ms = cuda_time(train, iters)
        rows.append(dict(dtype=str(dtype).split('.')[-1], model=name, batch=batch,
                         infer_img_s=batch * 1000 / infer_ms, train_img_s=batch * 1000 / train_ms))
        del model
        torch.cuda.empty_cache()
    return rows


def markdown(rows: List[Dict], columns: List[str]) -> str:
    def fmt(v):
        return f'{v:.3f}' if isinstance(v, float) else str(v)
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(fmt(r[c]) for c in columns) + ' |' for r in rows]
    return '\n'.join(lines)


def render(results: Dict) -> str:
    parts = [f"# mmboat GPU benchmark: {results['device']} (torch {results['torch']})", '']
    parts += ['## Neighborhood attention vs Swin 7x7 window (SDPA) vs dense SDPA, ms', '',
              markdown(results['attention'], ['dtype', 'map', 'heads', 'batch', 'dilation',
                                              'na_fwd', 'swin_fwd', 'dense_fwd', 'na_fwd_bwd',
                                              'swin_fwd_bwd', 'dense_fwd_bwd']), '']
    for key, title, cols in (
            ('layers', 'FSLA layer vs shifted-window layer (56x56, C=96, 3 heads), ms',
             ['dtype', 'batch', 'fsla_fwd', 'window_fwd', 'fsla_fwd_bwd', 'window_fwd_bwd']),
            ('backbones', 'Backbones at 224, images/s',
             ['dtype', 'model', 'batch', 'infer_img_s', 'train_img_s'])):
        parts += [f'## {title}', '']
        if isinstance(results[key], str):
            parts += [f'skipped: {results[key]}', '']
        else:
            parts += [markdown(results[key], cols), '']
    return '\n'.join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='folder for benchmark.md / .json')
    parser.add_argument('--quick', action='store_true', help='batch 1 and 8 only, fewer iters')
    parser.add_argument('--iters', type=int, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print('benchmark: no CUDA device', file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    batches = [1, 8] if args.quick else [1, 2, 4, 8]
    iters = args.iters or (5 if args.quick else 10)
    results: Dict = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                         attention=[])
    for dtype in (torch.float16, torch.bfloat16):
        results['attention'] += attention_rows(dtype, batches, iters)
    missing = have_mmengine()
    results['layers'] = missing or [r for dt in (torch.float16, torch.bfloat16)
                                    for r in layer_rows(dt, batches, iters)]
    results['backbones'] = missing or [r for dt in (torch.float16, torch.bfloat16)
                                       for r in backbone_rows(dt, 32, iters)]
    text = render(results)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'benchmark.md'), 'w') as f:
        f.write(text + '\n')
    with open(os.path.join(args.out, 'benchmark.json'), 'w') as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
