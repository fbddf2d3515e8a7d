"""Backbone throughput, latency and peak memory: mmboat's backbones next to stock mmpretrain ones.

    python tools/analysis_tools/benchmark.py [--models nat-tiny swin-t convnext-t]
        [--shape 224] [--batch-size 1] [--device auto|cpu|cuda] [--impl auto ext reference]
        [--mode infer|train] [--iters 20] [--warmup 3] [--interleave] [--quick]

Every model is built with random weights and timed on ``[batch, 3, H, W]`` random input.
``--impl`` picks the implementation of mmboat's ops (the ``MMBOAT_OPS_IMPL`` variable):
``ext`` the compiled kernels, ``reference`` the pure-PyTorch fallback; with several values every
mmboat model gets one row per value. Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and
the growth of the process's peak resident set (``VmHWM``, reset before each model) on CPU.
``--interleave`` builds every model first and times them in rounds (each round runs every model
once, in turn), so latency ratios are taken side by side even when the machine's load drifts;
peak memory then covers each model's warm-up. Prints one table.
"""
import argparse
import os
import os.path as osp
import statistics
import sys
import threading
from typing import Callable, Dict, List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

#: name -> (registry type, constructor arguments); ``mmboat.`` types use mmboat's ops.
MODEL_ZOO: Dict[str, dict] = {
    'nat-mini': dict(type='mmboat.NAT', arch='mini', out_indices=(0, 1, 2, 3)),
    'nat-tiny': dict(type='mmboat.NAT', arch='tiny', out_indices=(0, 1, 2, 3)),
    'dinat-tiny': dict(type='mmboat.DiNAT', arch='tiny', out_indices=(0, 1, 2, 3)),
    'boat-swin-t': dict(type='mmboat.BOATSwinTransformer', arch='tiny',
                        out_indices=(0, 1, 2, 3)),
    'boat-cswin-t': dict(type='mmboat.BOATCSWinTransformer', arch='tiny',
                         out_indices=(0, 1, 2, 3)),
    'swin-t': dict(type='mmpretrain.SwinTransformer', arch='tiny', out_indices=(0, 1, 2, 3),
                   pad_small_map=True),
    'convnext-t': dict(type='mmpretrain.ConvNeXt', arch='tiny', out_indices=(0, 1, 2, 3)),
}
DEFAULT_MODELS = ['nat-tiny', 'swin-t', 'convnext-t']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Benchmark backbones (mmboat vs stock)')
    parser.add_argument('--models', nargs='+', default=None,
                        help=f'models from {sorted(MODEL_ZOO)}; default {DEFAULT_MODELS}')
    parser.add_argument('--shape', type=int, nargs='+', default=None,
                        help='input H [W]; default 224 (64 with --quick)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--impl', nargs='+', default=['auto'],
                        choices=['auto', 'ext', 'reference'],
                        help='mmboat op implementation(s) (MMBOAT_OPS_IMPL)')
    parser.add_argument('--mode', default='infer', choices=['infer', 'train'],
                        help='infer: no-grad forward; train: forward + backward')
    parser.add_argument('--iters', type=int, default=None, help='timed iterations')
    parser.add_argument('--warmup', type=int, default=None, help='untimed iterations')
    parser.add_argument('--interleave', action='store_true',
                        help='time the models in rounds, one step of each per round')
    parser.add_argument('--quick', action='store_true',
                        help='tiny run (64x64, 2 iterations, 1 warm-up): checks that it works')
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = DEFAULT_MODELS
    unknown = [m for m in args.models if m not in MODEL_ZOO]
    if unknown:
        parser.error(f'unknown model(s) {unknown}; choose from {sorted(MODEL_ZOO)}')
    if args.shape is None:
        args.shape = [64] if args.quick else [224]
    if len(args.shape) == 1:
        args.shape = args.shape * 2
    if len(args.shape) != 2 or min(args.shape) < 1:
        parser.error(f'--shape takes H or H W (positive), got {args.shape}')
    if args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    args.iters = args.iters if args.iters is not None else (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.iters < 1 or args.warmup < 0:
        parser.error('--iters must be >= 1 and --warmup >= 0')
    return args


class CpuPeakMemory:
    """Peak resident-set growth of this process over a ``with`` block, in bytes.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) when allowed, else samples
    the resident set every millisecond in a thread.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _status(field: str) -> int:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f'{field} not in /proc/self/status')

    def __enter__(self) -> 'CpuPeakMemory':
        self.base = self._status('VmRSS')
        self.use_hwm = True
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
        except OSError:
            self.use_hwm = False
        if not self.use_hwm:
            self.sampled = self.base

            def sample() -> None:
                while not self._stop.wait(0.001):
                    self.sampled = max(self.sampled, self._status('VmRSS'))

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.use_hwm:
            top = self._status('VmHWM')
        else:
            self._stop.set()
            self._thread.join()  # type: ignore[union-attr]
            top = max(self.sampled, self._status('VmRSS'))
        self.peak = max(0, top - self.base)


def build_model(name: str):
    from mmengine.registry import MODELS

    import mmboat.models  # noqa: F401
    spec = dict(MODEL_ZOO[name])
    if spec['type'].startswith('mmpretrain.'):
        import mmpretrain.models  # noqa: F401
    return MODELS.build(spec)


def make_step(model, inputs, mode: str) -> Callable[[], None]:
    """One inference (no grad) or training (forward + backward) step."""
    import torch

    def step() -> None:
        if mode == 'infer':
            with torch.no_grad():
                model(inputs)
        else:
            outs = model(inputs)
            sum(o.float().mean() for o in outs).backward()
            model.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    import torch

    from mmboat.utils.timing import time_rounds

    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('--device cuda was requested but no CUDA device is available')
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    h, w = args.shape

    def measure(fn: Callable[[], object]):
        """fn's result and its peak memory in bytes."""
        if device == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            return out, torch.cuda.max_memory_allocated() - base
        with CpuPeakMemory() as mem:
            out = fn()
        return out, mem.peak

    def prepare(name: str, impl: str):
        """The model and its step, which selects its op implementation first."""
        use_impl = (lambda: None) if impl == '-' else (
            lambda: os.environ.__setitem__('MMBOAT_OPS_IMPL', impl))
        use_impl()
        torch.manual_seed(0)
        model = build_model(name).to(device)
        model.train(args.mode == 'train')
        step = make_step(model, torch.randn(args.batch_size, 3, h, w, device=device), args.mode)
        return model, lambda: (use_impl(), step())

    entries = [(name, impl) for name in args.models
               for impl in (args.impl if MODEL_ZOO[name]['type'].startswith('mmboat.') else ['-'])]
    rows = []
    if not args.interleave:  # one model at a time, the others freed
        for name, impl in entries:
            model, step = prepare(name, impl)
            times, peak = measure(
                lambda: time_rounds({0: step}, args.iters, args.warmup, sync)[0])
            rows.append(_row(args, device, name, impl, model, times, peak))
            del model, step
        return rows
    prepared = [prepare(name, impl) for name, impl in entries]
    # Peak memory over each model's warm-up (at least one step), then the timed rounds.
    peaks = [measure(lambda: time_rounds({0: step}, 0, max(args.warmup, 1), sync))[1]
             for _, step in prepared]
    times = time_rounds(dict(enumerate(step for _, step in prepared)), args.iters, 0, sync)
    for i, ((name, impl), (model, _), peak) in enumerate(zip(entries, prepared, peaks)):
        rows.append(_row(args, device, name, impl, model, times[i], peak))
    return rows


def _row(args: argparse.Namespace, device: str, name: str, impl: str, model,
         times: List[float], peak: int) -> Dict[str, object]:
    latency = statistics.median(times)
    h, w = args.shape
    return dict(model=name, impl=impl, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                device=device, batch=args.batch_size, shape=f'{h}x{w}', mode=args.mode,
                latency_ms=latency * 1e3, images_s=args.batch_size / latency,
                peak_mem_mb=peak / 2**20)


def format_table(rows: List[Dict[str, object]]) -> str:
    headers = ['model', 'impl', 'params (M)', 'device', 'batch', 'input', 'mode',
               'latency (ms)', 'images/s', 'peak mem (MB)']
    keys = ['model', 'impl', 'params_m', 'device', 'batch', 'shape', 'mode', 'latency_ms',
            'images_s', 'peak_mem_mb']
    fmt = {'params_m': '{:.1f}', 'latency_ms': '{:.1f}', 'images_s': '{:.2f}',
           'peak_mem_mb': '{:.0f}'}
    cells = [[fmt.get(k, '{}').format(r[k]) for k in keys] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = '| ' + ' | '.join(h.ljust(wd) for h, wd in zip(headers, widths)) + ' |'
    sep = '|' + '|'.join('-' * (wd + 2) for wd in widths) + '|'
    body = ['| ' + ' | '.join(c.rjust(wd) if i >= 2 else c.ljust(wd)
                              for i, (c, wd) in enumerate(zip(cell, widths))) + ' |'
            for cell in cells]
    return '\n'.join([line, sep] + body)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    args = parse_args(argv)
    from mmboat.utils import apply_stack_fixes, limit_cpu_threads

    apply_stack_fixes()
    threads = limit_cpu_threads()
    from mmboat.ops import ext_info

    info = ext_info()
    print(f'mmboat._ext: {"loaded" if info["loaded"] else "missing"}'
          f'{" (CUDA)" if info["with_cuda"] else ""}; CPU threads: {threads}', flush=True)
    saved_impl = os.environ.get('MMBOAT_OPS_IMPL')
    try:
        rows = run(args)
    finally:  # run() selects implementations through MMBOAT_OPS_IMPL; in-process callers
        if saved_impl is None:  # (tests, notebooks) get their setting back
            os.environ.pop('MMBOAT_OPS_IMPL', None)
        else:
            os.environ['MMBOAT_OPS_IMPL'] = saved_impl
    print(format_table(rows), flush=True)
    return rows


if __name__ == '__main__':
    main()
