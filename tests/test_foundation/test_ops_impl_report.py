"""The one log line that says which implementation each mmboat op family runs on, and why."""
import logging

import pytest
import torch

from mmboat.ops import clustered_attention, ext_loader, na2d
from mmboat.ops.ext_loader import describe_ops_impl, ops_impl_choice

NA, FSLA = 'neighborhood attention', 'feature-space attention'
COMPILED_CPU = 'compiled CPU kernels (mmboat._ext)'


def _dispatcher_has(op: str, key: str) -> bool:
    """An independent look at the dispatcher (not through mmboat's helpers)."""
    return ext_loader.has_ext() and torch._C._dispatch_has_kernel_for_dispatch_key(
        f'mmboat::{op}', key)


@pytest.fixture
def no_ops_env(monkeypatch):
    monkeypatch.delenv('MMBOAT_OPS_IMPL', raising=False)


def test_auto_on_this_build(no_ops_env):
    line = describe_ops_impl(device='cpu', dtype=torch.float32)
    assert line.startswith('mmboat ops (cpu, float32): ')
    assert "reason: impl 'auto' (MMBOAT_OPS_IMPL unset)" in line
    for family, op in ((NA, 'na2d_forward'), (FSLA, 'clustered_attention_forward')):
        expected = COMPILED_CPU if _dispatcher_has(op, 'CPU') else 'pure-PyTorch reference (cpu)'
        assert f'{family} -> {expected}' in line, line
    # A device without mmboat kernels (or a CPU-only build on CUDA) runs the reference there.
    for device in ('mps', ) + (() if ext_loader.ext_info()['with_cuda'] else ('cuda', )):
        choice, reason = ops_impl_choice('na2d_forward', device=device)
        assert choice == f'pure-PyTorch reference ({device})', (choice, reason)
        if ext_loader.has_ext():
            assert f'has no {device.upper()} kernel for mmboat::na2d_forward' in reason


def test_forced_reference(monkeypatch):
    monkeypatch.setenv('MMBOAT_OPS_IMPL', 'reference')
    line = describe_ops_impl(device='cpu')
    assert f'{NA} -> pure-PyTorch reference (cpu); {FSLA} -> pure-PyTorch reference (cpu)' in line
    assert line.endswith('reason: MMBOAT_OPS_IMPL=reference: the reference is forced')
    # The layers' own impl argument wins over the environment.
    monkeypatch.setenv('MMBOAT_OPS_IMPL', 'auto')
    assert describe_ops_impl([NA], impl='reference', device='cpu').endswith(
        "reason: impl='reference' (model argument): the reference is forced")
    with pytest.raises(ValueError, match='impl must be one of'):
        describe_ops_impl([NA], impl='fast')
    with pytest.raises(ValueError, match='unknown mmboat op families'):
        describe_ops_impl(['window attention'])


def test_extension_missing(monkeypatch, no_ops_env):
    monkeypatch.setitem(ext_loader._state, 'loaded', False)
    monkeypatch.setitem(ext_loader._state, 'error', 'ImportError: simulated')
    line = describe_ops_impl(device='cpu')
    assert f'{NA} -> pure-PyTorch reference (cpu)' in line
    assert 'mmboat._ext did not load (ImportError: simulated)' in line
    choice, reason = ops_impl_choice('bhc_cluster', impl='ext')
    assert choice == 'error at the first call'
    assert 'compiled op is required' in reason and 'simulated' in reason


@pytest.mark.skipif(not _dispatcher_has('clustered_attention_forward', 'CPU'),
                    reason='needs the compiled CPU kernels')
def test_dtype_without_kernel_matches_the_dispatch(no_ops_env):
    """float16 on CPU: FSLA clusters on the compiled op but attends on the reference."""
    line = describe_ops_impl([FSLA], device='cpu', dtype=torch.float16)
    assert (f'{FSLA} -> clustering: {COMPILED_CPU}, attention: pure-PyTorch reference (cpu)'
            in line), line
    assert 'CPU kernels of mmboat::clustered_attention_forward take float32/float64' in line
    # The ops agree: with impl='ext' the described fallback is an error...
    q = torch.randn(1, 1, 8, 4, dtype=torch.float16)
    perm = torch.arange(8).view(1, 1, 8)
    with pytest.raises(RuntimeError, match='no CPU kernel for mmboat::clustered_attention'):
        clustered_attention(q, q, q, perm, cluster_size=4, overlap=0, impl='ext')
    # ... and where the line says compiled, impl='ext' runs.
    assert ops_impl_choice('na2d_forward', dtype=torch.float16)[0] == COMPILED_CPU
    x = torch.randn(1, 1, 5, 5, 4, dtype=torch.float16)
    assert na2d(x, x, x, kernel_size=3, impl='ext').shape == x.shape


class _Records(logging.Handler):

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_backbones_log_once_per_distinct_answer(monkeypatch, no_ops_env):
    from mmengine.logging import MMLogger

    from mmboat.models import NAT, BOATSwinTransformer

    monkeypatch.setattr(ext_loader, '_logged_ops_impl', set())
    logger = MMLogger.get_instance('test_ops_impl_report')  # the current instance now
    records = _Records()
    logger.addHandler(records)
    try:
        arch = dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2.)
        for _ in range(2):
            NAT(arch=dict(arch), kernel_size=3)
        ops_lines = [line for line in records.lines if line.startswith('mmboat ops')]
        assert ops_lines == [describe_ops_impl([NA])]
        NAT(arch=dict(arch), kernel_size=3, impl='reference')  # another answer: one more line
        assert records.lines[-1].startswith('mmboat ops') and records.lines[-1].endswith(
            "impl='reference' (model argument): the reference is forced")
        swin = dict(arch=dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
                    window_size=4, img_size=64, fsla_cfg=dict(cluster_size=8, overlap=3))
        count = len(records.lines)
        BOATSwinTransformer(**swin)
        assert records.lines[count:] == [describe_ops_impl([FSLA])]
        BOATSwinTransformer(**swin, fsla_blocks=[[], [], [], []])  # no FSLA: nothing to say
        assert len(records.lines) == count + 1
    finally:
        logger.removeHandler(records)
