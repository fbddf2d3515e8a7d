"""NAT and DiNAT: hierarchical transformers built on (dilated) neighborhood attention."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.model import ModuleList
from torch import Tensor, nn

from mmboat.models.layers.neighborhood_attention import NeighborhoodAttention2d
from mmboat.models.utils import (MLP, DropPath, HierarchicalBackbone, checkpoint_forward,
                                 linear_drop_path)
from mmboat.ops.ext_loader import log_ops_impl
from mmboat.registry import MODELS

__all__ = ['NAT', 'DiNAT', 'NATBlock', 'NATLevel', 'DILATION_SCHEDULES', 'resolve_dilations']

# Per-stage dilation patterns of DiNAT (docs/models.md). A pattern is tiled over its stage, so
# stage 3 covers both 6 (Mini) and 18 (Tiny and larger) blocks.
DILATION_SCHEDULES: Dict[str, Tuple[Tuple[int, ...], ...]] = {
    'imagenet': ((1, 8, 1), (1, 4, 1, 4), (1, 2, 1, 2, 1, 2), (1, 1, 1, 1, 1)),
    'coco': ((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7), (1, 3, 1, 3, 1)),
    'ade20k': ((1, 16, 1), (1, 4, 1, 8), (1, 2, 1, 3, 1, 4), (1, 2, 1, 2, 1)),
}

DilationsType = Union[None, int, str, Sequence[Sequence[int]]]


def resolve_dilations(dilations: DilationsType, depths: Sequence[int]) -> List[List[int]]:
    """Expand a dilation setting into one dilation per block.

    Args:
        dilations (int | str | Sequence[Sequence[int]], optional): None (1 everywhere, NAT), an
            int (the same everywhere), the name of a schedule in :data:`DILATION_SCHEDULES` (each
            stage's pattern tiled over the stage, so the stage depth must be a multiple of the
            pattern length) or one sequence of ints per stage with one entry per block.
        depths (Sequence[int]): Blocks per stage.

    Returns:
        list[list[int]]: ``dilations[stage][block]``.
    """
    if dilations is None:
        return [[1] * depth for depth in depths]
    if isinstance(dilations, bool):
        raise TypeError(f'dilations must be None, an int, a schedule name or per-stage lists, '
                        f'got {dilations!r}')
    if isinstance(dilations, int):
        if dilations < 1:
            raise ValueError(f'dilations must be >= 1, got {dilations}')
        return [[dilations] * depth for depth in depths]
    if isinstance(dilations, str):
        if dilations not in DILATION_SCHEDULES:
            raise ValueError(f'Unknown dilation schedule {dilations!r}; choose one of '
                             f'{sorted(DILATION_SCHEDULES)} or give one list per stage')
        patterns = DILATION_SCHEDULES[dilations]
        if len(patterns) != len(depths):
            raise ValueError(f'Dilation schedule {dilations!r} has {len(patterns)} stages but '
                             f'the arch has {len(depths)} (depths={list(depths)})')
        resolved = []
        for stage, (pattern, depth) in enumerate(zip(patterns, depths)):
            if depth % len(pattern) != 0:
                raise ValueError(
                    f'Dilation schedule {dilations!r}: stage {stage} pattern {list(pattern)} '
                    f'does not tile {depth} blocks; give explicit per-block dilations')
            resolved.append(list(pattern) * (depth // len(pattern)))
        return resolved
    dilations = [list(stage) for stage in dilations]
    if len(dilations) != len(depths):
        raise ValueError(f'dilations has {len(dilations)} stages but the arch has {len(depths)} '
                         f'(depths={list(depths)})')
    for stage, (stage_dilations, depth) in enumerate(zip(dilations, depths)):
        if len(stage_dilations) != depth:
            raise ValueError(f'dilations[{stage}] has {len(stage_dilations)} entries but stage '
                             f'{stage} has {depth} blocks (depths={list(depths)})')
        for d in stage_dilations:
            if not isinstance(d, int) or isinstance(d, bool) or d < 1:
                raise ValueError(f'dilations[{stage}] must hold ints >= 1, got '
                                 f'{stage_dilations}')
    return dilations


class ConvTokenizer(nn.Module):
    """Overlapping conv stem of NAT: two 3x3 stride-2 convs, then LayerNorm (stride 4).

    Args:
        in_channels (int): Input image channels.
        embed_dims (int): Output channels ``C`` (``C/2`` in between).

    Shape:
        ``[B, in_channels, H, W]`` -> ``[B, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2), C]``.
    """

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, embed_dims // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dims // 2, embed_dims, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """3x3 stride-2 conv that doubles the channels, then LayerNorm.

    Args:
        embed_dims (int): Input channels ``C`` (output ``2C``).

    Shape:
        ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), 2C]``.
    """

    def __init__(self, embed_dims: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(embed_dims, 2 * embed_dims, kernel_size=3, stride=2,
                                   padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm(x)


class NATBlock(nn.Module):
    """Pre-norm transformer block with neighborhood attention.

    ``x = x + DropPath(gamma1 * NA(norm1(x)))``, ``x = x + DropPath(gamma2 * mlp(norm2(x)))``;
    ``gamma1/gamma2`` exist only with layer scale.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads.
        kernel_size (int): Neighbourhood size. Defaults to 7.
        dilation (int): Dilation of the neighbourhood. Defaults to 1.
        mlp_ratio (float): Hidden/input channels of the MLP. Defaults to 4.
        qkv_bias (bool): Bias in the qkv projection. Defaults to True.
        qk_scale (float, optional): Logit scale override. Defaults to None.
        drop_rate (float): Dropout after projections. Defaults to 0.
        attn_drop_rate (float): Attention-weight dropout. Defaults to 0.
        drop_path_rate (float): Stochastic depth rate. Defaults to 0.
        layer_scale (float, optional): Initial value of the per-channel layer scale;
            None disables it. Defaults to None.
        with_cp (bool): Activation checkpointing of the whole block. Defaults to False.
        impl (str, optional): NA op implementation. Defaults to None.

    Shape:
        ``[B, H, W, C]`` -> ``[B, H, W, C]``.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 kernel_size: int = 7,
                 dilation: int = 1,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 layer_scale: Optional[float] = None,
                 with_cp: bool = False,
                 impl: Optional[str] = None) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = NeighborhoodAttention2d(
            embed_dims, num_heads, kernel_size=kernel_size, dilation=dilation,
            qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop_rate,
            proj_drop=drop_rate, impl=impl)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(embed_dims)
        self.mlp = MLP(embed_dims, int(embed_dims * mlp_ratio), drop=drop_rate)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((embed_dims, ), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((embed_dims, ), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None

    def _forward(self, x: Tensor) -> Tensor:
        attn = self.attn(self.norm1(x))
        mlp_in = x + self.drop_path(attn if self.gamma1 is None else self.gamma1 * attn)
        mlp = self.mlp(self.norm2(mlp_in))
        return mlp_in + self.drop_path(mlp if self.gamma2 is None else self.gamma2 * mlp)

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint_forward(self._forward, self.with_cp, x)


class NATLevel(nn.Module):
    """One stage of NAT: ``blocks`` at constant resolution, then an optional ``downsample``.

    Args:
        embed_dims (int): Channels of the stage.
        depth (int): Number of blocks.
        num_heads (int): Attention heads.
        kernel_size (int): Neighbourhood size.
        dilations (Sequence[int]): One dilation per block.
        downsample (bool): End with a :class:`ConvDownsampler`.
        drop_path_rates (Sequence[float]): One stochastic depth rate per block.
        block_cfg (dict): Other :class:`NATBlock` arguments shared by the blocks.

    Shape:
        ``[B, H, W, C]`` -> (``[B, H, W, C]`` before downsampling,
        ``[B, ceil(H/2), ceil(W/2), 2C]`` or the same tensor without a downsampler).
    """

    def __init__(self, embed_dims: int, depth: int, num_heads: int, kernel_size: int,
                 dilations: Sequence[int], downsample: bool, drop_path_rates: Sequence[float],
                 block_cfg: dict) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            NATBlock(embed_dims, num_heads, kernel_size=kernel_size, dilation=dilations[i],
                     drop_path_rate=drop_path_rates[i], **block_cfg) for i in range(depth)
        ])
        self.downsample = ConvDownsampler(embed_dims) if downsample else None

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        for block in self.blocks:
            x = block(x)
        return x, (x if self.downsample is None else self.downsample(x))


