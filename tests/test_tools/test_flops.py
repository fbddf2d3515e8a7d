"""FLOP counting: mmboat.ops.flops handles and tools/analysis_tools/get_flops.py against counts
derived here from the architectures alone (layer widths, depths, heads, windows, stripes,
cluster size and overlap), in mmengine's convention: one FLOP is one multiply-add; mmengine's
own handles count ``linear``/``conv`` as MACs without bias, ``layer_norm`` as 5 per element and
``adaptive_avg_pool2d`` as 1 per input element."""
import math
import os
import os.path as osp
import re
import subprocess
import sys
from collections import Counter
from typing import Dict, List, Tuple

import pytest
import torch
from tool_helpers import ROOT, load_tool

import mmboat.models  # noqa: F401  (registers the handles)
from mmboat.models.layers import FeatureSpaceLocalAttention
from mmboat.ops import has_ext

get_flops = load_tool('analysis_tools/get_flops.py')

SWIN_T = osp.join(ROOT, 'configs', 'boat_swin', 'boat-swin-tiny_16xb64_in1k.py')
CSWIN_T = osp.join(ROOT, 'configs', 'boat_cswin', 'boat-cswin-tiny_16xb64_in1k.py')
NAT_T = osp.join(ROOT, 'configs', 'nat', 'nat-tiny_8xb128_in1k.py')

needs_compiled_fsla = pytest.mark.skipif(
    not (has_ext() and hasattr(torch.ops.mmboat, 'bhc_cluster')),
    reason='mmboat._ext has no FSLA kernels')

