"""Print the environment mmboat runs in: ``python -m mmboat.utils.collect_env [--short]``."""
import argparse
import importlib
import platform
import sys
from collections import OrderedDict
from typing import Dict

import torch

_LIBRARIES = ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'torchvision', 'numpy')


def _version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version({'mmseg': 'mmsegmentation'}.get(name, name))
    except Exception:
        return 'not installed'


def collect_env() -> Dict[str, object]:
    """Versions of the stack and how ``mmboat._ext`` was built."""
    from mmboat import __version__
    from mmboat.ops import ext_info

    env: Dict[str, object] = OrderedDict()
    env['sys.platform'] = sys.platform
    env['Python'] = sys.version.replace('\n', '')
    env['machine'] = platform.machine()
    env['PyTorch'] = torch.__version__
    env['PyTorch CUDA'] = torch.version.cuda or 'none (CPU build)'
    env['CUDA available'] = torch.cuda.is_available()
    if torch.cuda.is_available():
        env['GPU'] = torch.cuda.get_device_name(0)
    env['torch threads'] = torch.get_num_threads()
    for name in _LIBRARIES:
        env[name] = _version(name)
    try:
        mmcv_ext = importlib.import_module('mmcv._ext')
        env['mmcv ops'] = 'compiled' if mmcv_ext is not None else 'missing'
    except Exception as exc:
        env['mmcv ops'] = f'missing ({type(exc).__name__})'
    env['mmboat'] = __version__
    info = ext_info()
    env['mmboat._ext loaded'] = info['loaded']
    if not info['loaded']:
        env['mmboat._ext error'] = info['error']
    else:
        env['mmboat._ext path'] = info['path']
        env['mmboat._ext compiled with CUDA'] = info['with_cuda']
        env['mmboat._ext CUDA arch list'] = info['cuda_arch_list'] or 'n/a'
        env['mmboat._ext OpenMP'] = info['openmp']
        env['mmboat._ext built for torch'] = info['torch_compiled']
    return env


def collect_runtime_env(env_cfg: dict, launcher: str, world_size: int) -> Dict[str, object]:
    """How this process runs: the runner's ``env_cfg`` with the backend actually in use, the
    launcher, the world size and the device (mmboat's runners log it at start-up).

    mmengine's own print-out repeats the config's ``dist_cfg`` (``nccl`` even where a CPU run
    initialised ``gloo``) and calls the world size ``GPU number`` on CPU runs too.

    Args:
        env_cfg (dict): The runner's ``env_cfg``.
        launcher (str): The ``--launcher`` value.
        world_size (int): Processes in the run.

    Returns:
        dict: Ordered ``name: value`` pairs.
    """
    import copy

    import torch.distributed as dist
    from mmengine.device import get_device

    env: Dict[str, object] = OrderedDict(copy.deepcopy(dict(env_cfg)))
    distributed = dist.is_available() and dist.is_initialized()
    backend = dist.get_backend() if distributed else None
    if backend is not None and isinstance(env.get('dist_cfg'), dict):
        env['dist_cfg'] = dict(env['dist_cfg'], backend=backend)
    env['Distributed launcher'] = launcher
    env['Distributed training'] = distributed
    env['Distributed backend'] = backend or 'none (one process)'
    env['World size'] = world_size
    device = get_device()  # where mmengine's runner puts the model
    if device == 'cpu':
        threads = torch.get_num_threads()
        env['Device'] = f'cpu ({threads} torch thread{"s" if threads > 1 else ""} per process)'
        env['GPU number'] = 0
    else:
        name = torch.cuda.get_device_name() if device == 'cuda' else device
        env['Device'] = f'{device} ({name}; one per process)'
        env['GPU number'] = world_size
    return env


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--short', action='store_true', help='only mmboat and the stack versions')
    args = parser.parse_args(argv)
    env = collect_env()
    if args.short:
        keys = ['PyTorch'] + list(_LIBRARIES[:5]) + ['mmboat', 'mmboat._ext loaded',
                                                      'mmboat._ext compiled with CUDA']
        env = OrderedDict((k, env[k]) for k in keys if k in env)
    for key, value in env.items():
        print(f'{key}: {value}')


if __name__ == '__main__':
    main()
