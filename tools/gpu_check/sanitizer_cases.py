"""A few small CUDA calls of every mmboat op, forward and backward, for compute-sanitizer.

Run by tools/gpu_check.sh as ``compute-sanitizer --tool memcheck --error-exitcode 1 python
tools/gpu_check/sanitizer_cases.py``: any out-of-bounds or misaligned access in the kernels
makes the run fail. Small shapes keep it quick under the sanitizer; borders, dilation, causal
windows, odd head dims and unequal clusters are covered.
"""
import torch

from mmboat.ops import (balanced_hierarchical_clustering, clustered_attention, na1d, na2d,
                        na2d_av, na2d_qk, na3d)


def _t(*shape, dtype=torch.float16):
    return torch.randn(*shape, device='cuda', dtype=dtype, requires_grad=True)


def main() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = (_t(2, 2, 9, 7, 24, dtype=dtype) for _ in range(3))
        rpb = _t(2, 5, 5, dtype=dtype)
        na2d(q, k, v, rpb, kernel_size=3, dilation=(3, 2), impl='ext').float().sum().backward()
        na2d(q, k, v, kernel_size=(4, 3), is_causal=(True, False),
             impl='ext').float().sum().backward()
        attn = na2d_qk(q, k, rpb, kernel_size=3, dilation=(3, 2), impl='ext')
        na2d_av(attn.softmax(-1), v, kernel_size=3, dilation=(3, 2),
                impl='ext').float().sum().backward()
        x = _t(1, 3, 24, 40, dtype=dtype)
        na1d(x, x, x, kernel_size=3, dilation=8, impl='ext').float().sum().backward()
        y = _t(1, 1, 6, 6, 9, 72, dtype=dtype)
        na3d(y, y, y, kernel_size=3, dilation=(2, 2, 3), impl='ext').float().sum().backward()
        f = _t(2, 3, 150, 72, dtype=dtype)
        perm, _ = balanced_hierarchical_clustering(f.detach(), cluster_size=16, impl='ext')
        clustered_attention(f, f, f, perm, 16, 10, impl='ext').float().sum().backward()
    torch.cuda.synchronize()
    print('sanitizer cases: ok')


if __name__ == '__main__':
    main()
