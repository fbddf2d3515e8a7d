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


@pytest.mark.slow
def test_non_editable_install_ships_configs_and_model_index(tmp_path):
    """A wheel (``pip install .``) carries configs/, tools/ and model-index.yml as
    ``mmboat/.mim/`` and the installed package finds its model index there."""
    import glob
    import zipfile

    wheels = tmp_path / 'wheels'
    res = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-build-isolation',
                          '--no-deps', '-w', str(wheels), ROOT], capture_output=True, text=True,
                         env={**os.environ, 'MMBOAT_WITH_OPS': '0'}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel, ) = glob.glob(str(wheels / 'mmboat-*.whl'))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ('mmboat/.mim/model-index.yml', 'mmboat/.mim/configs/nat/metafile.yml',
                 'mmboat/.mim/configs/nat/nat-tiny_8xb128_in1k.py',
                 'mmboat/.mim/tools/train.py'):
        assert name in names, name
    site = tmp_path / 'site'
    res = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target',
                          str(site), wheel], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # The installed copy, not this checkout's editable install: `python -S` skips the .pth
    # files (the editable finder, the start-up hook), the environment's packages come after it.
    import site as site_module

    code = (f'import sys; sys.path[:0] = [{str(site)!r}]; '
            f'sys.path += {site_module.getsitepackages()!r}\n'
            'import os.path as osp\n'
            'from modelindex.load_model_index import load\n'
            'from mmboat.utils.model_index import model_index_path\n'
            'path = model_index_path(); index = load(path); index.build_models_with_collections()\n'
            'missing = [m.name for m in index.models '
            'if not osp.isfile(osp.join(osp.dirname(path), m.config))]\n'
            'print("RESULT", path.startswith(' + repr(str(site)) + '), len(index.models), missing)')
    res = subprocess.run([sys.executable, '-S', '-c', code], capture_output=True, text=True,
                         cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'RESULT True' in res.stdout and res.stdout.strip().endswith('[]'), res.stdout
