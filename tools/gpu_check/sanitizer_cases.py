"""A few small calls of every mmboat op, forward and backward, for compute-sanitizer.

tools/gpu_check.sh runs ``compute-sanitizer --tool memcheck --error-exitcode 1 python
tools/gpu_check/sanitizer_cases.py`` with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (so an access past
a tensor is not hidden inside a cached block): any out-of-bounds or misaligned access in the
kernels fails the run. The shapes are small (the sanitizer slows kernels down a lot) but cover
borders with ``k * d == L``, dilation, causal windows, even kernels, odd head dims, 1-D/2-D/3-D,
the unfused pair, and clusterings with unequal leaves and a single leaf; float32, float16,
bfloat16, and float64 where the CUDA kernels take it.

    python tools/gpu_check/sanitizer_cases.py [--device cpu]   # cpu: a quick self-test
"""
import argparse
import sys

import torch


def _t(*shape, dtype, device):
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)


def _accepts(family: str, dtype: torch.dtype, device: str) -> bool:
    """Whether the compiled ``family`` ('na' or 'fsla') kernels take ``dtype`` on ``device``."""
    x = torch.zeros(1, 1, 3, 4, device=device, dtype=dtype)
    try:
        if family == 'na':
            torch.ops.mmboat.na1d_forward(x, x, x, None, [3], [1], [False], 0.5)
        else:
            perm = torch.arange(3, device=device).view(1, 1, 3)
            torch.ops.mmboat.clustered_attention_forward(x, x, x, perm, 2, 1, 0.5)
    except RuntimeError:
        return False
    return True


def run(device: str = 'cuda') -> int:
    """Runs the cases; returns how many (op family, dtype) groups ran."""
    from mmboat.ops import (balanced_hierarchical_clustering, clustered_attention, na1d, na2d,
                            na2d_av, na2d_qk, na3d)

    torch.manual_seed(0)
    groups = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        kw = dict(dtype=dtype, device=device)
        if _accepts('na', dtype, device):
            # 2-D: 9x7 map, k 3, d (3, 2) (k * d == 9 on the first axis), D 24, with rpb.
            q, k, v = (_t(2, 2, 9, 7, 24, **kw) for _ in range(3))
            rpb = _t(2, 5, 5, **kw)
            na2d(q, k, v, rpb, kernel_size=3, dilation=(3, 2),
                 impl='ext').float().sum().backward()
            na2d(q, k, v, kernel_size=(4, 3), is_causal=(True, False),
                 impl='ext').float().sum().backward()
            attn = na2d_qk(q, k, rpb, kernel_size=3, dilation=(3, 2), impl='ext')
            na2d_av(attn.softmax(-1), v, kernel_size=3, dilation=(3, 2),
                    impl='ext').float().sum().backward()
            # 1-D: k * d == L, D 40; 3-D: k * d == L on two axes, D 72 (> 64).
            x = _t(1, 3, 24, 40, **kw)
            na1d(x, x, x, kernel_size=3, dilation=8, impl='ext').float().sum().backward()
            y = _t(1, 1, 6, 6, 9, 72, **kw)
            na3d(y, y, y, kernel_size=3, dilation=(2, 1, 3),
                 impl='ext').float().sum().backward()
            groups += 1
            print(f'neighborhood attention, {dtype}: ok')
        else:
            print(f'neighborhood attention, {dtype}: not taken by the {device} kernels, skipped')
        if _accepts('fsla', dtype, device):
            # 150 tokens in leaves of <= 16 (unequal), and 12 tokens (a single leaf).
            for tokens, dim in ((150, 72), (12, 8)):
                f = _t(2, 3, tokens, dim, **kw)
                perm, _ = balanced_hierarchical_clustering(f.detach(), cluster_size=16,
                                                           impl='ext')
                clustered_attention(f, f, f, perm, 16, 10, impl='ext').float().sum().backward()
            groups += 1
            print(f'clustering + clustered attention, {dtype}: ok')
        else:
            print(f'clustered attention, {dtype}: not taken by the {device} kernels, skipped')
    if device == 'cuda':
        torch.cuda.synchronize()
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    args = parser.parse_args(argv)
    groups = run(args.device)
    print(f'sanitizer cases: {groups} (op family, dtype) groups ran on {args.device}')
    return 0 if groups else 1


if __name__ == '__main__':
    sys.exit(main())
