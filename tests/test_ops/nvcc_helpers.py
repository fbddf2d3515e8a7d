"""Shared helpers of the GPU-less CUDA kernel tests: find nvcc, compile, build the emulation.

Used by ``test_cuda_kernels_compile.py`` (neighborhood attention) and
``test_fsla_cuda_compile.py`` (FSLA).
"""
import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
DRIVER_DIR = Path(__file__).resolve().parent / 'cuda_driver'
COMMON = ROOT / 'csrc' / 'common'
# What torch.utils.cpp_extension passes to nvcc for a CUDA extension (the kernels must build
# with implicit half/bfloat16 conversions disabled).
TORCH_NVCC_DEFINES = [
    '-D__CUDA_NO_HALF_OPERATORS__', '-D__CUDA_NO_HALF_CONVERSIONS__',
    '-D__CUDA_NO_BFLOAT16_CONVERSIONS__', '-D__CUDA_NO_HALF2_OPERATORS__'
]


def find_nvcc() -> Optional[str]:
    """``nvcc`` on PATH, else under ``$CUDA_HOME``, ``$CUDA_PATH`` or ``/usr/local/cuda``."""
    found = shutil.which('nvcc')
    if found:
        return found
    for home in (os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH'), '/usr/local/cuda'):
        if home and (Path(home) / 'bin' / 'nvcc').is_file():
            return str(Path(home) / 'bin' / 'nvcc')
    return None


def cuda_include(nvcc: str) -> Optional[Path]:
    """The toolkit's include folder (nvcc may be a wrapper script outside the toolkit)."""
    candidates = [Path(nvcc).resolve().parent.parent / 'include']
    for var in ('CUDA_HOME', 'CUDA_PATH'):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / 'include')
    candidates += [Path('/usr/local/cuda/include'), Path('/usr/include')]
    for path in candidates:
        if (path / 'cuda_bf16.h').is_file():
            return path
    return None


def host_compiler() -> Optional[str]:
    return shutil.which('g++') or shutil.which('clang++')


NVCC = find_nvcc()


def run(cmd: List[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def compile_kernels(source: Path,
                    arch: str,
                    out: Path,
                    extra_flags: Sequence[str] = (),
                    cxx17_fallback: bool = False,
                    timeout: int = 900) -> subprocess.CompletedProcess:
    """``nvcc -c source -o out`` for ``sm_{arch}`` in C++20 with torch's half/bf16 defines.

    Args:
        source (Path): The ``.cu`` file instantiating the kernel templates.
        arch (str): The compute capability, e.g. ``'90'``.
        out (Path): The object file.
        extra_flags (Sequence[str]): Flags after ``-O3`` (e.g. ``--use_fast_math``).
        cxx17_fallback (bool): Retry with ``-std=c++17`` when an older toolkit rejects C++20.
        timeout (int): Seconds per nvcc run.
    """
    base = [
        NVCC, '-O3', *extra_flags, '--expt-relaxed-constexpr', *TORCH_NVCC_DEFINES,
        f'-gencode=arch=compute_{arch},code=sm_{arch}', f'-I{COMMON}', '-c',
        str(source), '-o',
        str(out)
    ]
    result = run(base[:1] + ['-std=c++20'] + base[1:], timeout=timeout)
    if cxx17_fallback and result.returncode != 0 and 'c++20' in result.stderr:
        result = run(base[:1] + ['-std=c++17'] + base[1:], timeout=timeout)
    return result


def build_and_run_emulation(
        driver: Path, exe: Path) -> Tuple[subprocess.CompletedProcess,
                                          Optional[subprocess.CompletedProcess], List[str]]:
    """Compile an emulation driver (host C++, AddressSanitizer on) and run it.

    Args:
        driver (Path): The driver ``.cpp`` in ``cuda_driver/``.
        exe (Path): Where to put the executable.

    Returns:
        tuple: The compile result, the run result (None when compiling failed) and the ``FAIL``
        lines of the run's stdout.
    """
    include = cuda_include(NVCC)
    cmd = [
        host_compiler(), '-std=c++20', '-O0', '-fsanitize=address', '-fno-omit-frame-pointer',
        f'-I{include}', f'-I{DRIVER_DIR}', f'-I{COMMON}',
        str(driver), '-o',
        str(exe), '-lpthread'
    ]
    result = run(cmd, timeout=900)
    if result.returncode != 0:
        return result, None, []
    ran = run([str(exe)], timeout=1200)
    failures = [line for line in ran.stdout.splitlines() if line.startswith('FAIL')]
    return result, ran, failures
