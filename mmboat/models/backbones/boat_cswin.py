"""BOAT-CSWin: CSWin Transformer with feature-space local attention (FSLA) blocks.

BOAT: Bilateral Local Attention Vision Transformer (Yu et al., BMVC 2022,
https://arxiv.org/abs/2201.13027) on CSWin Transformer (Dong et al., CVPR 2022,
https://arxiv.org/abs/2107.00652). Module names are CSWin's / BOAT-CSWin's own
(``stage{k}.{j}.{qkv, norm1, attns, proj, norm3, content_attn, norm2, mlp}``, ``merge{k}``), so
released weights load after ``tools/model_converters/boat_cswin_to_mmboat.py`` (prefix change,
``stage1_conv_embed.{0,2}`` -> ``stage1_conv_embed.{conv,norm}``, ``norm`` -> ``norm3``).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from mmboat.models.layers.cswin_attention import StripeAttention
from mmboat.models.layers.feature_space_attention import fsla_sublayer
from mmboat.models.utils import (MLP, DropPath, FSLABackboneMixin, HierarchicalBackbone,
                                 checkpoint_forward, linear_drop_path)
from mmboat.ops.ext_loader import log_ops_impl
from mmboat.registry import MODELS

__all__ = ['BOATCSWinTransformer', 'BOATCSWinBlock']


class ConvEmbed(nn.Module):
    """CSWin's stem ``stage1_conv_embed``: ``conv`` 7x7 stride 4 padding 2, then ``norm``.

    Args:
        in_channels (int): Image channels.
        embed_dims (int): Output channels C.
    """

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, embed_dims, 7, 4, 2)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``[B, 3, H, W]`` -> tokens ``[B, h*w, C]`` and (h, w), ``h = floor((H - 3) / 4) + 1``."""
        if min(x.shape[-2:]) < 3:
            raise ValueError(f'BOAT-CSWin needs an input of at least 3x3, got '
                             f'{tuple(x.shape[-2:])}')
        x = self.conv(x)
        hw_shape = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw_shape


class MergeBlock(nn.Module):
    """CSWin's ``merge{k}``: ``conv`` 3x3 stride 2 padding 1 (C -> 2C), then ``norm``.

    Args:
        in_dims (int): Input channels.
        out_dims (int): Output channels.
    """

    def __init__(self, in_dims: int, out_dims: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dims, out_dims, 3, 2, 1)
        self.norm = nn.LayerNorm(out_dims)

    def forward(self, x: torch.Tensor,
                hw_shape: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        B, N, C = x.shape
        x = self.conv(x.transpose(1, 2).reshape(B, C, *hw_shape))
        out_hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), out_hw


