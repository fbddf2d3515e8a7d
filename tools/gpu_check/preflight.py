"""Pre-flight of tools/gpu_check.sh: is this a machine it can run on? (No mmboat import.)

Prints one ``KEY=VALUE`` line per fact on stdout (``ARCH`` is the local GPU's compute
capability, for ``TORCH_CUDA_ARCH_LIST``) and, when something is missing, one ``MISSING:`` line
per problem with the fix, then exits 2. Exit 0 means: a CUDA build of torch >= 2.6, a visible
CUDA device and nvcc.
"""
import shutil
import sys
from typing import List, Tuple

MIN_TORCH = (2, 6)


def check() -> Tuple[List[str], List[str]]:
    """Returns ``(facts, missing)``."""
    facts, missing = [f'PYTHON={sys.version.split()[0]}'], []
    try:
        import torch
    except ImportError as exc:
        return facts, [f'torch is not importable ({exc}): install a CUDA build of torch >= 2.6']
    facts.append(f'TORCH={torch.__version__}')
    version = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2])
    if version < MIN_TORCH:
        missing.append(f'torch {torch.__version__} is older than 2.6: install torch >= 2.6')
    if torch.version.cuda is None:
        missing.append(f'torch {torch.__version__} is a CPU build: install a CUDA build of torch')
    elif not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        missing.append('no CUDA device is visible (torch.cuda.is_available() is False): run '
                       'this on a machine with an NVIDIA GPU and its driver')
    else:
        major, minor = torch.cuda.get_device_capability(0)
        facts += [f'CUDA={torch.version.cuda}', f'DEVICE={torch.cuda.get_device_name(0)}',
                  f'ARCH={major}.{minor}']
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        from os import environ, path
        home = environ.get('CUDA_HOME') or environ.get('CUDA_PATH') or '/usr/local/cuda'
        nvcc = path.join(home, 'bin', 'nvcc') if path.isfile(path.join(home, 'bin',
                                                                        'nvcc')) else None
    if nvcc is None:
        missing.append('nvcc (the CUDA compiler) is not on PATH nor under CUDA_HOME: install the '
                       'CUDA toolkit or set CUDA_HOME')
    else:
        facts.append(f'NVCC={nvcc}')
    sanitizer = shutil.which('compute-sanitizer')
    facts.append(f'SANITIZER={sanitizer or ""}')
    return facts, missing


def main() -> int:
    facts, missing = check()
    for fact in facts:
        print(fact)
    for problem in missing:
        print(f'MISSING: {problem}')
    return 2 if missing else 0


if __name__ == '__main__':
    sys.exit(main())
