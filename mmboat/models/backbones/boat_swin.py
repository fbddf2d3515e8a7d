"""BOAT-Swin: Swin Transformer with feature-space local attention (FSLA) blocks.

BOAT: Bilateral Local Attention Vision Transformer (Yu et al., BMVC 2022,
https://arxiv.org/abs/2201.13027). Module names inside the backbone are the official Swin /
BOAT-Swin ones (``patch_embed``, ``layers.{i}.blocks.{j}.{norm1, attn, norm4, attnC, norm2, mlp}``,
``layers.{i}.downsample``), so released weights load after
``tools/model_converters/boat_swin_to_mmboat.py`` (a prefix change, ``norm`` -> ``norm3``).
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmboat.models.layers.feature_space_attention import fsla_sublayer
from mmboat.models.layers.window_attention import ShiftedWindowAttention
from mmboat.models.utils import (MLP, DropPath, FSLABackboneMixin, HierarchicalBackbone,
                                 checkpoint_forward, linear_drop_path)
from mmboat.ops.ext_loader import log_ops_impl
from mmboat.registry import MODELS

__all__ = ['BOATSwinTransformer', 'BOATSwinBlock']


class PatchEmbed(nn.Module):
    """Swin's stem: ``proj = Conv2d(in, C, p, stride p)`` then ``norm``; pads to a multiple of p.

    Args:
        in_channels (int): Image channels.
        embed_dims (int): Output channels C.
        patch_size (int): Patch side p. Defaults to 4.
    """

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dims, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``[B, 3, H, W]`` -> tokens ``[B, ceil(H/p) * ceil(W/p), C]`` and their (h, w)."""
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            x = F.pad(x, (0, -W % p, 0, -H % p))
        x = self.proj(x)
        hw_shape = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw_shape


