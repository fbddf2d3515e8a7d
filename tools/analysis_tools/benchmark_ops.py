"""Benchmark the mmboat ops on CPU (or CUDA) and print markdown tables.

Suites:

* ``na``: neighborhood attention (``mmboat.ops.na2d``) per problem ``B x heads x H x W x D,
  k, dilation``: the compiled op, the pure-PyTorch reference, dense SDPA over the whole map and
  Swin-style 7x7 window attention through SDPA on the same tokens; forward and
  forward+backward times (all of them, and a ``torch.mm`` GEMM, timed warm in alternating
  rounds, each timed call after at least ``--settle-ms`` of untimed ones) and, for the
  compiled op, their ratio, its GFLOP/s and its share of the GEMM rate measured in those
  rounds. The forward runs under ``no_grad``; forward+backward goes through autograd, and
  an ``ops`` column times the registered forward and backward ops called directly (the
  kernels without torch's autograd machinery, which costs tens of microseconds per
  backward on a 2-core CPU).
* ``fsla``: hook for the feature-space local attention benchmark; runs
  ``fsla_rows(args)`` from ``tools/analysis_tools/fsla_benchmark.py`` when that file exists
  (it returns ``(header, rows)``: a list of column names and a list of rows of strings).

Examples:
    python tools/analysis_tools/benchmark_ops.py --suite na --threads 2
    python tools/analysis_tools/benchmark_ops.py --quick
    python tools/analysis_tools/benchmark_ops.py --problems 1,2,56,56,32,7,1 8,2,56,56,32,7,8
"""
import argparse
import importlib.util
import os
import statistics
import sys
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the tools' timing helper

from _timing import time_rounds  # noqa: E402

from mmboat.ops import na2d, neighborhood_attention_op_available  # noqa: E402

Table = Tuple[List[str], List[List[str]]]


class NAProblem(NamedTuple):
    batch: int
    heads: int
    height: int
    width: int
    dim: int
    kernel: int
    dilation: int

    def label(self) -> str:
        return (f'{self.batch}x{self.heads}x{self.height}x{self.width}x{self.dim} '
                f'k{self.kernel} d{self.dilation}')

    def tokens(self) -> int:
        return self.height * self.width

    def flops(self) -> float:
        """Forward FLOPs of NA: 2 x (logits + weighted sum) multiply-adds (NA doc: Cost model)."""
        return 2.0 * 2 * self.batch * self.heads * self.tokens() * self.kernel**2 * self.dim


DEFAULT_PROBLEMS = [
    NAProblem(1, 2, 56, 56, 32, 7, 1),  # NAT-Tiny stage 1 at 224x224
    NAProblem(1, 4, 28, 28, 32, 7, 1),
    NAProblem(1, 8, 14, 14, 32, 7, 1),
    NAProblem(1, 16, 7, 7, 32, 7, 1),
    NAProblem(8, 2, 56, 56, 32, 7, 1),
    NAProblem(1, 2, 56, 56, 32, 7, 8),  # DiNAT dilated stage 1
    NAProblem(1, 2, 200, 336, 32, 7, 1),  # detection-sized stage 1 (800x1344 / 4)
    NAProblem(1, 2, 200, 336, 32, 7, 8),
]
QUICK_PROBLEMS = [NAProblem(1, 2, 14, 14, 32, 7, 1), NAProblem(1, 2, 14, 14, 32, 7, 2)]


# ------------------------------------------------------------------------------------------
# Timing helpers.
# ------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _forward_backward(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                      grad: torch.Tensor) -> Callable[[], None]:

    def run():
        out = fn(*inputs)
        torch.autograd.backward(out, grad)
        for t in inputs:
            t.grad = None

    return run


def _ops_forward_backward(p: NAProblem, inputs: Sequence[torch.Tensor],
                          grad: torch.Tensor) -> Callable[[], None]:
    """``mmboat::na2d_forward`` then ``mmboat::na2d_backward``, called directly."""
    q, k, v, rpb = (t.detach() for t in inputs)
    sizes, dils, causal = [p.kernel] * 2, [p.dilation] * 2, [False, False]
    scale = p.dim**-0.5
    fwd = torch.ops.mmboat.na2d_forward.default
    bwd = torch.ops.mmboat.na2d_backward.default

    def run():
        out, lse = fwd(q, k, v, rpb, sizes, dils, causal, scale)
        bwd(grad, q, k, v, rpb, out, lse, sizes, dils, causal, scale)

    return run


def _fmt(ms: Optional[float]) -> str:
    return '-' if ms is None else f'{ms:.3f}'


