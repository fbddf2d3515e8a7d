"""Benchmark of BOAT's feature-space local attention (FSLA) ops and layer.

Times, per map size and implementation (compiled ``ext`` vs pure-PyTorch ``reference``):
the clustering, the clustered attention, a whole FSLA layer (mmboat's
``FeatureSpaceLocalAttention``: qkv + clustering + attention + depthwise conv on v + proj), a
Swin 7x7 window-attention layer of the same width and a global attention layer. Forward only,
no grad. The timings of one map size are interleaved (every round runs each candidate once, in
turn) and each keeps its best round, so the ratios are measured side by side even when the
machine's load drifts; the clustering share is the median over the rounds of the clustering's
part of that round's layer forward.

Example:
    python tools/analysis_tools/fsla_benchmark.py              # 28x28, 56x56, 128x128
    python tools/analysis_tools/fsla_benchmark.py --quick      # a tiny smoke run
"""
import argparse
import math
import os.path as osp
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmboat.models.layers.feature_space_attention import FeatureSpaceLocalAttention
from mmboat.ops import balanced_hierarchical_clustering, clustered_attention, has_ext
from mmboat.ops.feature_space_attention_reference import CLUSTER_SIZE, OVERLAP

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # the tools' timing helper
from _timing import time_rounds  # noqa: E402


