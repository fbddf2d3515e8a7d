"""Pre-flight of tools/gpu_check.sh: can this machine run the GPU check? (No mmboat import.)

Prints one ``KEY=VALUE`` line per fact on stdout and, when something is missing, one
``MISSING: ...`` line per problem with its fix, then exits 2. Exit 0 means: Python >= 3.9, a
CUDA build of torch >= 2.6 that sees a CUDA device, nvcc of the same CUDA major version as torch,
setuptools (to build the extension) and pytest. Facts the shell script reads: ``ARCH`` (the
device's compute capability, for ``TORCH_CUDA_ARCH_LIST``), ``CUDA_HOME`` (the toolkit folder
holding ``include/cuda_runtime.h``), ``SANITIZER`` (compute-sanitizer, empty when absent) and
``PYTEST_TIMEOUT`` (1 when the pytest-timeout plugin is importable).
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

MIN_TORCH = (2, 6)
MIN_PYTHON = (3, 9)


def parse_version(text: str) -> Tuple[int, ...]:
    """Leading numeric components of a version string: ``'2.11.0+cu130'`` -> ``(2, 11, 0)``."""
    parts = []
    for piece in re.split(r'[.+]', text):
        match = re.match(r'\d+', piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


def nvcc_release(nvcc: str) -> Optional[str]:
    """``'13.0'`` from ``nvcc --version`` (None when it cannot be run or parsed)."""
    try:
        text = subprocess.run([nvcc, '--version'], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'release (\d+\.\d+)', text)
    return match.group(1) if match else None


def find_nvcc() -> Optional[str]:
    nvcc = shutil.which('nvcc')
    if nvcc:
        return nvcc
    for home in (os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH'), '/usr/local/cuda'):
        if home and os.path.isfile(os.path.join(home, 'bin', 'nvcc')):
            return os.path.join(home, 'bin', 'nvcc')
    return None


def find_cuda_home(nvcc: Optional[str]) -> Optional[str]:
    """The toolkit folder with ``include/cuda_runtime.h``: $CUDA_HOME, the folder above nvcc
    (through symlinks; a wrapper script elsewhere is skipped), then /usr/local/cuda."""
    candidates = [os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH')]
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(p))
                       for p in (nvcc, os.path.realpath(nvcc))]
    candidates.append('/usr/local/cuda')
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, 'include', 'cuda_runtime.h')):
            return home
    return None


def find_sanitizer(cuda_home: Optional[str]) -> Optional[str]:
    tool = shutil.which('compute-sanitizer')
    if tool:
        return tool
    if cuda_home:
        for rel in ('bin/compute-sanitizer', 'compute-sanitizer/compute-sanitizer'):
            path = os.path.join(cuda_home, rel)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


def check() -> Tuple[List[str], List[str]]:
    """Returns ``(facts, missing)``."""
    facts = [f'PYTHON={sys.version.split()[0]}']
    missing = []
    if sys.version_info[:2] < MIN_PYTHON:
        missing.append(f'Python {sys.version.split()[0]} is older than 3.9: use Python >= 3.9')
    torch = None
    try:
        import torch
    except ImportError as exc:
        missing.append(f'torch is not importable ({exc}): install a CUDA build of torch >= 2.6')
    if torch is not None:
        facts.append(f'TORCH={torch.__version__}')
        if parse_version(torch.__version__)[:2] < MIN_TORCH:
            missing.append(f'torch {torch.__version__} is older than 2.6: install torch >= 2.6')
        if torch.version.cuda is None:
            missing.append(f'torch {torch.__version__} is a CPU build (torch.version.cuda is '
                           'None): install a CUDA build of torch')
        elif not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            missing.append('no CUDA device is visible (torch.cuda.is_available() is False): '
                           'run this on a machine with an NVIDIA GPU and its driver')
        else:
            major, minor = torch.cuda.get_device_capability(0)
            facts += [f'TORCH_CUDA={torch.version.cuda}',
                      f'DEVICE={torch.cuda.get_device_name(0)}', f'ARCH={major}.{minor}']
    nvcc = find_nvcc()
    if nvcc is None:
        missing.append('nvcc (the CUDA compiler) is not on PATH nor under CUDA_HOME or '
                       '/usr/local/cuda: install the CUDA toolkit or set CUDA_HOME')
    else:
        release = nvcc_release(nvcc)
        facts += [f'NVCC={nvcc}', f'NVCC_RELEASE={release or "unknown"}']
        torch_cuda = getattr(getattr(torch, 'version', None), 'cuda', None)
        if release and torch_cuda and release.split('.')[0] != torch_cuda.split('.')[0]:
            missing.append(f'nvcc {release} and torch\'s CUDA {torch_cuda} differ in the major '
                           'version, which torch refuses to build with: use a matching CUDA '
                           'toolkit (put its nvcc first on PATH or set CUDA_HOME)')
    cuda_home = find_cuda_home(nvcc)
    if nvcc is not None and cuda_home is None:
        missing.append(f'no CUDA toolkit folder with include/cuda_runtime.h next to {nvcc} or '
                       'under /usr/local/cuda: set CUDA_HOME to the toolkit folder')
    facts.append(f'CUDA_HOME={cuda_home or ""}')
    for module, why in (('setuptools', 'to build the extension (setup.py build_ext)'),
                        ('pytest', 'to run the CUDA op tests')):
        if importlib.util.find_spec(module) is None:
            missing.append(f'{module} is not importable: install it ({why})')
    facts.append('PYTEST_TIMEOUT=' + ('1' if importlib.util.find_spec('pytest_timeout') else '0'))
    # Without ninja, torch's BuildExtension compiles the sources one after the other.
    facts.append('NINJA=' + ('1' if shutil.which('ninja') else '0'))
    facts.append(f'SANITIZER={find_sanitizer(cuda_home) or ""}')
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
