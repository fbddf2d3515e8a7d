"""Packaging rules: the build fails loudly, mmboat stays light, no pkg_resources."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_py(*args, **env):
    return subprocess.run([sys.executable, 'setup.py', *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_pure_python_install_needs_no_compiler():
    res = _setup_py('--version', MMBOAT_WITH_OPS='0', CC='/nonexistent', CXX='/nonexistent')
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == '0.1.0'


@pytest.mark.skipif(torch.version.cuda is not None, reason='CUDA build of torch present')
def test_force_cuda_without_cuda_torch_fails_with_reason():
    res = _setup_py('--version', FORCE_CUDA='1', MMBOAT_WITH_OPS='1')
    assert res.returncode != 0
    assert 'FORCE_CUDA=1 but' in res.stderr


def test_no_pkg_resources_anywhere():
    offenders = []
    for base in ('mmboat', 'tools', 'tests', 'configs'):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for name in files:
                if name.endswith('.py') and name != os.path.basename(__file__):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding='utf-8') as f:
                        if 'pkg_resources' in f.read():
                            offenders.append(os.path.relpath(path, ROOT))
    with open(os.path.join(ROOT, 'setup.py'), encoding='utf-8') as f:
        assert 'import pkg_resources' not in f.read()
    assert offenders == []


def test_import_mmboat_is_light():
    code = ('import sys, mmboat, mmboat.ops, mmboat.registry; '
            "heavy = [m for m in ('mmdet', 'mmseg', 'mmpretrain') if m in sys.modules]; "
            'print(heavy)')
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout
    assert out.strip() == '[]'
