"""CSWin's cross-shaped window attention branch: stripe attention with LePE, for any map size.

CSWin (Dong et al., CVPR 2022, https://arxiv.org/abs/2107.00652) splits the heads of a block in two
halves: one attends inside vertical stripes (full height, ``stripe_width`` columns), the other
inside horizontal stripes (``stripe_width`` rows, full width); the last stage attends over the
whole map. Each branch adds the locally-enhanced positional encoding (LePE): a depthwise 3x3 conv
``get_v`` on the values of each stripe. The parameter name ``get_v`` is CSWin's own.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .window_attention import window_partition, window_reverse

__all__ = ['StripeAttention', 'stripe_partition', 'stripe_reverse']

_DIRECTIONS = ('vertical', 'horizontal', 'full')


def stripe_partition(x: torch.Tensor, stripe_height: int, stripe_width: int) -> torch.Tensor:
    """``[B, H, W, C]`` (H, W multiples of the stripe sides) -> ``[B * nS, sh * sw, C]``: a
    stripe is a ``(sh, sw)`` window."""
    return window_partition(x, (stripe_height, stripe_width))


def stripe_reverse(stripes: torch.Tensor, stripe_height: int, stripe_width: int, height: int,
                   width: int) -> torch.Tensor:
    """Inverse of :func:`stripe_partition`: ``[B * nS, sh * sw, C]`` -> ``[B, H, W, C]``."""
    return window_reverse(stripes, (stripe_height, stripe_width), height, width)


class StripeAttention(nn.Module):
    """Multi-head attention inside stripes (or the whole map), plus LePE.

    Equivalent to one ``LePEAttention`` branch of CSWin: for ``direction='vertical'`` (CSWin's
    ``idx=0``) stripes are ``H x stripe_width``, for ``'horizontal'`` (``idx=1``)
    ``stripe_width x W``, for ``'full'`` (``idx=-1``, the last stage) the whole map. Maps that are
    not a multiple of the stripe width are zero-padded on the bottom/right; padded keys are masked
    and padded values are zeros, which is exactly the conv's own zero padding for LePE. A stripe
    wider than the map is narrowed to the map.

    Args:
        embed_dims (int): channels of this branch.
        num_heads (int): heads of this branch.
        stripe_width (int): stripe width sw (ignored for ``'full'``).
        direction (str): ``'vertical'``, ``'horizontal'`` or ``'full'``.
        qk_scale (float, optional): logit scale; None means ``head_dim ** -0.5``. Defaults to None.
        attn_drop (float): dropout on attention weights. Defaults to 0.

    Examples:
        >>> attn = StripeAttention(32, 2, stripe_width=2, direction='vertical')
        >>> q = k = v = torch.rand(2, 5 * 7, 32)
        >>> attn(q, k, v, (5, 7)).shape
        torch.Size([2, 35, 32])
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 stripe_width: int,
                 direction: str,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.) -> None:
        super().__init__()
        if direction not in _DIRECTIONS:
            raise ValueError(f'direction must be one of {_DIRECTIONS}, got {direction!r}')
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads '
                             f'({num_heads})')
        if stripe_width < 1:
            raise ValueError(f'stripe_width must be >= 1, got {stripe_width}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.stripe_width = stripe_width
        self.direction = direction
        self.scale = qk_scale if qk_scale is not None else (embed_dims // num_heads)**-0.5
        self.attn_drop = attn_drop
        self.get_v = nn.Conv2d(embed_dims, embed_dims, 3, 1, 1, groups=embed_dims)

    def stripe_shape(self, height: int, width: int) -> Tuple[int, int]:
        """Stripe (height, width) used on an ``height x width`` map."""
        if self.direction == 'full':
            return height, width
        if self.direction == 'vertical':
            return height, min(self.stripe_width, width)
        return min(self.stripe_width, height), width

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Args:
            query, key, value (torch.Tensor): ``[B, H*W, C]`` in raster order.
            hw_shape (tuple[int, int]): (H, W).

        Returns:
            torch.Tensor: ``[B, H*W, C]``, before the block's output projection.
        """
        B, N, C = query.shape
        H, W = hw_shape
        if N != H * W:
            raise ValueError(f'query has {N} tokens but hw_shape is {H}x{W}')
        if C != self.embed_dims:
            raise ValueError(f'expected {self.embed_dims} channels, got {C}')
        sh, sw = self.stripe_shape(H, W)
        Hp, Wp = -(-H // sh) * sh, -(-W // sw) * sw
        h, d, n = self.num_heads, C // self.num_heads, sh * sw

        def to_stripes(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(B, H, W, C)
            if Hp != H or Wp != W:
                t = F.pad(t, (0, 0, 0, Wp - W, 0, Hp - H))
            return stripe_partition(t, sh, sw)  # [B * nS, n, C]

        q, k, v = to_stripes(query), to_stripes(key), to_stripes(value)
        num = q.shape[0]
        # Stripes [num, n, C] are [num, C, sh, sw] maps in channels-last layout (fast depthwise).
        v_map = v.reshape(num, sh, sw, C).permute(0, 3, 1, 2)
        lepe = self.get_v(v_map.contiguous(memory_format=torch.channels_last))
        lepe = lepe.permute(0, 2, 3, 1).reshape(num, n, h, d).transpose(1, 2)
        q, k, v = (t.reshape(num, n, h, d).transpose(1, 2) for t in (q, k, v))
        mask = None
        if Hp != H or Wp != W:
            valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=query.device)
            valid[:H, :W] = True
            valid = stripe_partition(valid[None, :, :, None], sh, sw).squeeze(-1)  # [nS, n]
            mask = valid[None, :, None, None, :].expand(B, -1, 1, 1, -1).reshape(num, 1, 1, n)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.,
            scale=self.scale)
        out = (out + lepe).transpose(1, 2).reshape(num, n, C)
        out = stripe_reverse(out, sh, sw, Hp, Wp)
        return out[:, :H, :W].reshape(B, N, C)
