"""tools/analysis_tools: get_flops.py counts mmboat's NA ops; benchmark.py prints its table."""
import math
import os
import time

import pytest
from tool_helpers import SEG_CONFIG, load_tool

get_flops = load_tool('analysis_tools/get_flops.py')
benchmark = load_tool('analysis_tools/benchmark.py')


def test_get_flops_counts_neighborhood_attention(capsys):
    # Demo model (NAT-Mini widths, depths 1,1,2,1, k=7) at 64x64.
    result = get_flops.main([SEG_CONFIG, '--shape', '64'])
    printed = capsys.readouterr().out
    assert 'Flops:' in printed and 'Params:' in printed
    assert result['unsupported_mmboat_ops'] == {}
    # docs/neighborhood_attention.md#cost-model: 2 * B * heads * H * W * k * k * head_dim per
    # layer, on the map padded up to k * d (here 7) by the layer.
    expected = 0
    side = 16
    for depth, heads, dims in zip([1, 1, 2, 1], [2, 4, 8, 16], [64, 128, 256, 512]):
        padded = max(side, 7)
        expected += depth * 2 * heads * padded * padded * 49 * (dims // heads)
        side = math.ceil(side / 2)
    assert result['mmboat_flops'] == expected
    assert result['flops'] > expected
    assert 6.0e6 < result['params'] < 7.5e6


def test_get_flops_bad_shape():
    with pytest.raises(SystemExit):
        get_flops.parse_args([SEG_CONFIG, '--shape', '1', '2', '3'])


def test_benchmark_quick_table(capsys):
    impl_before = os.environ.get('MMBOAT_OPS_IMPL')
    rows = benchmark.main(['--quick', '--models', 'nat-mini', 'convnext-t', '--impl', 'auto',
                           'reference', '--warmup', '0', '--iters', '1'])
    table = capsys.readouterr().out
    assert [(r['model'], r['impl']) for r in rows] == [('nat-mini', 'auto'),
                                                       ('nat-mini', 'reference'),
                                                       ('convnext-t', '-')]
    for row in rows:
        assert row['latency_ms'] > 0 and row['images_s'] > 0 and row['peak_mem_mb'] >= 0
    assert 'images/s' in table and 'peak mem (MB)' in table
    assert sum(line.startswith('| nat-mini') for line in table.splitlines()) == 2
    assert abs(rows[0]['params_m'] - 19.5) < 1.0  # NAT-Mini backbone without its head
    assert os.environ.get('MMBOAT_OPS_IMPL') == impl_before  # --impl does not leak out


def test_benchmark_interleaved(capsys):
    rows = benchmark.main(['--quick', '--interleave', '--models', 'nat-mini', 'convnext-t',
                           '--impl', 'reference', '--warmup', '0', '--iters', '2'])
    assert [(r['model'], r['impl']) for r in rows] == [('nat-mini', 'reference'),
                                                       ('convnext-t', '-')]
    for row in rows:
        assert row['latency_ms'] > 0 and row['images_s'] > 0 and row['peak_mem_mb'] >= 0
    assert 'convnext-t' in capsys.readouterr().out


def test_benchmark_bad_args():
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--models', 'resnet-9000'])
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--batch-size', '0'])


def test_time_rounds_rewarm_and_settle():
    from mmboat.utils.timing import time_rounds
    calls = []
    times = time_rounds({'a': lambda: calls.append('a')}, repeats=3, warmup=1, rewarm=1)
    assert len(times['a']) == 3 and len(calls) == 1 + 3 * 2  # warmup + (re-warm + timed)
    calls.clear()
    time_rounds({'a': lambda: calls.append(time.sleep(0.002))}, repeats=2, settle=0.02)
    # each timed call follows >= 20 ms of untimed 2 ms calls (and sleeps never run short)
    assert 2 * (1 + 5) <= len(calls) <= 2 * (1 + 11)
