"""The neighborhood-attention CUDA kernels, checked without a GPU.

* ``nvcc`` compiles ``cuda_driver/instantiate_kernels.cu``, which instantiates every kernel
  template of ``csrc/common/cuda/neighborhood_attention_kernels.cuh`` for float32, float16 and
  bfloat16 (all head_dim branches), with the half/bfloat16 flags torch's CUDA build adds.
* The kernels are *executed* under a host emulation of CUDA (``cuda_driver/cuda_emulation.h``,
  one thread per CUDA thread, AddressSanitizer on) and compared with a naive double-precision
  implementation of the spec (``cuda_driver/na_emulation_driver.cpp``), including the
  inverse-window rule against the forward rule by brute force.
"""
import pytest
from nvcc_helpers import (DRIVER_DIR, NVCC, build_and_run_emulation, compile_kernels,
                          cuda_include, host_compiler)

needs_nvcc = pytest.mark.skipif(NVCC is None, reason='nvcc (CUDA toolkit) not found')


@needs_nvcc
@pytest.mark.parametrize(
    'arch', ['90', pytest.param('80', marks=pytest.mark.slow)], ids=['sm_90', 'sm_80'])
def test_kernels_compile(arch, tmp_path):
    out = tmp_path / f'na_kernels_sm{arch}.o'
    result = compile_kernels(DRIVER_DIR / 'instantiate_kernels.cu', arch, out,
                             extra_flags=['--use_fast_math'], cxx17_fallback=True)
    assert result.returncode == 0, result.stderr[-6000:]
    assert out.stat().st_size > 0


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(host_compiler() is None, reason='no host C++ compiler')
def test_kernels_emulated_match_naive_reference(tmp_path):
    include = cuda_include(NVCC)
    if include is None:
        pytest.skip('CUDA toolkit headers (cuda_bf16.h) not found')
    result, run, failures = build_and_run_emulation(DRIVER_DIR / 'na_emulation_driver.cpp',
                                                    tmp_path / 'na_emulation_driver')
    assert result.returncode == 0, result.stderr[-6000:]
    assert run.returncode == 0 and not failures, (run.stdout[-6000:] + run.stderr[-3000:])
    assert 'inverse window rule' in run.stdout and 'ALL OK' in run.stdout
