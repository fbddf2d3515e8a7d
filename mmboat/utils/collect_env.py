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
