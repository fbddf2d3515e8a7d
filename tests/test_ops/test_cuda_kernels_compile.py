"""The neighborhood-attention CUDA kernels, checked without a GPU.

* ``nvcc`` compiles ``cuda_driver/instantiate_kernels.cu``, which instantiates every kernel
  template of ``csrc/common/cuda/neighborhood_attention_kernels.cuh`` for float32, float16 and
  bfloat16 (all head_dim branches), with the half/bfloat16 flags torch's CUDA build adds.
* The kernels are *executed* under a host emulation of CUDA (``cuda_driver/cuda_emulation.h``,
  one thread per CUDA thread, AddressSanitizer on) and compared with a naive double-precision
  implementation of the spec (``cuda_driver/na_emulation_driver.cpp``), including the
  inverse-window rule against the forward rule by brute force.
"""
import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / 'cuda_driver'
COMMON = ROOT / 'csrc' / 'common'
# What torch.utils.cpp_extension passes to nvcc for a CUDA extension (the kernels must build
# with implicit half/bfloat16 conversions disabled).
TORCH_NVCC_DEFINES = [
    '-D__CUDA_NO_HALF_OPERATORS__', '-D__CUDA_NO_HALF_CONVERSIONS__',
    '-D__CUDA_NO_BFLOAT16_CONVERSIONS__', '-D__CUDA_NO_HALF2_OPERATORS__'
]


def _find_nvcc() -> Optional[str]:
    found = shutil.which('nvcc')
    if found:
        return found
    for home in (os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH'), '/usr/local/cuda'):
        if home and (Path(home) / 'bin' / 'nvcc').is_file():
            return str(Path(home) / 'bin' / 'nvcc')
    return None


def _cuda_include(nvcc: str) -> Optional[Path]:
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


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason='nvcc (CUDA toolkit) not found')


def _run(cmd: List[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _compile_instantiations(arch: str, out: Path) -> subprocess.CompletedProcess:
    base = [
        NVCC, '-O3', '--use_fast_math', '--expt-relaxed-constexpr', *TORCH_NVCC_DEFINES,
        f'-gencode=arch=compute_{arch},code=sm_{arch}', f'-I{COMMON}', '-c',
        str(DRIVER / 'instantiate_kernels.cu'), '-o',
        str(out)
    ]
    result = _run(base[:1] + ['-std=c++20'] + base[1:], timeout=900)
    if result.returncode != 0 and 'c++20' in result.stderr:  # older toolkit: try C++17
        result = _run(base[:1] + ['-std=c++17'] + base[1:], timeout=900)
    return result


@needs_nvcc
@pytest.mark.parametrize(
    'arch', ['90', pytest.param('80', marks=pytest.mark.slow)], ids=['sm_90', 'sm_80'])
def test_kernels_compile(arch, tmp_path):
    out = tmp_path / f'na_kernels_sm{arch}.o'
    result = _compile_instantiations(arch, out)
    assert result.returncode == 0, result.stderr[-6000:]
    assert out.stat().st_size > 0


def _host_compiler() -> Optional[str]:
    return shutil.which('g++') or shutil.which('clang++')


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(_host_compiler() is None, reason='no host C++ compiler')
def test_kernels_emulated_match_naive_reference(tmp_path):
    include = _cuda_include(NVCC)
    if include is None:
        pytest.skip('CUDA toolkit headers (cuda_bf16.h) not found')
    exe = tmp_path / 'na_emulation_driver'
    cmd = [
        _host_compiler(), '-std=c++20', '-O0', '-fsanitize=address', '-fno-omit-frame-pointer',
        f'-I{include}', f'-I{DRIVER}', f'-I{COMMON}',
        str(DRIVER / 'na_emulation_driver.cpp'), '-o',
        str(exe), '-lpthread'
    ]
    result = _run(cmd, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    run = _run([str(exe)], timeout=1200)
    failures = [line for line in run.stdout.splitlines() if line.startswith('FAIL')]
    assert run.returncode == 0 and not failures, (run.stdout[-6000:] + run.stderr[-3000:])
    assert 'inverse window rule' in run.stdout and 'ALL OK' in run.stdout
