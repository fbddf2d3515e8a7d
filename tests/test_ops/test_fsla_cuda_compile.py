"""The FSLA (BOAT) CUDA kernels, compile-checked without a GPU.

``nvcc`` compiles ``cuda_driver/instantiate_fsla_kernels.cu``, which instantiates every kernel
template of ``csrc/common/cuda/feature_space_attention_kernels.cuh`` (clustering, attention
forward/backward for float32, float16 and bfloat16) with the half/bfloat16 flags torch's CUDA
build adds. The kernels are only compiled here; their numerics are checked on a GPU by
``test_feature_space_attention_cuda.py``.
"""
import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / 'cuda_driver' / 'instantiate_fsla_kernels.cu'
COMMON = ROOT / 'csrc' / 'common'
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


NVCC = _find_nvcc()


def _compile(arch: str, out: Path) -> subprocess.CompletedProcess:
    cmd: List[str] = [
        NVCC, '-std=c++20', '-O3', '--expt-relaxed-constexpr', *TORCH_NVCC_DEFINES,
        f'-gencode=arch=compute_{arch},code=sm_{arch}', f'-I{COMMON}', '-c',
        str(DRIVER), '-o',
        str(out)
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(NVCC is None, reason='nvcc (CUDA toolkit) not found')
@pytest.mark.parametrize(
    'arch', ['90', pytest.param('80', marks=pytest.mark.slow)], ids=['sm_90', 'sm_80'])
def test_fsla_kernels_compile(arch, tmp_path):
    out = tmp_path / f'fsla_kernels_sm{arch}.o'
    result = _compile(arch, out)
    assert result.returncode == 0, result.stderr[-6000:]
    assert out.stat().st_size > 0
    # No kernel may silently spill or use unsupported constructs: nvcc warnings are errors here.
    assert 'warning' not in result.stderr.lower(), result.stderr[-6000:]