class BOATCSWinBlock(nn.Module):
    """CSWin block (cross-shaped window attention, MLP), optionally with an FSLA sub-layer.

    ``x += DropPath(proj(cat(attns[0](...), attns[1](...))))`` on ``qkv(norm1(x))``, where
    ``attns[0]`` takes the first half of the channels/heads on vertical stripes and ``attns[1]``
    the second half on horizontal stripes (one full-map branch in the last stage); with FSLA
    ``x += [DropPath](content_attn(norm3(x)))``; ``x += DropPath(mlp(norm2(x)))``.

    Args:
        embed_dims (int): Channels C.
        num_heads (int): Heads (even unless ``last_stage``).
        stripe_width (int): Stripe width.
        last_stage (bool): Attend over the whole map with one branch. Defaults to False.
        mlp_ratio (float): MLP hidden ratio. Defaults to 4.
        qkv_bias (bool): Bias in the qkv projections. Defaults to True.
        qk_scale (float, optional): Stripe attention logit scale (None: ``head_dim ** -0.5``).
            Defaults to None.
        drop_rate (float): Dropout after projections. Defaults to 0.
        attn_drop_rate (float): Stripe attention dropout. Defaults to 0.
        drop_path_rate (float): Stochastic depth of this block. Defaults to 0.
        fsla_cfg (dict, optional): The FSLA sub-layer (``norm3``/``content_attn``): the complete
            settings of :func:`~mmboat.models.layers.resolve_fsla_cfg`; None for a block without
            FSLA. Defaults to None.
        with_cp (bool): Activation checkpointing. Defaults to False.
        impl (str, optional): FSLA op implementation (``'auto'``, ``'ext'``, ``'reference'``;
            None reads ``MMBOAT_OPS_IMPL``). Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 stripe_width: int,
                 last_stage: bool = False,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 fsla_cfg: Optional[dict] = None,
                 with_cp: bool = False,
                 impl: Optional[str] = None) -> None:
        super().__init__()
        if not last_stage and (num_heads % 2 or embed_dims % 2):
            raise ValueError('cross-shaped attention splits heads and channels in two halves; '
                             f'got num_heads={num_heads}, embed_dims={embed_dims}')
        self.with_fsla = fsla_cfg is not None
        self.with_cp = with_cp
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims, bias=qkv_bias)
        self.norm1 = nn.LayerNorm(embed_dims)
        if last_stage:
            branches = [(embed_dims, num_heads, 'full')]
        else:
            branches = [(embed_dims // 2, num_heads // 2, 'vertical'),
                        (embed_dims // 2, num_heads // 2, 'horizontal')]
        self.attns = nn.ModuleList([
            StripeAttention(dims, heads, stripe_width, direction, qk_scale, attn_drop_rate)
            for dims, heads, direction in branches
        ])
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(drop_rate)
        self.drop_path = DropPath(drop_path_rate)
        if fsla_cfg is not None:
            self.norm3, self.content_attn, self.fsla_drop_path = fsla_sublayer(
                embed_dims, num_heads, fsla_cfg, qkv_bias, drop_rate, drop_path_rate, impl)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.mlp = MLP(embed_dims, int(embed_dims * mlp_ratio), drop_rate)

    def cross_shaped_attention(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """The image-space sub-layer without its residual: ``[B, N, C]`` -> ``[B, N, C]``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        outs, start = [], 0
        for attn in self.attns:
            part = slice(start, start + attn.embed_dims)
            outs.append(attn(q[..., part], k[..., part], v[..., part], hw_shape))
            start += attn.embed_dims
        return self.proj_drop(self.proj(torch.cat(outs, dim=-1)))

    def _forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.cross_shaped_attention(self.norm1(x), hw_shape))
        if self.with_fsla:
            x = x + self.fsla_drop_path(self.content_attn(self.norm3(x), hw_shape))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """``[B, H*W, C]`` -> ``[B, H*W, C]``."""
        return checkpoint_forward(self._forward, self.with_cp, x, hw_shape)