class FSLALayer(FeatureSpaceLocalAttention):
    """The shipped FSLA module (qkv, clustering, clustered attention, get_v, proj), timed.

    ``clustering_ms`` lists, per forward, the time spent in the clustering.
    """

    def __init__(self, channels: int, num_heads: int, cluster_size: int, overlap: int,
                 impl: Optional[str]) -> None:
        super().__init__(channels, num_heads, cluster_size=cluster_size, overlap=overlap,
                         impl=impl)
        self.clustering_ms: List[float] = []

    def cluster(self, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        out = super().cluster(query)
        self.clustering_ms.append(1e3 * (time.perf_counter() - start))
        return out


class WindowAttentionLayer(nn.Module):
    """Swin window attention (w x w windows, relative position bias) of the same width; maps
    that are not multiples of the window are zero-padded, as Swin does."""

    def __init__(self, channels: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.table = nn.Parameter(torch.zeros((2 * window - 1)**2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer('index', rel[..., 0] * (2 * window - 1) + rel[..., 1],
                             persistent=False)

    def forward(self, x: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
        batch, tokens, channels = x.shape
        ws = self.window
        h, w = -(-hw[0] // ws) * ws, -(-hw[1] // ws) * ws
        x = x.view(batch, hw[0], hw[1], channels)
        x = F.pad(x, (0, 0, 0, w - hw[1], 0, h - hw[0]))
        x = x.view(batch, h // ws, ws, w // ws, ws, channels).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, ws * ws, channels)
        qkv = self.qkv(x).view(x.shape[0], ws * ws, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index.view(-1)].view(ws * ws, ws * ws, -1).permute(2, 0, 1)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        out = self.proj(out.transpose(1, 2).reshape(x.shape[0], ws * ws, channels))
        out = out.view(batch, h // ws, w // ws, ws, ws, channels).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, h, w, channels)[:, :hw[0], :hw[1]]
        return out.reshape(batch, tokens, channels)


class GlobalAttentionLayer(nn.Module):
    """Plain multi-head self-attention over all tokens."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


def fsla_rows(args: argparse.Namespace) -> List[Dict[str, object]]:
    """Measure every (map size, implementation) pair; one dict per row."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = [i for i in args.impls if i != 'ext' or has_ext()]
    rows: List[Dict[str, object]] = []
    heads, m, o, ch = args.heads, args.cluster_size, args.overlap, args.channels
    with torch.no_grad():
        for side in args.sizes:
            hw = (side, side)
            tokens = side * side
            x = torch.randn(args.batch, tokens, ch)
            q, k, v = torch.randn(3, args.batch, heads, tokens, ch // heads).unbind(0)
            window = WindowAttentionLayer(ch, heads, args.window).eval()
            fns: Dict[str, Callable[[], object]] = {'window': lambda: window(x, hw)}
            layers: Dict[str, FSLALayer] = {}
            if tokens <= args.global_max_tokens:
                glob = GlobalAttentionLayer(ch, heads).eval()
                fns['global'] = lambda: glob(x, hw)
            for impl in impls:
                perm, _ = balanced_hierarchical_clustering(q, m, impl=impl)
                layer = layers[impl] = FSLALayer(ch, heads, m, o, impl).eval()
                fns[f'{impl}/clustering'] = (
                    lambda impl=impl: balanced_hierarchical_clustering(q, m, impl=impl))
                fns[f'{impl}/attention'] = (
                    lambda impl=impl, perm=perm: clustered_attention(q, k, v, perm, m, o,
                                                                     impl=impl))
                fns[f'{impl}/layer'] = lambda layer=layer: layer(x, hw)
            times = {name: [1e3 * t for t in ts]  # ms
                     for name, ts in time_rounds(fns, args.repeats, args.warmup).items()}
            best = {name: min(t) for name, t in times.items()}
            window_ms, global_ms = best['window'], best.get('global', float('nan'))
            for impl in impls:
                cluster_ms, attn_ms = best[f'{impl}/clustering'], best[f'{impl}/attention']
                # The share is measured inside the layer (the clustering as the layer runs it, q
                # just written by qkv, not a standalone call): per round, the layer's clustering
                # time over that forward's time; the median over the rounds (one round's ratio is
                # a single noisy sample).
                layer_times = times[f'{impl}/layer']
                layer_ms = min(layer_times)
                in_layer = layers[impl].clustering_ms[-len(layer_times):]
                share = statistics.median(c / t for c, t in zip(in_layer, layer_times))
                rows.append({
                    'map': f'{side}x{side}',
                    'tokens': tokens,
                    'impl': impl,
                    'clustering_ms': cluster_ms,
                    'attention_ms': attn_ms,
                    'fsla_layer_ms': layer_ms,
                    'window_layer_ms': window_ms,
                    'global_layer_ms': global_ms,
                    'fsla_over_window': layer_ms / window_ms,
                    'clustering_share': share,
                })
    return rows


def growth_summary(rows: List[Dict[str, object]]) -> List[str]:
    """FSLA layer time growth between the smallest and largest map vs N log N."""
    lines = []
    for impl in sorted({r['impl'] for r in rows}):
        mine = sorted((r for r in rows if r['impl'] == impl), key=lambda r: r['tokens'])
        if len(mine) < 2:
            continue
        a, b = mine[0], mine[-1]
        n0, n1 = a['tokens'], b['tokens']
        nlogn = n1 * math.log2(n1) / (n0 * math.log2(n0))
        lines.append(f'{impl}: FSLA layer {a["map"]} -> {b["map"]}: time x'
                     f'{b["fsla_layer_ms"] / a["fsla_layer_ms"]:.2f}, N x{n1 / n0:.2f}, '
                     f'N log N x{nlogn:.2f}')
    return lines


def markdown_table(rows: List[Dict[str, object]]) -> str:
    cols = list(rows[0].keys()) if rows else []
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows:
        lines.append('| ' + ' | '.join(f'{r[c]:.3g}' if isinstance(r[c], float) else str(r[c])
                                       for c in cols) + ' |')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Benchmark the FSLA ops and layer (CPU/GPU).')
    parser.add_argument('--sizes', type=int, nargs='+', default=[28, 56, 128],
                        help='square map sides')
    parser.add_argument('--impls', nargs='+', default=['ext', 'reference'],
                        choices=['ext', 'reference'])
    parser.add_argument('--channels', type=int, default=96)
    parser.add_argument('--heads', type=int, default=3)
    parser.add_argument('--cluster-size', type=int, default=CLUSTER_SIZE)
    parser.add_argument('--overlap', type=int, default=OVERLAP)
    parser.add_argument('--window', type=int, default=7)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--threads', type=int, default=0, help='0 keeps torch default')
    parser.add_argument('--global-max-tokens', type=int, default=3136,
                        help='skip global attention above this many tokens')
    parser.add_argument('--quick', action='store_true', help='tiny smoke run')
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.warmup, args.repeats = [14, 28], 1, 2
        args.global_max_tokens = 784
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    rows = fsla_rows(args)
    print(markdown_table(rows))
    for line in growth_summary(rows):
        print(line)


if __name__ == '__main__':
    main()
