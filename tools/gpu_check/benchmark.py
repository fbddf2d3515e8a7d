"""GPU benchmark tables of tools/gpu_check.sh: NAT-Tiny shapes, float16 and bfloat16.

1. **Attention ops**: fused neighborhood attention (``mmboat.ops.na2d``, rpb, k 7) vs Swin's 7x7
   window attention through ``scaled_dot_product_attention`` (its 49x49 relative position bias
   as the float mask, one learnable table per head) vs dense SDPA over the whole map, forward and
   forward+backward, at the four NAT-Tiny stages (56x56/28x28/14x14/7x7 maps with 2/4/8/16
   heads, head_dim 32), batch 1, 2, 4, 8, dilation 1 and DiNAT's ``min(8, L // k)`` (one row per
   dilation; the Swin and dense columns do not depend on it). The inputs are already in each
   layout: window partitioning and the qkv projection are not timed.
2. **Layers**: the FSLA layer (``FeatureSpaceLocalAttention``: qkv, clustering, clustered
   attention, the depth-wise conv on v, projection) vs the shifted-window layer
   (``ShiftedWindowAttention``, shift on) at the three BOAT-Swin-T stages that hold FSLA
   (56x56/C 96/3 heads, 28x28/192/6, 14x14/384/12), batch 1 and 8, under ``torch.autocast``.
3. **Backbones** at 224x224, batch 32, under ``torch.autocast``: NAT-Tiny and BOAT-Swin-Tiny vs
   a Swin-Tiny built from the same layers (``BOATSwinTransformer(fsla_blocks=[[]] * 4)``: the
   BOAT-Swin blocks with their FSLA sub-layer switched off), images/s for inference (eval,
   no_grad) and for a training step (forward + backward).

Rows 2 and 3 need mmengine (the layers' and backbones' imports): without it they are reported as
skipped with the fix. Times are medians of ``--iters`` calls after warm-up, each call timed with
CUDA events. Each section stops starting new rows at its share of ``--time-limit`` (attention
50%, layers 70%, backbones 95%) and says so in the table.

    python tools/gpu_check/benchmark.py --out OUT_DIR [--quick] [--time-limit S]
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# NAT-Tiny stages at 224: (map side, heads); head_dim 32, kernel 7 (Swin window 7).
STAGES = [(56, 2), (28, 4), (14, 8), (7, 16)]
HEAD_DIM, KERNEL, WINDOW = 32, 7, 7
BATCHES = [1, 2, 4, 8]
LAYER_BATCHES = [1, 8]
# BOAT-Swin-Tiny stages with FSLA at 224: (map side, channels, heads).
FSLA_STAGES = [(56, 96, 3), (28, 192, 6), (14, 384, 12)]
BACKBONE_BATCH, IMAGE = 32, 224
DTYPES = (torch.float16, torch.bfloat16)
# Section -> the share of --time-limit after which it starts no new row.
SHARES = {'attention': 0.5, 'layers': 0.7, 'backbones': 0.95}
# A CPU smoke run (tests): tiny shapes, one call per timing.
SMOKE = dict(stages=[(14, 2), (7, 4)], batches=[1], fsla=[(14, 32, 2)], backbone_batch=1,
             image=64, dtypes=(torch.bfloat16, ),
             archs=dict(nat=dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                                 mlp_ratio=2.0),
                        swin=dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])))


def dilations(side: int, kernel: int = KERNEL) -> List[int]:
    """Dilation 1 and DiNAT's ``min(8, side // kernel)`` (once when they coincide), so that
    ``kernel * dilation <= side``."""
    return sorted({1, max(1, min(8, side // kernel))})


def attention_problems(stages: Sequence[Tuple[int, int]] = STAGES,
                       batches: Sequence[int] = BATCHES) -> List[Dict]:
    """One problem per (stage, batch): map side, heads, batch and the dilations to time."""
    return [dict(side=side, heads=heads, batch=batch, dilations=dilations(side))
            for side, heads in stages for batch in batches]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split('.')[-1]


class Clock:
    """Median milliseconds of a function: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str, iters: int, warmup: int) -> None:
        self.device, self.iters, self.warmup = device, iters, warmup

    def safe(self, fn: Callable[[], object], label: str, notes: List[str]) -> float:
        """``self(fn)``, or NaN with a note naming ``label`` and the error when ``fn`` raises
        (one failing configuration does not lose the other rows)."""
        try:
            return self(fn)
        except (RuntimeError, ValueError) as exc:
            notes.append(f'{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}')
            return float('nan')

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == 'cuda':
            torch.cuda.synchronize()
            for _ in range(self.iters):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