class PatchMerging(nn.Module):
    """Swin's downsampler: 2x2 neighbours concatenated (x0..x3 order), ``norm``, ``reduction``.

    Odd maps are zero-padded on the bottom/right first; the output is ``ceil(H/2) x ceil(W/2)``.

    Args:
        embed_dims (int): Input channels C (output 2C).
    """

    def __init__(self, embed_dims: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * embed_dims)
        self.reduction = nn.Linear(4 * embed_dims, 2 * embed_dims, bias=False)

    def forward(self, x: torch.Tensor,
                hw_shape: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        B, _, C = x.shape
        H, W = hw_shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # Swin's order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        out_hw = (x.shape[1], x.shape[2])
        return self.reduction(self.norm(x.flatten(1, 2))), out_hw


class BOATSwinBlock(nn.Module):
    """Swin block (W-MSA or SW-MSA, MLP), optionally with an FSLA sub-layer between them.

    ``x += DropPath(attn(norm1(x)))``; with FSLA ``x += [DropPath](attnC(norm4(x)))``;
    ``x += DropPath(mlp(norm2(x)))``.

    Args:
        embed_dims (int): Channels C.
        num_heads (int): Attention heads.
        window_size (int): Window side. Defaults to 7.
        shift (bool): Shifted windows (SW-MSA). Defaults to False.
        mlp_ratio (float): MLP hidden ratio. Defaults to 4.
        qkv_bias (bool): Bias in the qkv projections. Defaults to True.
        qk_scale (float, optional): Window attention logit scale; None is
            ``head_dim ** -0.5``. Defaults to None.
        drop_rate (float): Dropout after projections. Defaults to 0.
        attn_drop_rate (float): Window attention dropout. Defaults to 0.
        drop_path_rate (float): Stochastic depth of this block. Defaults to 0.
        fsla_cfg (dict, optional): The FSLA sub-layer (``norm4``/``attnC``): the complete
            settings of :func:`~mmboat.models.layers.resolve_fsla_cfg` (the
            :class:`FeatureSpaceLocalAttention` arguments and ``drop_path``, whether this
            block's DropPath also covers the FSLA residual); None for a block without FSLA.
            Defaults to None.
        with_cp (bool): Activation checkpointing of the block. Defaults to False.
        impl (str, optional): FSLA op implementation (``'auto'``, ``'ext'``, ``'reference'``;
            None reads ``MMBOAT_OPS_IMPL``). Defaults to None.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int = 7,
                 shift: bool = False,
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
        self.shift = shift
        self.with_fsla = fsla_cfg is not None
        self.with_cp = with_cp
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = ShiftedWindowAttention(embed_dims, num_heads, window_size, qkv_bias,
                                           qk_scale, attn_drop_rate, drop_rate)
        self.drop_path = DropPath(drop_path_rate)
        if fsla_cfg is not None:
            self.norm4, self.attnC, self.fsla_drop_path = fsla_sublayer(
                embed_dims, num_heads, fsla_cfg, qkv_bias, drop_rate, drop_path_rate, impl)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.mlp = MLP(embed_dims, int(embed_dims * mlp_ratio), drop_rate)

    def _forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape, shift=self.shift))
        if self.with_fsla:
            x = x + self.fsla_drop_path(self.attnC(self.norm4(x), hw_shape))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """``[B, H*W, C]`` -> ``[B, H*W, C]``."""
        return checkpoint_forward(self._forward, self.with_cp, x, hw_shape)


class BOATSwinStage(nn.Module):
    """One stage: ``blocks`` then an optional ``downsample`` (official Swin ``BasicLayer``).

    Args:
        blocks (list[BOATSwinBlock]): The blocks.
        downsample (nn.Module, optional): The downsampler; None in the last stage.
    """

    def __init__(self, blocks: List[BOATSwinBlock], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(
        self, x: torch.Tensor, hw_shape: Tuple[int, int]
    ) -> Tuple[torch.Tensor, Tuple[int, int], torch.Tensor, Tuple[int, int]]:
        """Returns the downsampled tokens and shape, and the stage output before downsampling."""
        for block in self.blocks:
            x = block(x, hw_shape)
        if self.downsample is None:
            return x, hw_shape, x, hw_shape
        down, down_hw = self.downsample(x, hw_shape)
        return down, down_hw, x, hw_shape


def _to_pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(size)
    if len(size) != 2:
        raise ValueError(f'img_size must be an int or (H, W), got {size}')
    return size  # type: ignore[return-value]


@MODELS.register_module()
class BOATSwinTransformer(FSLABackboneMixin, HierarchicalBackbone):
    """BOAT-Swin backbone.

    Swin Transformer (https://arxiv.org/abs/2103.14030) with a feature-space local attention
    sub-layer (``norm4``/``attnC``, see :class:`FeatureSpaceLocalAttention`) in the shifted-window
    blocks of every stage whose map at ``img_size`` is larger than the window (stages 1-3 at 224:
    5 FSLA modules in tiny, 11 in small/base), as in the released BOAT-Swin.

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'`` or a dict with the keys
            ``embed_dims`` (int), ``depths`` (list[int]) and ``num_heads`` (list[int]).
            Defaults to ``'tiny'``.
        in_channels (int): Image channels. Defaults to 3.
        img_size (int | tuple[int, int]): The pre-training input size; it decides only the
            default FSLA placement (any input size runs). Defaults to 224.
        window_size (int): Window side. Defaults to 7.
        mlp_ratio (float): MLP hidden ratio. Defaults to 4.
        qkv_bias (bool): Bias in qkv projections. Defaults to True.
        qk_scale (float, optional): Window-attention logit scale (None: ``head_dim ** -0.5``).
            Defaults to None.
        drop_rate (float): Dropout after projections. Defaults to 0.
        attn_drop_rate (float): Window attention dropout. Defaults to 0.
        drop_path_rate (float): Stochastic depth, linear from 0 over all blocks.
            Defaults to 0.1.
        out_indices (int | Sequence[int]): Stages whose outputs are returned (NCHW, strides
            4/8/16/32), each through its own ``norm{i}`` LayerNorm; negative counts from the end.
            Defaults to ``(3, )``.
        frozen_stages (int): -1 freezes nothing, 0 the stem (``patch_embed``), k >= 1 the stem
            and stages 0..k-1 (with their downsamplers and output norms). Defaults to -1.
        norm_eval (bool): Keep norm layers in eval mode while training. Defaults to False.
        with_cp (bool): Activation checkpointing per block. Defaults to False.
        fsla_blocks (Sequence[Sequence[int]], optional): Block indices with FSLA for each
            stage; None is the released placement (odd blocks of stages whose ``img_size`` map
            is larger than the window). Defaults to None.
        fsla_cfg (dict, optional): FSLA settings over :attr:`default_fsla_cfg`: the
            :class:`FeatureSpaceLocalAttention` arguments ``cluster_size``, ``overlap``,
            ``iters``, ``tau``, ``qk_scale`` and ``drop_path`` (DropPath on the FSLA residual).
            Defaults to None.
        impl (str, optional): FSLA op implementation (``'auto'``, ``'ext'``, ``'reference'``;
            None reads ``MMBOAT_OPS_IMPL``). Defaults to None.
        init_cfg (dict | list[dict], optional): Initialisation; by default
            :data:`~mmboat.models.utils.DEFAULT_INIT_CFG`.
            ``dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix='backbone.')``
            loads an official release or a converted / mmengine checkpoint, and stops with an
            error when less than half of the backbone would be loaded (``allow_partial=True``
            opts out; see :mod:`mmboat.models.utils.pretrained`). Defaults to None.

    Examples:
        >>> model = BOATSwinTransformer(arch='tiny', out_indices=(0, 1, 2, 3))
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 96))]
        [(1, 96, 16, 24), (1, 192, 8, 12), (1, 384, 4, 6), (1, 768, 2, 3)]
    """
    checkpoint_family = 'boat_swin'
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], dict(embed_dims=96, depths=(2, 2, 6, 2),
                                            num_heads=(3, 6, 12, 24))),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=96, depths=(2, 2, 18, 2),
                                             num_heads=(3, 6, 12, 24))),
        **dict.fromkeys(['b', 'base'], dict(embed_dims=128, depths=(2, 2, 18, 2),
                                            num_heads=(4, 8, 16, 32))),
    }
    layer_names = ('patch_embed', 'layers', None)
    # What the released BOAT-Swin weights were trained with: the standard scale, no DropPath on
    # the FSLA residual.
    default_fsla_cfg: dict = dict(qk_scale=None, drop_path=False)

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 img_size: Union[int, Sequence[int]] = 224,
                 window_size: int = 7,
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
        self.window_size = window_size
        self.img_size = _to_pair(img_size)
        if fsla_blocks is None:
            fsla_blocks = self.released_fsla_blocks(self.depths, self.img_size, window_size)
        self._set_fsla(fsla_blocks, fsla_cfg)

        self.patch_embed = PatchEmbed(in_channels, self.embed_dims, patch_size=4)
        dpr = linear_drop_path(drop_path_rate, sum(self.depths))
        self.layers = nn.ModuleList()
        dims = self.embed_dims
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            blocks = [
                BOATSwinBlock(
                    dims, heads, window_size=window_size, shift=j % 2 == 1,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                    drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                    drop_path_rate=dpr[sum(self.depths[:i]) + j],
                    fsla_cfg=self.block_fsla_cfg(i, j), with_cp=with_cp, impl=impl)
                for j in range(depth)
            ]
            downsample = PatchMerging(dims) if i < self.num_stages - 1 else None
            self.layers.append(BOATSwinStage(blocks, downsample))
            if i in self.out_indices:
                self.add_module(f'norm{i}', nn.LayerNorm(dims))
            if i < self.num_stages - 1:
                dims *= 2
        self._freeze_stages()
        if any(self.fsla_blocks):  # which FSLA implementation runs, and why
            log_ops_impl(['feature-space attention'], impl)

    @staticmethod
    def released_fsla_blocks(depths: Sequence[int], img_size: Tuple[int, int],
                             window_size: int) -> List[List[int]]:
        """Odd blocks of the stages whose map at ``img_size`` is larger than the window."""
        h, w = math.ceil(img_size[0] / 4), math.ceil(img_size[1] / 4)
        blocks = []
        for depth in depths:
            blocks.append(list(range(1, depth, 2)) if min(h, w) > window_size else [])
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return blocks

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``[B, C_in, H, W]`` -> NCHW maps of the stages in ``out_indices``."""
        if x.dim() != 4:
            raise ValueError(f'expected an image batch [B, C, H, W], got shape {tuple(x.shape)}')
        x, hw_shape = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            x, next_hw, out, out_hw = stage(x, hw_shape)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(out)
                outs.append(out.transpose(1, 2).reshape(out.shape[0], out.shape[2],
                                                        *out_hw).contiguous())
            hw_shape = next_hw
        return tuple(outs)

    def _stage_modules(self, index: int) -> List[nn.Module]:
        return [self.layers[index]]  # a stage holds its downsampler
