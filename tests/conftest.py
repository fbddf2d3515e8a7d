"""Test-session setup: the stack fixes (mmboat/utils/compat.py) and a bounded thread count.

The op tests also run without the OpenMMLab stack (tools/gpu_check.sh on a bare GPU machine):
without mmengine only the thread budget is set.
"""
import pytest
import torch

from mmboat.utils import apply_stack_fixes, limit_cpu_threads

try:
    from mmengine.registry import DefaultScope
except ImportError:  # the ops alone (tools/gpu_check.sh)
    DefaultScope = None
else:
    apply_stack_fixes()
limit_cpu_threads()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _isolate_default_scope():
    """A test that sets mmengine's default scope (init_default_scope('mmseg'), a Runner...)
    must not change how later tests resolve unprefixed type names."""
    if DefaultScope is None:
        yield
        return
    saved = dict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