class Deadlines:
    """When each section stops starting new rows (``SHARES`` of the time limit)."""

    def __init__(self, limit_s: float, start: Optional[float] = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.limit_s = limit_s

    def expired(self, section: str) -> bool:
        return time.monotonic() - self.start > SHARES[section] * self.limit_s


def _fwd_bwd(make: Callable[[], torch.Tensor], grad: torch.Tensor,
             leaves: Sequence[torch.Tensor]) -> Callable[[], None]:
    def run():
        torch.autograd.backward(make(), grad)
        for t in leaves:
            t.grad = None
    return run


def attention_rows(dtype: torch.dtype, problems: List[Dict], clock: Clock, device: str,
                   deadlines: Deadlines, notes: List[str]) -> List[Dict]:
    rows: List[Dict] = []
    for problem in problems:
        if deadlines.expired('attention'):
            notes.append(f'attention {dtype_name(dtype)}: stopped at the time limit before '
                         f"{problem['side']}x{problem['side']} batch {problem['batch']}")
            break
        rows += _attention_problem(dtype, problem, clock, device, notes)
    return rows


def _attention_problem(dtype: torch.dtype, problem: Dict, clock: Clock, device: str,
                       notes: List[str]) -> List[Dict]:
    """The rows of one (stage, batch): Swin and dense once, NA per dilation."""
    from mmboat.ops import na2d

    side, heads, batch = problem['side'], problem['heads'], problem['batch']
    kw = dict(device=device, dtype=dtype)
    shape = (batch, heads, side, side, HEAD_DIM)
    q, k, v = (torch.randn(shape, **kw).requires_grad_() for _ in range(3))
    rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, **kw).requires_grad_()
    grad = torch.randn(shape, **kw)
    # Swin: [B * windows, heads, 49, head_dim] and a [heads, 49, 49] bias.
    n_win, n_tok = (side // WINDOW)**2, WINDOW * WINDOW
    wq, wk, wv = (torch.randn(batch * n_win, heads, n_tok, HEAD_DIM, **kw).requires_grad_()
                  for _ in range(3))
    bias = torch.randn(heads, n_tok, n_tok, **kw).requires_grad_()
    wgrad = torch.randn_like(wq)
    # Dense: [B, heads, H*W, head_dim].
    dq, dk, dv = (t.detach().flatten(2, 3).requires_grad_() for t in (q, k, v))
    dgrad = grad.flatten(2, 3)

    def swin():
        return F.scaled_dot_product_attention(wq, wk, wv, attn_mask=bias)

    def dense():
        return F.scaled_dot_product_attention(dq, dk, dv)

    label = f'{dtype_name(dtype)} {side}x{side} batch {batch}'
    with torch.no_grad():
        swin_f = clock.safe(swin, f'swin forward, {label}', notes)
        dense_f = clock.safe(dense, f'dense forward, {label}', notes)
    swin_fb = clock.safe(_fwd_bwd(swin, wgrad, (wq, wk, wv, bias)),
                         f'swin forward+backward, {label}', notes)
    dense_fb = clock.safe(_fwd_bwd(dense, dgrad, (dq, dk, dv)),
                          f'dense forward+backward, {label}', notes)
    rows = []
    for dil in problem['dilations']:
        def fused(dil=dil):
            return na2d(q, k, v, rpb, kernel_size=KERNEL, dilation=dil, impl='ext')

        # NA errors are not caught: the op must run (the tests check its numbers).
        with torch.no_grad():
            na_f = clock(fused)
        na_fb = clock(_fwd_bwd(fused, grad, (q, k, v, rpb)))
        rows.append(dict(dtype=dtype_name(dtype), map=f'{side}x{side}', heads=heads,
                         batch=batch, dilation=dil, na_fwd=na_f, swin_fwd=swin_f,
                         dense_fwd=dense_f, na_fwd_bwd=na_fb, swin_fwd_bwd=swin_fb,
                         dense_fwd_bwd=dense_fb, swin_over_na=swin_fb / na_fb,
                         dense_over_na=dense_fb / na_fb))
    return rows


def need_mmengine() -> Optional[str]:
    """None when ``mmboat.models`` imports, else why not and the fix."""
    try:
        import mmboat.models  # noqa: F401
        return None
    except ImportError as exc:
        return (f'mmboat.models is not importable ({exc}); the layers and backbones need '
                'mmengine: run `bash tools/gpu_check_wheels.sh` on a machine with network (it '
                'writes .whl/) and rerun `bash tools/gpu_check.sh OUT_DIR --wheels .whl`')


def layer_rows(dtype: torch.dtype, stages: Sequence[Tuple[int, int, int]],
               batches: Sequence[int], clock: Clock, device: str, deadlines: Deadlines,
               notes: List[str]) -> List[Dict]:
    from mmboat.models.layers import FeatureSpaceLocalAttention, ShiftedWindowAttention

    rows = []
    for side, dims, heads in stages:
        layers = dict(fsla=FeatureSpaceLocalAttention(dims, heads, impl='ext').to(device),
                      window=ShiftedWindowAttention(dims, heads, window_size=WINDOW).to(device))
        for batch in batches:
            if deadlines.expired('layers'):
                notes.append(f'layers {dtype_name(dtype)}: stopped at the time limit before '
                             f'{side}x{side} batch {batch}')
                return rows
            row = dict(dtype=dtype_name(dtype), map=f'{side}x{side}', channels=dims,
                       heads=heads, batch=batch)
            for name, layer in layers.items():
                row.update(_layer_times(name, layer, dtype, side, dims, batch, clock, device,
                                        notes))
            row['fsla_over_window'] = row['fsla_fwd_bwd'] / row['window_fwd_bwd']
            rows.append(row)
    return rows


def _layer_times(name: str, layer: torch.nn.Module, dtype: torch.dtype, side: int, dims: int,
                 batch: int, clock: Clock, device: str, notes: List[str]) -> Dict[str, float]:
    x = torch.randn(batch, side * side, dims, device=device, requires_grad=True)
    grad = torch.randn(batch, side * side, dims, device=device)
    kwargs = dict(shift=True) if name == 'window' else {}

    def run():
        with torch.autocast(device, dtype=dtype):
            return layer(x, (side, side), **kwargs)

    label = f'{name} layer, {dtype_name(dtype)} {side}x{side} batch {batch}'
    with torch.no_grad():
        fwd = clock.safe(run, label + ' forward', notes)
    fwd_bwd = clock.safe(_fwd_bwd(lambda: run().float(), grad, [x, *layer.parameters()]),
                         label + ' forward+backward', notes)
    return {f'{name}_fwd': fwd, f'{name}_fwd_bwd': fwd_bwd}


def backbone_models(nat_arch: Union[str, Dict] = 'tiny', swin_arch: Union[str, Dict] = 'tiny'
                    ) -> Dict[str, Callable[[], torch.nn.Module]]:
    """NAT-Tiny, BOAT-Swin-Tiny and Swin-Tiny from the same blocks without FSLA (other archs
    for the smoke run)."""
    from mmboat.models import NAT, BOATSwinTransformer

    return {
        'NAT-Tiny': lambda: NAT(arch=nat_arch),
        'BOAT-Swin-Tiny': lambda: BOATSwinTransformer(arch=swin_arch),
        'Swin-Tiny (BOAT-Swin blocks, no FSLA)': lambda: BOATSwinTransformer(
            arch=swin_arch, fsla_blocks=[[], [], [], []]),
    }


def backbone_rows(dtypes: Sequence[torch.dtype], batch: int, image: int, clock: Clock,
                  device: str, deadlines: Deadlines, notes: List[str],
                  archs: Optional[Dict] = None) -> List[Dict]:
    rows = []
    x = torch.randn(batch, 3, image, image, device=device)
    archs = archs or {}
    models = backbone_models(archs.get('nat', 'tiny'), archs.get('swin', 'tiny'))
    for name, build in models.items():
        model = build().to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for dtype in dtypes:
            if deadlines.expired('backbones'):
                notes.append(f'backbones: stopped at the time limit before {name} '
                             f'{dtype_name(dtype)}')
                return rows

            def infer(model=model, dtype=dtype):
                with torch.no_grad(), torch.autocast(device, dtype=dtype):
                    return model(x)

            def train(model=model, dtype=dtype):
                with torch.autocast(device, dtype=dtype):
                    outs = model(x)
                sum(o.float().mean() for o in outs).backward()
                model.zero_grad(set_to_none=True)

            label = f'{name} {dtype_name(dtype)} batch {batch}'
            model.eval()
            infer_ms = clock.safe(infer, label + ' inference', notes)
            model.train()
            train_ms = clock.safe(train, label + ' training step', notes)
            rows.append(dict(dtype=dtype_name(dtype), model=name, params_m=params, batch=batch,
                             image=image, infer_ms=infer_ms, train_ms=train_ms,
                             infer_img_s=batch * 1e3 / infer_ms,
                             train_img_s=batch * 1e3 / train_ms))
        del model
        if device == 'cuda':
            torch.cuda.empty_cache()
    return rows


def markdown(rows: List[Dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (floats with 3 decimals, or 1 for images/s)."""
    def fmt(col, value):
        if isinstance(value, float) and value != value:
            return 'error'
        if isinstance(value, float):
            return f'{value:.1f}' if col.endswith('img_s') else f'{value:.3f}'
        return str(value)

    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(fmt(c, r.get(c, '')) for c in columns) + ' |' for r in rows]
    return '\n'.join(lines)


SECTIONS = [
    ('attention', 'Attention ops: fused NA vs Swin 7x7 window SDPA vs dense SDPA, ms '
     '(swin_over_na, dense_over_na: forward+backward time ratios, > 1 means NA is faster)',
     ['dtype', 'map', 'heads', 'batch', 'dilation', 'na_fwd', 'swin_fwd', 'dense_fwd',
      'na_fwd_bwd', 'swin_fwd_bwd', 'dense_fwd_bwd', 'swin_over_na', 'dense_over_na']),
    ('layers', 'Layers under autocast: FSLA vs shifted-window attention, ms '
     '(fsla_over_window: forward+backward time ratio)',
     ['dtype', 'map', 'channels', 'heads', 'batch', 'fsla_fwd', 'window_fwd', 'fsla_fwd_bwd',
      'window_fwd_bwd', 'fsla_over_window']),
    ('backbones', 'Backbones under autocast, images/s (training: forward + backward)',
     ['dtype', 'model', 'params_m', 'batch', 'image', 'infer_img_s', 'train_img_s']),
]


def render(results: Dict) -> str:
    meta = results['meta']
    parts = [f"# mmboat GPU benchmark: {meta['device']}", '',
             f"torch {meta['torch']}, CUDA {meta['cuda']}, {meta['date']}; medians of "
             f"{meta['iters']} calls after {meta['warmup']} warm-up calls.", '']
    for key, title, columns in SECTIONS:
        parts += [f'## {title}', '']
        value: Union[str, List[Dict]] = results[key]
        if isinstance(value, str):
            parts += [f'skipped: {value}', '']
        else:
            parts += [markdown(value, columns), '']
    if results.get('notes'):
        parts += ['## Notes', ''] + [f'* {n}' for n in results['notes']] + ['']
    return '\n'.join(parts)


def run(device: str = 'cuda', quick: bool = False, smoke: bool = False,
        iters: Optional[int] = None, time_limit: float = 240.0) -> Dict:
    deadlines = Deadlines(time_limit)
    stages, batches = (SMOKE['stages'], SMOKE['batches']) if smoke else (STAGES, BATCHES)
    layer_batches = SMOKE['batches'] if smoke else LAYER_BATCHES
    if quick and not smoke:
        batches, layer_batches = [1, 8], [8]
    fsla_stages = SMOKE['fsla'] if smoke else FSLA_STAGES
    backbone_batch = SMOKE['backbone_batch'] if smoke else BACKBONE_BATCH
    image = SMOKE['image'] if smoke else IMAGE
    iters = iters or (1 if smoke else 5 if quick else 10)
    warmup = 0 if smoke else 3
    dtypes = SMOKE['dtypes'] if smoke else DTYPES
    clock = Clock(device, iters, warmup)
    notes: List[str] = []
    if device == 'cuda':
        name, cuda = torch.cuda.get_device_name(0), torch.version.cuda
        torch.backends.cudnn.benchmark = True
    else:
        name, cuda = 'CPU', None
    results: Dict = dict(meta=dict(device=name, torch=torch.__version__, cuda=cuda,
                                   date=datetime.datetime.now().isoformat(timespec='seconds'),
                                   iters=iters, warmup=warmup, time_limit_s=time_limit),
                         attention=[], notes=notes)
    problems = attention_problems(stages, batches)
    for dtype in dtypes:
        results['attention'] += attention_rows(dtype, problems, clock, device, deadlines, notes)
    missing = need_mmengine()
    if missing:
        results['layers'] = results['backbones'] = missing
    else:
        results['layers'] = [r for dtype in dtypes for r in layer_rows(
            dtype, fsla_stages, layer_batches, clock, device, deadlines, notes)]
        results['backbones'] = backbone_rows(dtypes, backbone_batch, image, clock, device,
                                             deadlines, notes, SMOKE['archs'] if smoke else None)
    results['meta']['seconds'] = round(time.monotonic() - deadlines.start, 1)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='folder for benchmark.md and .json')
    parser.add_argument('--quick', action='store_true',
                        help='attention at batch 1 and 8, layers at batch 8, 5 calls')
    parser.add_argument('--iters', type=int, default=None, help='timed calls per median')
    parser.add_argument('--time-limit', type=float, default=240.0,
                        help='seconds; sections stop starting rows at their share of it')
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'],
                        help='cpu: only with --smoke (a self-test of this script)')
    parser.add_argument('--smoke', action='store_true',
                        help='tiny shapes and models, bfloat16, one call per timing')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('benchmark: no CUDA device (torch.cuda.is_available() is False)', file=sys.stderr)
        return 2
    if args.device == 'cpu' and not args.smoke:
        print('benchmark: --device cpu is only for --smoke', file=sys.stderr)
        return 2
    results = run(args.device, args.quick, args.smoke, args.iters, args.time_limit)
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
