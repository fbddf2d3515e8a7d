"""The FSLA (BOAT) CUDA kernels, compile-checked without a GPU.

``nvcc`` compiles ``cuda_driver/instantiate_fsla_kernels.cu``, which instantiates every kernel
template of ``csrc/common/cuda/feature_space_attention_kernels.cuh`` (clustering, attention
forward/backward for float32, float16 and bfloat16) with the half/bfloat16 flags torch's CUDA
build adds.
* The kernels are *executed* under the host emulation of CUDA (``cuda_driver/cuda_emulation.h``,
  one thread per CUDA thread, AddressSanitizer on) by ``cuda_driver/fsla_emulation_driver.cpp``
  and compared with naive host implementations of the spec (clustering perms exactly, attention
  forward/backward against double precision). On a GPU, ``test_feature_space_attention_cuda.py``
  checks the real thing.
"""
import pytest
from nvcc_helpers import (DRIVER_DIR, NVCC, build_and_run_emulation, compile_kernels,
                          cuda_include, host_compiler)


@pytest.mark.skipif(NVCC is None, reason='nvcc (CUDA toolkit) not found')
@pytest.mark.parametrize(
    'arch', ['90', pytest.param('80', marks=pytest.mark.slow)], ids=['sm_90', 'sm_80'])
def test_fsla_kernels_compile(arch, tmp_path):
    out = tmp_path / f'fsla_kernels_sm{arch}.o'
    result = compile_kernels(DRIVER_DIR / 'instantiate_fsla_kernels.cu', arch, out, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert out.stat().st_size > 0
    # No kernel may silently spill or use unsupported constructs: nvcc warnings are errors here.
    assert 'warning' not in result.stderr.lower(), result.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason='nvcc (CUDA toolkit) not found')
@pytest.mark.skipif(host_compiler() is None, reason='no host C++ compiler')
def test_fsla_kernels_emulated_match_naive_reference(tmp_path):
    include = cuda_include(NVCC)
    if include is None:
        pytest.skip('CUDA toolkit headers (cuda_bf16.h) not found')
    result, run, failures = build_and_run_emulation(DRIVER_DIR / 'fsla_emulation_driver.cpp',
                                                    tmp_path / 'fsla_emulation_driver')
    assert result.returncode == 0, result.stderr[-6000:]
    assert run.returncode == 0 and not failures, run.stdout[-6000:] + run.stderr[-3000:]
    assert 'ok attention bfloat16' in run.stdout and 'ALL OK' in run.stdout
