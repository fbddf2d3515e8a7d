"""After the build (tools/gpu_check.sh): does the in-place ``mmboat._ext`` have CUDA kernels?

Loads the extension built in the repository (which must be on ``sys.path``) and checks that it
was compiled with CUDA, for the local device's architecture, and that every mmboat op has a
CUDA kernel. Prints one line (the build info) and exits 0, or names what is wrong and exits 1.

    python tools/gpu_check/ext_check.py [--arch 9.0]
"""
import argparse
import sys
from typing import Dict, List, Tuple

# Every op mmboat registers (csrc/pytorch/*.cpp): each needs a CUDA kernel.
OPS = [
    'na1d_forward', 'na1d_backward', 'na2d_forward', 'na2d_backward', 'na3d_forward',
    'na3d_backward', 'na2d_qk', 'na2d_qk_backward', 'na2d_av', 'na2d_av_backward',
    'bhc_cluster', 'clustered_attention_forward', 'clustered_attention_backward'
]


def parse_info(info: str) -> Dict[str, str]:
    """``'torch=2.11.0;cuda=1;archs=9.0'`` -> ``{'torch': '2.11.0', 'cuda': '1', ...}``."""
    return dict(item.split('=', 1) for item in info.split(';') if '=' in item)


def _arch(text: str) -> Tuple[int, int]:
    """``'9.0'``, ``'90'``, ``'9.0a'`` or ``'8.6+PTX'`` -> ``(major, minor)``."""
    digits = ''.join(c for c in text.split('+')[0] if c.isdigit())
    return (int(digits[:-1] or 0), int(digits[-1])) if digits else (0, 0)


def arch_runs_on(built: List[str], device: str) -> bool:
    """Whether code built for ``built`` runs on a ``device`` of that compute capability: the same
    major version and a minor version not above the device's (CUDA binary compatibility)."""
    major, minor = _arch(device)
    return any(_arch(a)[0] == major and _arch(a)[1] <= minor for a in built)


def problems(info: Dict[str, str], missing_ops: List[str], arch: str = '') -> List[str]:
    found = []
    if info.get('cuda') != '1':
        found.append('mmboat._ext was built without CUDA (ext_info cuda=' +
                     info.get('cuda', '?') + ')')
    archs = info.get('archs', '').replace(';', ' ').split()
    if arch and info.get('cuda') == '1' and archs and not arch_runs_on(archs, arch):
        found.append(f'mmboat._ext was built for {" ".join(archs)}, which does not run on this '
                     f'device ({arch})')
    if missing_ops:
        found.append('no CUDA kernel for ' + ', '.join(f'mmboat::{op}' for op in missing_ops))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='', help='the device compute capability, e.g. 9.0')
    args = parser.parse_args(argv)
    import torch
    try:
        import mmboat._ext  # noqa: F401
    except ImportError as exc:
        print(f'mmboat._ext does not load: {exc}')
        return 1
    info = torch.ops.mmboat.ext_info()
    missing = [op for op in OPS if not hasattr(torch.ops.mmboat, op)
               or not torch._C._dispatch_has_kernel_for_dispatch_key(f'mmboat::{op}', 'CUDA')]
    found = problems(parse_info(info), missing, args.arch)
    print(info if not found else '; '.join(found) + f' [{info}]')
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
