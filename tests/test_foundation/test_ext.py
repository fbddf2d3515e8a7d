"""The compiled extension loads, reports itself, and its absence is handled cleanly."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from mmboat.ops import ext_loader
from mmboat.utils import collect_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WITH_OPS = os.environ.get('MMBOAT_WITH_OPS', '1') != '0'


@pytest.mark.skipif(not WITH_OPS, reason='pure-Python install (MMBOAT_WITH_OPS=0)')
def test_extension_loads_and_reports_itself():
    info = ext_loader.ext_info()
    assert info['loaded'], info['error']
    assert info['error'] is None
    assert os.path.basename(info['path']).startswith('_ext')
    # built for the torch it runs with (an ABI mismatch would not have loaded at all)
    assert torch.__version__.startswith(info['torch_compiled'])
    assert info['with_cuda'] == ('cuda=1' in torch.ops.mmboat.ext_info())
    if not info['with_cuda']:
        assert info['cuda_arch_list'] is None


def test_collect_env_prints_stack(capsys):
    collect_env.main([])
    out = capsys.readouterr().out
    for key in ('PyTorch', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'mmboat._ext loaded',
                'mmcv ops'):
        assert f'\n{key}: ' in '\n' + out, key
    assert 'mmcv ops: compiled' in out


def test_collect_env_runs_as_module():
    out = subprocess.run([sys.executable, '-m', 'mmboat.utils.collect_env', '--short'],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    assert out.startswith('PyTorch: ')
    assert 'mmboat._ext loaded: ' in out


def test_impl_choice_is_validated(monkeypatch):
    assert ext_loader.use_ext('reference', 'op') is False
    with pytest.raises(ValueError, match='impl must be one of'):
        ext_loader.use_ext('fast', 'op')
    monkeypatch.setenv('MMBOAT_OPS_IMPL', 'nonsense')
    with pytest.raises(ValueError, match='MMBOAT_OPS_IMPL'):
        ext_loader.use_ext(None, 'op')


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(ext_loader._state, 'loaded', False)
    monkeypatch.setitem(ext_loader._state, 'error', 'ImportError: simulated')
    monkeypatch.setitem(ext_loader._state, 'warned', False)
    with pytest.warns(RuntimeWarning, match='simulated'):
        assert ext_loader.use_ext('auto', 'na2d') is False
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert ext_loader.use_ext(None, 'na2d') is False  # warned once only
    with pytest.raises(RuntimeError, match='impl="ext" was requested'):
        ext_loader.use_ext('ext', 'na2d')
    assert ext_loader.ext_info()['loaded'] is False