@MODELS.register_module()
class NAT(HierarchicalBackbone):
    """Neighborhood Attention Transformer.

    `Neighborhood Attention Transformer <https://arxiv.org/abs/2204.07143>`_ (CVPR 2023).
    With ``dilations`` it is DiNAT (:class:`DiNAT` only changes the defaults).

    Parameter names follow the released checkpoints (``patch_embed.proj.0/1``,
    ``levels.{i}.blocks.{j}.attn.rpb``, ``levels.{i}.downsample.reduction``...); the output
    norms are ``norm{i}`` for every ``i`` in ``out_indices``. The classification checkpoints'
    final ``norm`` is ``norm3`` here (see ``tools/model_converters/nat_to_mmboat.py``).

    Args:
        arch (str | dict): A name in :attr:`arch_zoo` or a dict with the keys
            ``embed_dims`` (int), ``depths`` (list[int]), ``num_heads`` (list[int]),
            ``mlp_ratio`` (float) and optionally ``layer_scale`` (float or None).
            Defaults to ``'tiny'``.
        in_channels (int): Input image channels. Defaults to 3.
        kernel_size (int | Sequence[int]): Neighbourhood size, for all stages or one per stage.
            Defaults to 7.
        dilations (None | int | str | Sequence[Sequence[int]]): Per-block dilations, see
            :func:`resolve_dilations` (``'imagenet'``, ``'coco'``, ``'ade20k'`` are DiNAT's
            schedules). Defaults to ``'default'``: the class's ``default_dilations`` (None, no
            dilation, for NAT; ``'imagenet'`` for DiNAT).
        out_indices (Sequence[int] | int): Stages to output (negative counts from the end).
            Defaults to ``(3, )``.
        qkv_bias (bool): Bias in the qkv projections. Defaults to True.
        qk_scale (float, optional): Logit scale override. Defaults to None.
        drop_rate (float): Dropout after projections. Defaults to 0.
        attn_drop_rate (float): Attention-weight dropout. Defaults to 0.
        drop_path_rate (float): Stochastic depth, linear from 0 to this over all blocks.
            Defaults to 0.1.
        frozen_stages (int): ``-1`` freezes nothing, ``0`` the stem, ``i >= 1`` the stem and
            stages ``0..i-1`` (with their downsamplers and output norms). Defaults to -1.
        norm_eval (bool): Keep the norm layers in eval mode during training. Defaults to False.
        with_cp (bool): Activation checkpointing of every block. Defaults to False.
        impl (str, optional): NA op implementation (``'auto'``, ``'ext'``, ``'reference'``).
            Defaults to None (``MMBOAT_OPS_IMPL``).
        init_cfg (dict | list[dict], optional): Initialisation;
            ``dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix='backbone.')``
            loads an official release or a converted / mmengine checkpoint, and stops with an
            error when less than half of the backbone would be loaded (``allow_partial=True``
            opts out; see :mod:`mmboat.models.utils.pretrained`). Defaults to None
            (:data:`~mmboat.models.utils.DEFAULT_INIT_CFG`).

    Examples:
        >>> import torch
        >>> from mmboat.models import NAT
        >>> model = NAT(arch='mini', out_indices=(0, 1, 2, 3)).eval()
        >>> outs = model(torch.rand(1, 3, 64, 64))
        >>> [tuple(out.shape) for out in outs]
        [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    """
    checkpoint_family = 'nat'
    arch_zoo = {
        **dict.fromkeys(['m', 'mini'], {
            'embed_dims': 64, 'depths': [3, 4, 6, 5], 'num_heads': [2, 4, 8, 16],
            'mlp_ratio': 3., 'layer_scale': None}),
        **dict.fromkeys(['t', 'tiny'], {
            'embed_dims': 64, 'depths': [3, 4, 18, 5], 'num_heads': [2, 4, 8, 16],
            'mlp_ratio': 3., 'layer_scale': None}),
        **dict.fromkeys(['s', 'small'], {
            'embed_dims': 96, 'depths': [3, 4, 18, 5], 'num_heads': [3, 6, 12, 24],
            'mlp_ratio': 2., 'layer_scale': 1e-5}),
        **dict.fromkeys(['b', 'base'], {
            'embed_dims': 128, 'depths': [3, 4, 18, 5], 'num_heads': [4, 8, 16, 32],
            'mlp_ratio': 2., 'layer_scale': 1e-5}),
    }  # yapf: disable
    default_dilations: DilationsType = None
    essential_keys = ('embed_dims', 'depths', 'num_heads', 'mlp_ratio')
    optional_keys = ('layer_scale', )
    layer_names = ('patch_embed', 'levels', None)

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 kernel_size: Union[int, Sequence[int]] = 7,
                 dilations: DilationsType = 'default',
                 out_indices: Union[int, Sequence[int]] = (3, ),
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 impl: Optional[str] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(arch, out_indices, frozen_stages, norm_eval, init_cfg)
        self.arch_settings.setdefault('layer_scale', None)
        self.mlp_ratio: float = self.arch_settings['mlp_ratio']
        self.layer_scale: Optional[float] = self.arch_settings.get('layer_scale')
        self.num_layers = sum(self.depths)

        if isinstance(kernel_size, int):
            kernel_size = [kernel_size] * self.num_stages
        self.kernel_sizes = list(kernel_size)
        if len(self.kernel_sizes) != self.num_stages:
            raise ValueError(f'kernel_size has {len(self.kernel_sizes)} entries but the arch has '
                             f'{self.num_stages} stages')
        if isinstance(dilations, str) and dilations == 'default':
            dilations = self.default_dilations
        self.dilations = resolve_dilations(dilations, self.depths)

        self.with_cp = with_cp

        self.patch_embed = ConvTokenizer(in_channels, self.embed_dims)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = linear_drop_path(drop_path_rate, self.num_layers)
        block_cfg = dict(mlp_ratio=self.mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                         layer_scale=self.layer_scale, with_cp=with_cp, impl=impl)
        self.levels = ModuleList()
        for i, depth in enumerate(self.depths):
            start = sum(self.depths[:i])
            self.levels.append(
                NATLevel(self.num_features[i], depth, self.num_heads[i], self.kernel_sizes[i],
                         self.dilations[i], downsample=i < self.num_stages - 1,
                         drop_path_rates=dpr[start:start + depth], block_cfg=block_cfg))
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))
        self._freeze_stages()
        log_ops_impl(['neighborhood attention'], impl)  # which NA implementation runs, and why

    def init_weights(self) -> None:
        super().init_weights()
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            return  # the checkpoint holds rpb too
        for name, param in self.named_parameters():
            if name.endswith('attn.rpb'):
                nn.init.trunc_normal_(param, std=.02, a=-2., b=2.)

    def _stage_modules(self, index: int) -> List[nn.Module]:
        return [self.levels[index]]  # a level holds its downsampler

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Args: x ``[B, in_channels, H, W]``. Returns one ``[B, C_i, H_i, W_i]`` per out index
        (strides 4, 8, 16, 32, sizes ``ceil``-divided)."""
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for i, level in enumerate(self.levels):
            out, x = level(x)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(out)
                outs.append(out.permute(0, 3, 1, 2).contiguous())
        return tuple(outs)


@MODELS.register_module()
class DiNAT(NAT):
    """Dilated Neighborhood Attention Transformer.

    `Dilated Neighborhood Attention Transformer <https://arxiv.org/abs/2209.15001>`_.
    :class:`NAT` with dilated neighbourhoods in alternating blocks; ``dilations`` defaults to the
    ImageNet schedule (use ``'coco'`` / ``'ade20k'`` for the detection / segmentation
    fine-tuning schedules). Same arguments as :class:`NAT`; the arch zoo adds ``'large'`` and
    DiNAT-Small has no layer scale.

    Examples:
        >>> import torch
        >>> from mmboat.models import DiNAT
        >>> model = DiNAT(arch='mini', kernel_size=3, dilations='ade20k', out_indices=(0, 3))
        >>> model = model.eval()
        >>> [tuple(out.shape) for out in model(torch.rand(1, 3, 64, 96))]
        [(1, 64, 16, 24), (1, 512, 2, 3)]
    """
    arch_zoo = {
        **{k: v for k, v in NAT.arch_zoo.items() if k not in ('s', 'small')},
        **dict.fromkeys(['s', 'small'], {
            'embed_dims': 96, 'depths': [3, 4, 18, 5], 'num_heads': [3, 6, 12, 24],
            'mlp_ratio': 2., 'layer_scale': None}),
        **dict.fromkeys(['l', 'large'], {
            'embed_dims': 192, 'depths': [3, 4, 18, 5], 'num_heads': [6, 12, 24, 48],
            'mlp_ratio': 2., 'layer_scale': None}),
    }  # yapf: disable
    default_dilations: DilationsType = 'imagenet'
