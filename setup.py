"""Build of the ``mmboat._ext`` extension (metadata lives in pyproject.toml).

* C++ sources (``csrc/pytorch/*.cpp``, ``csrc/pytorch/cpu/*.cpp``) are always compiled; the
  torch-free kernels under ``csrc/common/`` are headers those launchers instantiate.
* CUDA sources (``csrc/pytorch/cuda/*.cu``) are added when ``torch.cuda.is_available()`` or
  ``FORCE_CUDA=1``, and a CUDA toolkit is found.
* ``MMBOAT_WITH_OPS=0`` installs the pure-Python package (ops fall back to the PyTorch
  reference implementations with one warning).
* ``configs/``, ``tools/`` and ``model-index.yml`` are copied into the package as ``mmboat/.mim/``.

When ops are wanted, failure is loud: a missing torch, a missing toolkit under FORCE_CUDA=1 or a
compile error stops the install with the reason.
"""
import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ('0', 'false', 'no', 'off', '')


def _fail(msg: str) -> None:
    sys.stderr.write(f'\nmmboat setup.py: {msg}\n\n')
    raise SystemExit(1)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


# Shipped inside the package as mmboat/.mim/ (OpenMMLab's convention, read by mim and by
# mmboat.utils.model_index), so that a non-editable install has its configs and model index.
MIM_FILES = ('configs', 'tools', 'model-index.yml')


class BuildPyWithMim(build_py):
    """build_py that also copies :data:`MIM_FILES` to ``mmboat/.mim/`` in the build."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, 'mmboat', '.mim')
        for name in MIM_FILES:
            src, dst = os.path.join(ROOT, name), os.path.join(target, name)
            if os.path.isdir(src):
                shutil.copytree(src, dst, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
            elif os.path.isfile(src):
                os.makedirs(target, exist_ok=True)
                shutil.copy2(src, dst)


def build_ext_modules():
    """Return (ext_modules, cmdclass)."""
    if not _env_flag('MMBOAT_WITH_OPS', '1'):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                               CUDAExtension)
    except ImportError as exc:  # pragma: no cover - exercised by hand
        _fail(f'building the mmboat ops needs torch importable at build time ({exc}). '
              'Install torch first and build without isolation: '
              "`pip install --no-build-isolation -e .` (or MMBOAT_WITH_OPS=0 for a pure-Python "
              'install).')

    csrc = os.path.join(ROOT, 'csrc')
    sources = _rel(glob.glob(os.path.join(csrc, 'pytorch', '*.cpp')) +
                   glob.glob(os.path.join(csrc, 'pytorch', 'cpu', '*.cpp')))
    cuda_sources = _rel(glob.glob(os.path.join(csrc, 'pytorch', 'cuda', '*.cu')))
    include_dirs = [os.path.join(csrc, 'common'), os.path.join(csrc, 'pytorch')]

    force_cuda = _env_flag('FORCE_CUDA', '0')
    with_cuda = force_cuda or torch.cuda.is_available()
    if with_cuda and CUDA_HOME is None:
        if force_cuda:
            _fail('FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME).')
        with_cuda = False
    if with_cuda and not os.path.isfile(os.path.join(CUDA_HOME, 'include', 'cuda_runtime.h')):
        # torch takes CUDA_HOME from `which nvcc`; a wrapper script (e.g. /usr/local/bin/nvcc
        # exec-ing the real one) points it at a folder without the runtime, and the link then
        # fails with "cannot find -lcudart".
        hint = next((d for d in ('/usr/local/cuda', '/opt/cuda')
                     if os.path.isfile(os.path.join(d, 'include', 'cuda_runtime.h'))), None)
        msg = (f'CUDA_HOME={CUDA_HOME} (found from nvcc) holds no CUDA runtime '
               '(include/cuda_runtime.h); set CUDA_HOME to the toolkit folder'
               + (f', e.g. CUDA_HOME={hint}' if hint else ''))
        if force_cuda:
            _fail('FORCE_CUDA=1 but ' + msg + '.')
        with_cuda = False
    if with_cuda and torch.version.cuda is None:
        msg = ('this torch is a CPU build: its wheel lacks the CUDA headers and libraries the '
               'CUDA ops link against; install a CUDA build of torch to build them')
        if force_cuda:
            _fail('FORCE_CUDA=1 but ' + msg + '.')
        with_cuda = False

    openmp = ['-fopenmp'] if sys.platform.startswith('linux') else []
    cxx_flags = ['-O3', '-std=c++20', '-DNDEBUG', '-fvisibility=hidden'] + openmp
    define_macros = [('TORCH_EXTENSION_NAME', '_ext')]
    if with_cuda:
        archs = os.environ.get('TORCH_CUDA_ARCH_LIST', 'native').replace(';', ' ')
        define_macros += [('MMBOAT_WITH_CUDA', None), ('MMBOAT_CUDA_ARCHS', f'"{archs}"')]
        nvcc_flags = ['-O3', '-std=c++20', '--use_fast_math', '--expt-relaxed-constexpr',
                      '-DNDEBUG']
        ext = CUDAExtension(
            'mmboat._ext', sources + cuda_sources, include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={'cxx': cxx_flags, 'nvcc': nvcc_flags},
            extra_link_args=openmp)
    else:
        ext = CppExtension(
            'mmboat._ext', sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={'cxx': cxx_flags}, extra_link_args=openmp)
    build_ext = BuildExtension.with_options(use_ninja=_env_flag('MMBOAT_USE_NINJA', '1'))
    return [ext], {'build_ext': build_ext}


ext_modules, cmdclass = build_ext_modules()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, 'build_py': BuildPyWithMim})