# ----------------------------------------------------------------------------------------------
# Analytic counts, per operator
# ----------------------------------------------------------------------------------------------


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def leaf_sizes(num_tokens: int, cluster_size: int) -> Tuple[int, List[int]]:
    """docs/feature_space_attention.md#leaf-layout: halve (floor, ceil) until groups fit m."""
    levels, sizes = 0, [num_tokens]
    while max(sizes) > cluster_size:
        sizes = [part for n in sizes for part in (n // 2, n - n // 2)]
        levels += 1
    return levels, sizes


def fsla(count: Counter, n: int, c: int, m: int = 49, o: int = 20, iters: int = 2) -> None:
    """norm + FSLA module on n tokens of c channels (heads only split c: every term is linear
    in the head width)."""
    count['layer_norm'] += 5 * n * c
    count['linear'] += n * c * 3 * c + n * c * c  # qkv, proj
    count['conv'] += n * c * 9  # get_v, depthwise 3x3
    levels, sizes = leaf_sizes(n, m)
    # per level and token: squared norm d, per update 2 cosines + 2 weighted sums, 2 cosines
    count['clustering'] += levels * n * (4 * iters + 3) * c
    for i, size in enumerate(sizes):
        keys = size + (min(o, sizes[i ^ 1]) if levels else 0)
        count['clustered_attention'] += size * keys * 2 * c  # q.k and attn.v


def mlp(count: Counter, n: int, c: int, ratio: float) -> None:
    hidden = int(c * ratio)
    count['layer_norm'] += 5 * n * c
    count['linear'] += 2 * n * c * hidden


def cls_head(count: Counter, n: int, c: int) -> None:
    """Output norm, global average pooling and the 1000-class linear head."""
    count['layer_norm'] += 5 * n * c
    count['adaptive_avg_pool2d'] += n * c
    count['linear'] += c * 1000


def boat_swin_tiny(height: int, width: int) -> Counter:
    count: Counter = Counter()
    c, window = 96, 7
    h, w = ceil_div(height, 4), ceil_div(width, 4)
    count['conv'] += h * w * c * 3 * 4 * 4
    count['layer_norm'] += 5 * h * w * c
    for stage, (depth, fsla_blocks) in enumerate(zip((2, 2, 6, 2), ([1], [1], [1, 3, 5], []))):
        n = h * w
        ws = min(h, w) if min(h, w) <= window else window
        padded = ceil_div(h, ws) * ws * ceil_div(w, ws) * ws
        for block in range(depth):
            count['layer_norm'] += 5 * n * c
            count['linear'] += padded * c * 3 * c + padded * c * c  # on the padded windows
            count['sdpa'] += padded * ws * ws * 2 * c
            if block in fsla_blocks:
                fsla(count, n, c)
            mlp(count, n, c, 4)
        if stage < 3:
            h, w = ceil_div(h, 2), ceil_div(w, 2)
            count['layer_norm'] += 5 * h * w * 4 * c
            count['linear'] += h * w * 4 * c * 2 * c
            c *= 2
    cls_head(count, h * w, c)
    return count


def boat_cswin_tiny(height: int, width: int) -> Counter:
    count: Counter = Counter()
    c = 64
    h, w = (height - 3) // 4 + 1, (width - 3) // 4 + 1  # 7x7 stride 4 padding 2
    count['conv'] += h * w * c * 3 * 7 * 7
    count['layer_norm'] += 5 * h * w * c
    for stage, (depth, stripe) in enumerate(zip((1, 2, 21, 1), (1, 2, 7, 7))):
        n = h * w
        if stage == 3:
            branches = [(h, w, c)]  # the whole map, all heads
        else:  # vertical and horizontal stripes, half of the channels each
            branches = [(h, min(stripe, w), c // 2), (min(stripe, h), w, c // 2)]
        for block in range(depth):
            count['layer_norm'] += 5 * n * c
            count['linear'] += n * c * 3 * c + n * c * c  # qkv, proj
            for sh, sw, dims in branches:
                padded = ceil_div(h, sh) * sh * ceil_div(w, sw) * sw
                count['sdpa'] += padded * sh * sw * 2 * dims
                count['conv'] += padded * dims * 9  # LePE on the padded stripes
            if block % 2 == 0:
                fsla(count, n, c)
            mlp(count, n, c, 4)
        if stage < 3:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # 3x3 stride 2 padding 1
            count['conv'] += h * w * 2 * c * c * 9
            count['layer_norm'] += 5 * h * w * 2 * c
            c *= 2
    cls_head(count, h * w, c)
    return count


def nat_tiny(height: int, width: int) -> Counter:
    count: Counter = Counter()
    c, k = 64, 7
    h, w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    count['conv'] += h * w * (c // 2) * 3 * 9
    h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    count['conv'] += h * w * c * (c // 2) * 9
    count['layer_norm'] += 5 * h * w * c
    for stage, depth in enumerate((3, 4, 18, 5)):
        n = h * w
        padded = max(h, k) * max(w, k)  # maps smaller than the kernel are padded
        for _ in range(depth):
            count['layer_norm'] += 5 * n * c
            count['linear'] += padded * c * 3 * c + n * c * c  # qkv on the padded map, proj
            count['na'] += padded * k * k * 2 * c
            mlp(count, n, c, 3)
        if stage < 3:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            count['conv'] += h * w * 2 * c * c * 9
            count['layer_norm'] += 5 * h * w * 2 * c
            c *= 2
    cls_head(count, h * w, c)
    return count


# get_flops.py lists operators without their namespace; both implementations of an op map to
# one analytic name.
OPERATOR_NAMES = {
    'scaled_dot_product_attention': 'sdpa',
    'bhc_cluster': 'clustering',
    'bhc_cluster_traced': 'clustering',
    'clustered_attention_forward': 'clustered_attention',
    'clustered_attention_traced': 'clustered_attention',
    'na2d_traced': 'na',
}


def parse_macs(printed: str) -> Tuple[int, Dict[str, int]]:
    """The exact total and the per-operator counts of get_flops.py's ``MACs:`` line."""
    match = re.search(r'^MACs: (\d+) \((.*)\)$', printed, re.MULTILINE)
    assert match, f'no MACs line in the output of get_flops.py:\n{printed}'
    per_op: Counter = Counter()
    for item in match.group(2).split(', '):
        name, value = item.rsplit(' ', 1)
        per_op[OPERATOR_NAMES.get(name, name)] += int(value)
    return int(match.group(1)), dict(per_op)


def test_leaf_sizes_follow_the_spec():
    assert leaf_sizes(3136, 49) == (6, [49] * 64)
    assert leaf_sizes(49, 49) == (0, [49])
    levels, sizes = leaf_sizes(825, 49)
    assert levels == 5 and sorted(set(sizes)) == [25, 26] and sum(sizes) == 825


def test_fsla_cost_matches_the_spec_example():
    # docs/feature_space_attention.md#cost-model (56 x 56, C = 96, m = 49, o = 20): projections
    # 116 M, attention 41.5 M, clustering ~20 M multiply-adds.
    count: Counter = Counter()
    fsla(count, 56 * 56, 96)
    assert round(count['linear'] / 1e6) == 116
    assert round(count['clustered_attention'] / 1e5) == 415
    assert round(count['clustering'] / 1e6) == 20


# ----------------------------------------------------------------------------------------------
# Handles on single layers, both implementations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('impl', [
    'reference', pytest.param('ext', marks=needs_compiled_fsla)])
@pytest.mark.parametrize('hw, m, o', [((5, 7), 8, 2), ((9, 11), 8, 5), ((3, 4), 16, 4)])
def test_fsla_handles(impl, hw, m, o):
    from mmengine.analysis import FlopAnalyzer
    h, w = hw
    layer = FeatureSpaceLocalAttention(32, 2, cluster_size=m, overlap=o, iters=3, impl=impl)

    class Tokens(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, (h, w))

    analyzer = FlopAnalyzer(Tokens().eval(), (torch.rand(2, h * w, 32), ))
    analyzer.unsupported_ops_warnings(False)
    by_op = {OPERATOR_NAMES.get(k, k): v for k, v in analyzer.by_operator().items()}
    expected: Counter = Counter()
    fsla(expected, h * w, 32, m=m, o=o, iters=3)
    for name in ('clustering', 'clustered_attention', 'linear', 'conv'):
        assert by_op.get(name, 0) == 2 * expected[name], name  # batch of 2
    assert expected['clustered_attention'] > 0


def test_sdpa_handle():
    from mmengine.analysis import FlopAnalyzer

    class Attention(torch.nn.Module):

        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)

    q, k, v = torch.rand(2, 3, 5, 8), torch.rand(2, 3, 7, 8), torch.rand(2, 3, 7, 4)
    analyzer = FlopAnalyzer(Attention(), (q, k, v))
    assert analyzer.total() == 2 * 3 * 5 * 7 * (8 + 4)


def test_import_of_mmboat_models_registers_the_handles():
    script = ('from mmengine.analysis import complexity_analysis as ca\n'
              'import mmboat.ops.flops\n'
              'table = ca._DEFAULT_SUPPORTED_FLOP_OPS\n'
              'assert "mmboat::bhc_cluster" not in table\n'
              'import mmboat.models\n'
              'names = ["mmboat::bhc_cluster", "mmboat::clustered_attention_forward",\n'
              '         "mmboat::na2d_traced", "aten::scaled_dot_product_attention"]\n'
              'assert all(n in table for n in names), sorted(table)\n')
    subprocess.run([sys.executable, '-c', script], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------------------------
# get_flops.py on the packaged classification configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('config, analytic', [(SWIN_T, boat_swin_tiny),
                                              (CSWIN_T, boat_cswin_tiny)])
def test_get_flops_boat_small_input(capsys, config, analytic):
    # 100 x 132: padded windows and stripes, unequal leaves (825 tokens at stride 4 for Swin).
    result = get_flops.main([config, '--shape', '100', '132'])
    total, per_op = parse_macs(capsys.readouterr().out)
    expected = analytic(100, 132)
    assert per_op == dict(expected)
    assert total == sum(expected.values()) == result['flops']
    assert result['unsupported_mmboat_ops'] == {}


@pytest.mark.slow
@pytest.mark.parametrize('config, analytic, readme', [
    (SWIN_T, boat_swin_tiny, 'configs/boat_swin/README.md'),
    (CSWIN_T, boat_cswin_tiny, 'configs/boat_cswin/README.md'),
    (NAT_T, nat_tiny, 'configs/nat/README.md'),
])
def test_get_flops_at_224_matches_analytic_and_readme(config, analytic, readme):
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    run = subprocess.run([sys.executable, 'tools/analysis_tools/get_flops.py', config],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    total, per_op = parse_macs(run.stdout)
    expected = analytic(224, 224)
    assert per_op == dict(expected)
    assert total == sum(expected.values())
    assert 'counted as 0' not in run.stdout
    # The README's FLOP table holds this measurement (GMACs, 2 decimals).
    with open(osp.join(ROOT, readme), encoding='utf-8') as f:
        assert f'{total / 1e9:.2f}' in f.read(), (readme, total)


def test_nat_tiny_analytic_is_the_published_count():
    assert round(sum(nat_tiny(224, 224).values()) / 1e9, 1) == 4.3  # docs/models.md
    assert math.isclose(sum(nat_tiny(224, 224).values()) / 1e9, 4.32, abs_tol=5e-3)
