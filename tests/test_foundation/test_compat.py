"""The stack fixes of mmboat/utils/compat.py do what they say, in fresh interpreters."""
import os
import subprocess
import sys

import pytest
import torch

from mmboat.utils import compat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code, **env):
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, **env})


def _torchvision_ops_load():
    res = _python('import torch, torchvision.extension as e; print(e._has_ops())')
    return res.returncode == 0 and res.stdout.strip() == 'True'


def test_torchvision_and_downstream_models_import_after_fix():
    res = _python('from mmboat.utils import apply_stack_fixes; apply_stack_fixes(); '
                  'import torchvision, mmpretrain.models, mmdet.models, mmseg.models; '
                  'print("ok")')
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith('ok')


@pytest.mark.skipif(torch.version.cuda is not None, reason='a CUDA torch loads torchvision ops')
def test_the_breakage_is_real_without_the_fix():
    # Documents why fix 1 exists: with a CUDA torchvision wheel on a CPU torch the plain
    # import fails. If a matching torchvision gets installed, the fix is a no-op.
    if _torchvision_ops_load():
        assert compat.fix_torchvision_import() is False
        return
    # Without mmboat's start-up hook (mmboat/_startup.py) the plain import fails...
    res = _python('import torchvision', MMBOAT_STARTUP_HOOK='0')
    assert res.returncode != 0
    assert 'torchvision::nms does not exist' in res.stderr
    # ... with it (installed by tools/setup_env.sh), it works with no extra call.
    res = _python('import torchvision, mmdet.models; print("ok")')
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stderr[-2000:]


def test_fix_is_idempotent():
    compat.apply_stack_fixes()
    compat.apply_stack_fixes()
    assert hasattr(torch.ops.torchvision, 'nms')


def test_limit_cpu_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv('MMBOAT_NUM_THREADS', raising=False)
        cores = len(os.sched_getaffinity(0))
        assert compat.limit_cpu_threads(world_size=cores * 2) == 1
        assert compat.limit_cpu_threads() == cores
        monkeypatch.setenv('MMBOAT_NUM_THREADS', '1')
        assert compat.limit_cpu_threads() == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match='num_threads must be >= 1'):
            compat.limit_cpu_threads(0)
    finally:
        torch.set_num_threads(before)