@MODELS.register_module()
class BOATCSWinTransformer(FSLABackboneMixin, HierarchicalBackbone):
    """BOAT-CSWin backbone.

    CSWin Transformer with a feature-space local attention sub-layer (``norm3``/
    ``content_attn``, see :class:`FeatureSpaceLocalAttention`) in the even-index blocks of every
    stage (14 FSLA modules in tiny, 20 in small/base), as in the released BOAT-CSWin.

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'`` or a dict with the keys
            ``embed_dims`` (int), ``depths``, ``num_heads`` and ``stripe_widths`` (list[int]).
            Defaults to ``'tiny'``.
        in_channels (int): Image channels. Defaults to 3.
        mlp_ratio (float): MLP hidden ratio. Defaults to 4.
        qkv_bias (bool): Bias in qkv projections. Defaults to True.
        qk_scale (float, optional): Stripe-attention logit scale (None: ``head_dim ** -0.5``).
            Defaults to None.
        drop_rate (float): Dropout after projections. Defaults to 0.
        attn_drop_rate (float): Stripe attention dropout. Defaults to 0.
        drop_path_rate (float): Stochastic depth, linear from 0 over all blocks.
            Defaults to 0.1.
        out_indices (int | Sequence[int]): Stages whose outputs are returned (NCHW, strides
            4/8/16/32), each through its own ``norm{i}`` LayerNorm; negative counts from the end.
            Defaults to ``(3, )``.
        frozen_stages (int): -1 freezes nothing, 0 the stem (``stage1_conv_embed``), k >= 1 the
            stem and stages 0..k-1 (with their ``merge`` layers and output norms).
            Defaults to -1.
        norm_eval (bool): Keep norm layers in eval mode while training. Defaults to False.
        with_cp (bool): Activation checkpointing per block. Defaults to False.
        fsla_blocks (Sequence[Sequence[int]], optional): Block indices with FSLA for each
            stage; None is the released placement (even-index blocks of every stage).
            Defaults to None.
        fsla_cfg (dict, optional): FSLA settings over :attr:`default_fsla_cfg`: the
            :class:`FeatureSpaceLocalAttention` arguments ``cluster_size``, ``overlap``,
            ``iters``, ``tau``, ``qk_scale`` and ``drop_path`` (DropPath on the FSLA residual).
            The defaults are what the released BOAT-CSWin weights need: ``qk_scale=1.0`` (a
            constructor bug of the released code; ``qk_scale=None`` trains with
            ``head_dim ** -0.5``) and ``drop_path=True``. Defaults to None.
        impl (str, optional): FSLA op implementation (``'auto'``, ``'ext'``, ``'reference'``;
            None reads ``MMBOAT_OPS_IMPL``). Defaults to None.
        init_cfg (dict | list[dict], optional): Initialisation; by default
            :data:`~mmboat.models.utils.DEFAULT_INIT_CFG`.
            ``dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix='backbone.')``
            loads an official release or a converted / mmengine checkpoint, and stops with an
            error when less than half of the backbone would be loaded (``allow_partial=True``
            opts out; see :mod:`mmboat.models.utils.pretrained`). Defaults to None.

    Examples:
        >>> model = BOATCSWinTransformer(arch='tiny', out_indices=(0, 1, 2, 3))
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 96))]
        [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    """
    checkpoint_family = 'boat_cswin'
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], dict(embed_dims=64, depths=(1, 2, 21, 1),
                                            num_heads=(2, 4, 8, 16), stripe_widths=(1, 2, 7, 7))),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=64, depths=(2, 4, 32, 2),
                                             num_heads=(2, 4, 8, 16),
                                             stripe_widths=(1, 2, 7, 7))),
        **dict.fromkeys(['b', 'base'], dict(embed_dims=96, depths=(2, 4, 32, 2),
                                            num_heads=(4, 8, 16, 32),
                                            stripe_widths=(1, 2, 7, 7))),
    }
    essential_keys = ('embed_dims', 'depths', 'num_heads', 'stripe_widths')
    stem_name = 'stage1_conv_embed'
    layer_names = ('stage1_conv_embed', 'stage', 'merge')
    # What the released BOAT-CSWin weights were trained with (see ``fsla_cfg``).
    default_fsla_cfg: dict = dict(qk_scale=1., drop_path=True)

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 out_indices: Union[int, Sequence[int]] = (3, ),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 fsla_blocks: Optional[Sequence[Sequence[int]]] = None,
                 fsla_cfg: Optional[dict] = None,
                 impl: Optional[str] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(arch, out_indices, frozen_stages, norm_eval, init_cfg)
        self.stripe_widths = tuple(int(s) for s in self.arch_settings['stripe_widths'])
        if not len(self.num_heads) == len(self.stripe_widths) == self.num_stages:
            raise ValueError(f'depths {self.depths}, num_heads {self.num_heads} and stripe_widths '
                             f'{self.stripe_widths} must have the same length')
        if fsla_blocks is None:
            fsla_blocks = [list(range(0, d, 2)) for d in self.depths]
        self._set_fsla(fsla_blocks, fsla_cfg)

        self.stage1_conv_embed = ConvEmbed(in_channels, self.embed_dims)
        dpr = linear_drop_path(drop_path_rate, sum(self.depths))
        dims = self.embed_dims
        for i in range(self.num_stages):
            blocks = nn.ModuleList([
                BOATCSWinBlock(
                    dims, self.num_heads[i], self.stripe_widths[i],
                    last_stage=i == self.num_stages - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                    drop_path_rate=dpr[sum(self.depths[:i]) + j],
                    fsla_cfg=self.block_fsla_cfg(i, j), with_cp=with_cp, impl=impl)
                for j in range(self.depths[i])
            ])
            self.add_module(f'stage{i + 1}', blocks)
            if i in self.out_indices:
                self.add_module(f'norm{i}', nn.LayerNorm(dims))
            if i < self.num_stages - 1:
                self.add_module(f'merge{i + 1}', MergeBlock(dims, dims * 2))
                dims *= 2
        self._freeze_stages()
        if any(self.fsla_blocks):  # which FSLA implementation runs, and why
            log_ops_impl(['feature-space attention'], impl)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``[B, C_in, H, W]`` -> NCHW maps of the stages in ``out_indices``."""
        if x.dim() != 4:
            raise ValueError(f'expected an image batch [B, C, H, W], got shape {tuple(x.shape)}')
        x, hw_shape = self.stage1_conv_embed(x)
        outs = []
        for i in range(self.num_stages):
            for block in getattr(self, f'stage{i + 1}'):
                x = block(x, hw_shape)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                outs.append(out.transpose(1, 2).reshape(out.shape[0], out.shape[2],
                                                        *hw_shape).contiguous())
            if i < self.num_stages - 1:
                x, hw_shape = getattr(self, f'merge{i + 1}')(x, hw_shape)
        return tuple(outs)

    def _stage_modules(self, index: int) -> List[nn.Module]:
        modules = [getattr(self, f'stage{index + 1}')]
        if index < self.num_stages - 1:
            modules.append(getattr(self, f'merge{index + 1}'))
        return modules
