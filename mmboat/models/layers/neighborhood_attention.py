"""Neighborhood attention as an ``nn.Module`` (the attention layer of NAT and DiNAT)."""
import functools
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmboat.ops import na2d, na2d_av, na2d_qk
from mmboat.utils.flops import register_flop_handles

__all__ = ['NeighborhoodAttention2d']

register_flop_handles()


@functools.lru_cache(None)
def _traced_na2d_op():
    """``mmboat::na2d_traced``: :func:`mmboat.ops.na2d` as one opaque op.

    Used only while ``torch.jit`` traces the layer (mmengine's FLOP counting): the trace then
    holds one node that :mod:`mmboat.utils.flops` counts, whichever implementation runs inside.
    The compiled ops cannot be traced directly (``torch.jit`` rejects their ``bool[]``
    argument) and the reference's gathers would be traced with baked-in index tables.
    """

    @torch.library.custom_op('mmboat::na2d_traced', mutates_args=())
    def na2d_traced(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor],
                    kernel_size: List[int], dilation: List[int], scale: float,
                    impl: Optional[str]) -> Tensor:
        return na2d(query, key, value, rpb, kernel_size=tuple(kernel_size),
                    dilation=tuple(dilation), scale=scale, impl=impl)

    @na2d_traced.register_fake
    def _(query, key, value, rpb, kernel_size, dilation, scale, impl):
        return torch.empty_like(query)

    return na2d_traced


class NeighborhoodAttention2d(nn.Module):
    """2-D (dilated) neighborhood attention with a relative positional bias.

    `Neighborhood Attention Transformer <https://arxiv.org/abs/2204.07143>`_ and
    `Dilated Neighborhood Attention Transformer <https://arxiv.org/abs/2209.15001>`_.

    Every query attends to the ``kernel_size x kernel_size`` keys of its (dilated) neighbourhood,
    see ``docs/neighborhood_attention.md``. Maps smaller than ``kernel_size * dilation`` on an axis
    are zero-padded at the right/bottom before the qkv projection and cropped back before the
    output projection (padded tokens are not masked; they carry the qkv biases), which is the
    behaviour the released NAT/DiNAT checkpoints were trained with.

    Parameter names (``qkv``, ``rpb``, ``proj``) are the ones of the released checkpoints.

    Args:
        embed_dims (int): Channels ``C`` of the input and output.
        num_heads (int): Attention heads; must divide ``embed_dims``.
        kernel_size (int): Neighbourhood size ``k`` (odd, >= 3). Defaults to 7.
        dilation (int): Dilation ``d`` (>= 1). Defaults to 1.
        qkv_bias (bool): Bias in the qkv projection. Defaults to True.
        qk_scale (float, optional): Logit scale; None means ``head_dim ** -0.5``.
            Defaults to None.
        attn_drop (float): Dropout on the attention weights. When > 0 and training, the
            unfused path (``na2d_qk`` + softmax + dropout + ``na2d_av``) is used. Defaults to 0.
        proj_drop (float): Dropout after the output projection. Defaults to 0.
        rel_pos_bias (bool): Learn the relative positional bias ``rpb``. Defaults to True.
        impl (str, optional): Op implementation (``'auto'``, ``'ext'``, ``'reference'``);
            None reads ``MMBOAT_OPS_IMPL``. Defaults to None.

    Shape:
        - Input: ``[B, H, W, C]`` (any ``H, W >= 1``).
        - Output: ``[B, H, W, C]``.

    Examples:
        >>> import torch
        >>> from mmboat.models.layers import NeighborhoodAttention2d
        >>> attn = NeighborhoodAttention2d(embed_dims=32, num_heads=2, kernel_size=3, dilation=2)
        >>> attn(torch.rand(1, 5, 9, 32)).shape
        torch.Size([1, 5, 9, 32])
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 kernel_size: int = 7,
                 dilation: int = 1,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 rel_pos_bias: bool = True,
                 impl: Optional[str] = None) -> None:
        super().__init__()
        if num_heads < 1 or embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be a positive multiple of '
                             f'num_heads ({num_heads})')
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be an odd int >= 3, got {kernel_size!r}')
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f'dilation must be an int >= 1, got {dilation!r}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.scale = qk_scale if qk_scale is not None else self.head_dims**-0.5
        self.impl = impl

        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1,
                                                2 * kernel_size - 1))
            nn.init.trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        else:
            self.register_parameter('rpb', None)
        self.attn_drop_rate = attn_drop
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'kernel_size={self.kernel_size}, dilation={self.dilation}, '
                f'rel_pos_bias={self.rpb is not None}')

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[B, H, W, C]``. Returns ``[B, H, W, C]``."""
        if x.dim() != 4 or x.shape[-1] != self.embed_dims:
            raise ValueError(f'{type(self).__name__} expects [B, H, W, C={self.embed_dims}] '
                             f'(channels last), got shape {tuple(x.shape)}')
        B, H, W, C = x.shape
        window = self.kernel_size * self.dilation
        pad_h, pad_w = max(0, window - H), max(0, window - W)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w

        # [B, Hp, Wp, 3C] -> 3 x [B, heads, Hp, Wp, head_dims]
        qkv = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dims)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
        if self.training and self.attn_drop_rate > 0:
            attn = na2d_qk((q * self.scale).contiguous(), k.contiguous(), self.rpb,
                           kernel_size=self.kernel_size, dilation=self.dilation, impl=self.impl)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = na2d_av(attn, v.contiguous(), kernel_size=self.kernel_size,
                          dilation=self.dilation, impl=self.impl)
        elif torch.jit.is_tracing():
            out = _traced_na2d_op()(q.contiguous(), k.contiguous(), v.contiguous(), self.rpb,
                                    [self.kernel_size] * 2, [self.dilation] * 2, self.scale,
                                    self.impl)
        else:
            out = na2d(q.contiguous(), k.contiguous(), v.contiguous(), self.rpb,
                       kernel_size=self.kernel_size, dilation=self.dilation, scale=self.scale,
                       impl=self.impl)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)
        if pad_h or pad_w:
            out = out[:, :H, :W, :]
        return self.proj_drop(self.proj(out))
