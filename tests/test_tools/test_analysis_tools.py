"""tools/analysis_tools: get_flops.py counts mmboat's NA ops; benchmark.py prints its table."""
import argparse
import glob
import json
import math
import os
import os.path as osp
import time

import pytest
from tool_helpers import DET_CONFIG, ROOT, SEG_CONFIG, load_tool, run_script, tiny_seg_options

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


def _weights_mb(row) -> float:
    return row['params_m'] * 1e6 * 4 / 2**20  # float32 parameters


def test_benchmark_backbone_rows(capsys):
    rows = benchmark.main(['--quick', '--models', 'nat-mini', 'convnext-t', '--impl',
                           'reference', '--warmup', '0', '--iters', '1'])
    table = capsys.readouterr().out
    assert [(r['model'], r['impl']) for r in rows] == [('nat-mini', 'reference'),
                                                       ('convnext-t', '-')]
    for row in rows:
        assert row['latency_ms'] > 0 and row['images_s'] > 0
        # Each row's fresh process holds at least the float32 weights; 64x64 activations are
        # small next to them.
        assert _weights_mb(row) <= row['peak_mem_mb'] < _weights_mb(row) + 200
    assert 'images/s' in table and 'peak mem (MB)' in table and '| convnext-t ' in table
    assert abs(rows[0]['params_m'] - 19.5) < 1.0  # NAT-Mini backbone without its head


@pytest.mark.slow  # ~15 s idle, 30 s on a loaded 2-core machine
def test_benchmark_interleaved_rows_measure_memory(capsys):
    # Rows timed in one process used to report 0 MB: memory freed by one model was reused by
    # the next without growing the resident set. Each row's memory now comes from a fresh
    # process.
    impl_before = os.environ.get('MMBOAT_OPS_IMPL')
    rows = benchmark.main(['--quick', '--interleave', '--models', 'nat-mini', '--impl', 'auto',
                           'reference', '--warmup', '0', '--iters', '2', '--repeat-num', '2'])
    assert [(r['run'], r['impl']) for r in rows] == [(1, 'auto'), (1, 'reference'),
                                                     (2, 'auto'), (2, 'reference')]
    for row in rows:
        assert row['latency_ms'] > 0 and row['images_s'] > 0
        assert _weights_mb(row) <= row['peak_mem_mb'] < _weights_mb(row) + 200
    printed = capsys.readouterr().out
    assert '| run ' in printed and 'nat-mini [reference]: ' in printed
    assert 'over 2 runs' in printed
    assert os.environ.get('MMBOAT_OPS_IMPL') == impl_before  # --impl does not leak out


def test_peak_memory_sees_reused_heap_memory():
    import torch

    def allocate():  # 64 MiB in 64 KiB tensors: heap memory, kept by malloc once freed
        blocks = [torch.ones(16 * 1024) for _ in range(1024)]
        del blocks

    for _ in range(2):  # the second time, the memory freed by the first is reused
        memory = benchmark.PeakMemory('cpu').start()
        allocate()
        assert 60 * 2**20 < memory.stop() < 200 * 2**20


def _options(strings):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--o', nargs='+', action=DictAction)
    return parser.parse_args(['--o', *strings]).o