# ------------------------------------------------------------------------------------------
# The na suite.
# ------------------------------------------------------------------------------------------
def swin_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          window: int) -> torch.Tensor:
    """Non-overlapping ``window x window`` attention via SDPA on ``[B, heads, H, W, D]``
    (zero-padded to a multiple of the window, as Swin does)."""
    b, h, height, width, d = query.shape
    pad_h, pad_w = (-height) % window, (-width) % window

    def part(x):
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hh, ww = (height + pad_h) // window, (width + pad_w) // window
        x = x.view(b, h, hh, window, ww, window, d).permute(0, 2, 4, 1, 3, 5, 6)
        return x.reshape(b * hh * ww, h, window * window, d)

    out = F.scaled_dot_product_attention(part(query), part(key), part(value))
    hh, ww = (height + pad_h) // window, (width + pad_w) // window
    out = out.view(b, hh, ww, h, window, window, d).permute(0, 3, 1, 4, 2, 5, 6)
    out = out.reshape(b, h, hh * window, ww * window, d)
    return out[:, :, :height, :width]


def dense_attention(query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> torch.Tensor:
    """Full self-attention over the whole map via SDPA on ``[B, heads, H, W, D]``."""
    out = F.scaled_dot_product_attention(query.flatten(2, 3), key.flatten(2, 3),
                                         value.flatten(2, 3))
    return out.view_as(query)


def na_rows(args: argparse.Namespace) -> Table:
    """Rows of the ``na`` suite."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    problems = QUICK_PROBLEMS if args.quick else (args.problems or DEFAULT_PROBLEMS)
    has_ext = neighborhood_attention_op_available('na2d_forward', device)
    header = [
        'problem', 'NA ext fwd ms', 'NA ext fwd+bwd ms', 'fwd+bwd / fwd',
        'ops fwd+bwd ms (no autograd)', 'ops fwd+bwd / fwd', 'NA ext GFLOP/s',
        f'% of {args.dtype} GEMM GFLOP/s (torch.mm {args.gemm_size}^3, same rounds)',
        'NA ref fwd ms', 'NA ref fwd+bwd ms', 'dense SDPA fwd ms', 'dense SDPA fwd+bwd ms',
        'Swin 7x7 SDPA fwd ms', 'Swin 7x7 SDPA fwd+bwd ms'
    ]
    rows = []
    for p in problems:
        gen = torch.Generator(device='cpu').manual_seed(0)
        shape = (p.batch, p.heads, p.height, p.width, p.dim)
        q, k, v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
                   for _ in range(3))
        rpb = torch.randn(p.heads, 2 * p.kernel - 1, 2 * p.kernel - 1,
                          generator=gen).to(device, dtype).requires_grad_()
        grad = torch.randn(shape, generator=gen).to(device, dtype)
        inputs = (q, k, v, rpb)
        reps = args.reps

        # Every implementation's forward and forward+backward run once per round, in turn,
        # so the ratios between them are taken side by side on a shared machine; each timed
        # call follows untimed ones of the same function, for at least --settle-ms.
        impls = {}
        if has_ext:
            impls['ext'] = (lambda *a: na2d(*a, kernel_size=p.kernel, dilation=p.dilation,
                                            impl='ext'), inputs)
        ref_elems = 2 * p.batch * p.heads * p.tokens() * p.kernel**2 * p.dim
        if ref_elems <= args.max_reference_elems:
            impls['ref'] = (lambda *a: na2d(*a, kernel_size=p.kernel, dilation=p.dilation,
                                            impl='reference'), inputs)
        if p.tokens() <= args.max_dense_tokens:
            impls['dense'] = (dense_attention, (q, k, v))
        impls['swin'] = (lambda *a: swin_window_attention(*a, 7), (q, k, v))

        def forward(fn, inp):

            def run():
                with torch.no_grad():
                    fn(*inp)

            return run

        # The GEMM that "% of GEMM" refers to runs in the same rounds too.
        ga = torch.randn(args.gemm_size, args.gemm_size, device=device, dtype=dtype)
        gb = torch.randn_like(ga)
        fns = {('gemm', 'fwd'): lambda: torch.mm(ga, gb)}
        for name, (fn, inp) in impls.items():
            fns[(name, 'fwd')] = forward(fn, inp)
            fns[(name, 'both')] = _forward_backward(fn, inp, grad)
        if has_ext:
            # The registered forward and backward ops called directly: the kernels' own
            # fwd+bwd, without torch's autograd machinery around them.
            fns[('ops', 'both')] = _ops_forward_backward(p, inputs, grad)
        times = time_rounds(fns, reps, 2, lambda: _sync(device), rewarm=1,
                            settle=args.settle_ms * 1e-3)
        med = {key: statistics.median(t) * 1e3 for key, t in times.items()}
        ext, ref, dense, swin = ((med[(name, 'fwd')], med[(name, 'both')]) if name in impls else
                                 (None, None) for name in ('ext', 'ref', 'dense', 'swin'))
        gflops = pct = ratio = ops_ratio = '-'
        ops = med.get(('ops', 'both'))
        if ext[0] is not None:
            ratio = f'{ext[1] / ext[0]:.2f}x'
            ops_ratio = f'{ops / ext[0]:.2f}x'
            rate = p.flops() / (ext[0] * 1e-3) / 1e9
            gemm_rate = 2.0 * args.gemm_size**3 / (med[('gemm', 'fwd')] * 1e-3) / 1e9
            gflops = f'{rate:.1f}'
            pct = f'{100 * rate / gemm_rate:.0f}% of {gemm_rate:.0f}'
        rows.append([
            p.label(),
            _fmt(ext[0]),
            _fmt(ext[1]), ratio,
            _fmt(ops), ops_ratio, gflops, pct,
            _fmt(ref[0]),
            _fmt(ref[1]),
            _fmt(dense[0]),
            _fmt(dense[1]),
            _fmt(swin[0]),
            _fmt(swin[1])
        ])
        print(f'  done {p.label()}', file=sys.stderr, flush=True)
    return header, rows


def fsla_rows_hook(args: argparse.Namespace) -> Optional[Table]:
    """The ``fsla`` suite, provided by ``fsla_benchmark.py`` next to this file if present."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fsla_benchmark.py')
    if not os.path.exists(path):
        print('fsla suite: tools/analysis_tools/fsla_benchmark.py not found, skipped',
              file=sys.stderr)
        return None
    spec = importlib.util.spec_from_file_location('fsla_benchmark', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fsla_rows(args)


SUITES = {'na': na_rows, 'fsla': fsla_rows_hook}


# ------------------------------------------------------------------------------------------
# Entry point.
# ------------------------------------------------------------------------------------------
def print_table(title: str, table: Table) -> None:
    header, rows = table
    print(f'\n### {title}\n')
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '|'.join(['---'] * len(header)) + '|')
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')


def _problem(text: str) -> NAProblem:
    values = [int(v) for v in text.split(',')]
    if len(values) != 7:
        raise argparse.ArgumentTypeError(
            f'a problem is B,heads,H,W,D,kernel,dilation (7 ints), got {text!r}')
    return NAProblem(*values)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--suite', choices=['na', 'fsla', 'all'], default='na')
    parser.add_argument('--quick', action='store_true', help='tiny problems, 2 repetitions')
    parser.add_argument('--problems', type=_problem, nargs='+', default=None,
                        help='NA problems as B,heads,H,W,D,kernel,dilation')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float64',
                                                                'bfloat16', 'float16'])
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--reps', type=int, default=None,
                        help='timed repetitions per measurement (default 10, quick 2)')
    parser.add_argument('--gemm-size', type=int, default=None,
                        help='n of the n x n x n GEMM timed with each NA problem '
                        '(default 2048, quick 512)')
    parser.add_argument('--settle-ms', type=float, default=None,
                        help='untimed calls of a function before each timed one last at least '
                        'this long, so no call is timed in the slow spell that follows the '
                        'all-core GEMM on small shared machines (default 25, quick 0)')
    parser.add_argument('--max-dense-tokens', type=int, default=16384,
                        help='skip dense SDPA above this many tokens per map')
    parser.add_argument('--max-reference-elems', type=float, default=5e7,
                        help='skip the reference above this many gathered elements')
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 10
    if args.gemm_size is None:
        args.gemm_size = 512 if args.quick else 2048
    if args.settle_ms is None:
        args.settle_ms = 0.0 if args.quick else 25.0
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f'torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, '
          f'dtype {args.dtype}')
    names = ['na', 'fsla'] if args.suite == 'all' else [args.suite]
    for name in names:
        table = SUITES[name](args)
        if table is not None:
            print_table(name, table)
    print('\ntimes are medians in ms; NA GFLOP/s counts 4*B*heads*H*W*k*k*D (NA doc: Cost model); '
          '"-" = not run (op missing, or size above --max-dense-tokens / '
          '--max-reference-elems)')


if __name__ == '__main__':
    main()
