"""The CPU side of tools/gpu_check.sh: argument handling, a clean refusal that names what is
missing, and the pure logic of its preflight and benchmark modules."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from tool_helpers import ROOT, TOOLS, load_tool

preflight = load_tool('gpu_check/preflight.py')
benchmark = load_tool('gpu_check/benchmark.py')
SCRIPT = osp.join(TOOLS, 'gpu_check.sh')


def _run(*args, **env):
    return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, 'PYTHON': sys.executable, **env}, timeout=300)


def test_usage_without_out_dir():
    for args in ((), ('--quick', ), ('out', '--bogus')):
        res = _run(*args)
        assert res.returncode == 64 and 'usage: bash tools/gpu_check.sh OUT_DIR' in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_refuses_cleanly_without_a_gpu(tmp_path):
    res = _run(str(tmp_path / 'out'))
    assert res.returncode == 2, res.stdout + res.stderr
    assert 'this machine cannot run the GPU check' in res.stderr
    assert 'MISSING: ' in res.stderr and 'Traceback' not in res.stderr + res.stdout
    expected = ('is a CPU build' if torch.version.cuda is None else 'no CUDA device is visible')
    assert expected in res.stderr
    summary = (tmp_path / 'out' / 'summary.txt').read_text()
    assert f'TORCH={torch.__version__}' in summary and 'MISSING: ' in summary
    assert not (tmp_path / 'out' / 'build.log').exists()  # nothing was built


def test_preflight_names_each_missing_piece(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', '12.8')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch, '__version__', '2.5.1+cu128')
    monkeypatch.setenv('PATH', '/nonexistent')
    monkeypatch.setenv('CUDA_HOME', '/nonexistent')
    facts, missing = preflight.check()
    text = '\n'.join(missing)
    assert 'older than 2.6' in text
    assert 'no CUDA device is visible' in text
    assert 'nvcc (the CUDA compiler) is not on PATH' in text
    assert 'TORCH=2.5.1+cu128' in facts
    monkeypatch.setattr(torch.version, 'cuda', None)
    _, missing = preflight.check()
    assert any('is a CPU build' in m for m in missing)


def test_benchmark_shapes_and_tables(tmp_path):
    # NAT-Tiny stages; DiNAT's dilation min(8, L // k), never larger than the map allows.
    assert benchmark.STAGES == [(56, 2), (28, 4), (14, 8), (7, 16)]
    assert [benchmark.dilations(s) for s, _ in benchmark.STAGES] == [[1, 8], [1, 4], [1, 2], [1]]
    for side, _ in benchmark.STAGES:
        assert all(side >= benchmark.KERNEL * d for d in benchmark.dilations(side))
    row = dict(dtype='float16', map='56x56', heads=2, batch=1, dilation=8, na_fwd=0.1,
               na_fwd_bwd=0.3, swin_fwd=0.2, swin_fwd_bwd=0.5, dense_fwd=1.0, dense_fwd_bwd=3.0)
    text = benchmark.render(dict(device='GPU', torch='2.x', attention=[row],
                                 layers='mmengine is not importable (x)', backbones='same'))
    assert '| float16 | 56x56 | 2 | 1 | 8 | 0.100 | 0.200 | 1.000 | 0.300 | 0.500 | 3.000 |' in text
    assert 'skipped: mmengine is not importable (x)' in text
    if not torch.cuda.is_available():
        assert benchmark.main(['--out', str(tmp_path)]) == 2