def _seg_model(options):
    """The demo segmentor with ``options`` applied, built here (random weights)."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmseg.utils import register_all_modules

    import mmboat.models  # noqa: F401
    register_all_modules(init_default_scope=False)
    init_default_scope('mmseg')
    cfg = Config.fromfile(SEG_CONFIG)
    cfg.merge_from_dict(_options(options))
    torch.manual_seed(0)
    return MODELS.build(cfg.model)


def test_benchmark_config_with_checkpoint(tmp_path, capsys):
    import torch
    options = tiny_seg_options(str(tmp_path))
    model = _seg_model(options)
    checkpoint = str(tmp_path / 'seg.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    work_dir = tmp_path / 'work'
    rows = benchmark.main([SEG_CONFIG, checkpoint, '--cfg-options', *options, '--iters', '2',
                           '--num-warmup', '1', '--batch-size', '2', '--log-interval', '1',
                           '--work-dir', str(work_dir)])
    printed = capsys.readouterr().out
    [row] = rows
    assert row['shape'] == '64x64' and row['batch'] == 2 and row['mode'] == 'infer'
    assert round(row['params_m'] * 1e6) == sum(p.numel() for p in model.parameters())
    assert row['peak_mem_mb'] > 0 and row['images_s'] > 0
    assert 'seg.pth (100% of the model)' in printed
    assert 'input 64x64: the model\'s data_preprocessor size' in printed
    [saved] = glob.glob(str(work_dir / 'benchmark_*.json'))
    with open(saved) as f:
        dump = json.load(f)
    assert dump['rows'][0]['images_s'] == row['images_s'] and dump['args']['config'] == SEG_CONFIG


def test_benchmark_config_refuses_wrong_checkpoints(tmp_path):
    import torch
    from mmengine.registry import MODELS

    import mmboat.models  # noqa: F401
    options = tiny_seg_options(str(tmp_path))
    spec = dict(label='seg', impl='auto', config=SEG_CONFIG, cfg_options=_options(options),
                device='cpu', shape=None, batch=1, mode='infer', warmup=0, iters=1,
                log_interval=0, threads=1)
    boat = MODELS.build(dict(type='mmboat.BOATSwinTransformer', arch=dict(
        embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])))
    torch.save({'state_dict': {'backbone.' + k: v for k, v in boat.state_dict().items()}},
               tmp_path / 'boat.pth')
    with pytest.raises(RuntimeError, match='of a BOAT-Swin model, given to a NAT/DiNAT'):
        benchmark.build_entry(dict(spec, checkpoint=str(tmp_path / 'boat.pth')))
    wide = _seg_model(options + ['model.backbone.arch.embed_dims=32',
                                 'model.decode_head.in_channels=[32,64,128,256]'])
    torch.save({'state_dict': wide.state_dict()}, tmp_path / 'wide.pth')
    with pytest.raises(RuntimeError, match='would load only'):
        benchmark.build_entry(dict(spec, checkpoint=str(tmp_path / 'wide.pth')))


def test_benchmark_config_test_step_det_and_cls():
    base = dict(impl='auto', device='cpu', shape=None, batch=1, mode='infer', warmup=0, iters=1,
                log_interval=0, threads=1)
    det = benchmark.run_row(dict(base, label='det', config=DET_CONFIG))
    assert det['shape'] == [64, 64] and len(det['times']) == 1 and det['peak_bytes'] > 0
    assert any('Resize(scale=(64, 64), keep_ratio=True)' in n for n in det['notes'])
    assert any('RANDOM' in n and 'detector' in n for n in det['notes'])
    cls = benchmark.run_row(dict(base, label='cls', shape=[96, 96], config=osp.join(
        ROOT, 'configs', 'nat', 'nat-mini_8xb128_in1k.py')))
    assert cls['shape'] == [96, 96] and 'input 96x96: --shape' in cls['notes']
    assert 19e6 < cls['params'] < 21e6  # NAT-Mini with its 1000-class head


def test_benchmark_config_test_shape():
    from mmengine.config import Config
    expected = {'nat/mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py': (800, 800),  # (1333, 800)
                'boat_swin/boat-swin-tiny_upernet_8xb2-160k_ade20k-512x512.py': (512, 512),
                'dinat/dinat-tiny_8xb128_in1k.py': (224, 224)}  # ResizeEdge 256, CenterCrop 224
    for name, shape in expected.items():
        assert benchmark.config_test_shape(Config.fromfile(osp.join(ROOT, 'configs', name)))[
            0] == shape
    bare = Config(dict(model=dict(type='X'), test_pipeline=[dict(type='LoadImageFromFile')]))
    with pytest.raises(ValueError, match='pass --shape H W'):
        benchmark.config_test_shape(bare)


def test_benchmark_bad_args(tmp_path):
    bad = [['--models', 'resnet-9000'], ['--batch-size', '0'], [SEG_CONFIG, '--models', 'swin-t'],
           ['--models', 'swin-t', '--cfg-options', 'a=1'], [SEG_CONFIG, '--mode', 'train'],
           ['nat-tiny'], [SEG_CONFIG, str(tmp_path / 'missing.pth')],
           [SEG_CONFIG, 'a.pth', '--checkpoint', 'b.pth'], ['--repeat-num', '0']]
    for argv in bad:
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)
    args = benchmark.parse_args([SEG_CONFIG, '--max-iter', '7', '--num-warmup', '0',
                                 '--repeat-times', '3', '--launcher', 'none'])
    assert (args.iters, args.warmup, args.repeat_num, args.shape) == (7, 0, 3, None)


@pytest.mark.slow
def test_benchmark_two_ranks(tmp_path):
    import socket
    import sys
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    proc = run_script([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                       '--master_port', str(port), osp.join(ROOT, 'tools', 'analysis_tools',
                                                            'benchmark.py'),
                       '--launcher', 'pytorch', '--models', 'nat-mini', '--quick'], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('| ')]
    assert lines[0].startswith('| rank | model')
    assert [line.split('|')[1].strip() for line in lines[1:]] == ['0', '1']  # printed once


def test_time_rounds_rewarm_and_settle():
    time_rounds = load_tool('analysis_tools/_timing.py').time_rounds
    calls = []
    times = time_rounds({'a': lambda: calls.append('a')}, repeats=3, warmup=1, rewarm=1)
    assert len(times['a']) == 3 and len(calls) == 1 + 3 * 2  # warmup + (re-warm + timed)
    calls.clear()
    time_rounds({'a': lambda: calls.append(time.sleep(0.002))}, repeats=2, settle=0.02)
    # each timed call follows >= 20 ms of untimed 2 ms calls (and sleeps never run short)
    assert 2 * (1 + 5) <= len(calls) <= 2 * (1 + 11)
