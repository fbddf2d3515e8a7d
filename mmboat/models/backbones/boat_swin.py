"""BOAT-Swin: Swin Transformer with feature-space local attention (FSLA) blocks.

BOAT: Bilateral Local Attention Vision Transformer (Yu et al., BMVC 2022,
https://arxiv.org/abs/2201.13027). Module names inside the backbone are the official Swin /
BOAT-Swin ones (``patch_embed``, ``layers.{i}.blocks.{j}.{norm1, attn, norm4, attnC, norm2, mlp}``,
``layers.{i}.downsample``), so released weights load after
``tools/model_converters/boat_swin_to_mmboat.py`` (a prefix change, ``norm`` -> ``norm3``).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_

from mmboat.models.layers.feature_space_attention import FeatureSpaceLocalAttention
from mmboat.models.layers.window_attention import ShiftedWindowAttention
from mmboat.models.utils import DropPath, FrozenStagesMixin, PretrainedMixin, layer_depth
from mmboat.ops.ext_loader import log_ops_impl
from mmboat.registry import MODELS

__all__ = ['BOATSwinTransformer', 'BOATSwinBlock', 'MLP']


class MLP(nn.Module):
    """Transformer feed-forward network ``fc1 -> GELU -> drop -> fc2 -> drop``.

    Args:
        embed_dims: input/output channels.
        hidden_dims: hidden channels.
        drop: dropout after each linear. Defaults to 0.
    """

    def __init__(self, embed_dims: int, hidden_dims: int, drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, embed_dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Swin's stem: ``proj = Conv2d(in, C, p, stride p)`` then ``norm``; pads to a multiple of p.

    Args:
        in_channels: image channels.
        embed_dims: output channels C.
        patch_size: patch side p. Defaults to 4.
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
        embed_dims: input channels C (output 2C).
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
        embed_dims: channels C.
        num_heads: heads.
        window_size: window side. Defaults to 7.
        shift: shifted windows (SW-MSA). Defaults to False.
        mlp_ratio: MLP hidden ratio. Defaults to 4.
        qkv_bias: bias in the qkv projections. Defaults to True.
        qk_scale: window attention logit scale; None is ``head_dim ** -0.5``. Defaults to None.
        drop_rate: dropout after projections. Defaults to 0.
        attn_drop_rate: attention dropout (window attention). Defaults to 0.
        drop_path_rate: stochastic depth of this block. Defaults to 0.
        with_fsla: add the FSLA sub-layer (``norm4``/``attnC``). Defaults to False.
        fsla_cluster_size: FSLA cluster size. Defaults to 49.
        fsla_overlap: FSLA sibling overlap. Defaults to 20.
        fsla_iters: FSLA clustering iterations. Defaults to 2.
        fsla_tau: FSLA soft-assignment inverse temperature. Defaults to 100.
        fsla_qk_scale: FSLA logit scale; None is ``head_dim ** -0.5``. Defaults to None.
        fsla_drop_path: apply this block's DropPath to the FSLA residual (the released BOAT-Swin
            does not). Defaults to False.
        with_cp: activation checkpointing of the block. Defaults to False.
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
                 with_fsla: bool = False,
                 fsla_cluster_size: int = 49,
                 fsla_overlap: int = 20,
                 fsla_iters: int = 2,
                 fsla_tau: float = 100.,
                 fsla_qk_scale: Optional[float] = None,
                 fsla_drop_path: bool = False,
                 with_cp: bool = False) -> None:
        super().__init__()
        self.shift = shift
        self.with_fsla = with_fsla
        self.with_cp = with_cp
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = ShiftedWindowAttention(embed_dims, num_heads, window_size, qkv_bias,
                                           qk_scale, attn_drop_rate, drop_rate)
        self.drop_path = DropPath(drop_path_rate)
        if with_fsla:
            self.norm4 = nn.LayerNorm(embed_dims)
            self.attnC = FeatureSpaceLocalAttention(
                embed_dims, num_heads, cluster_size=fsla_cluster_size, overlap=fsla_overlap,
                iters=fsla_iters, tau=fsla_tau, qkv_bias=qkv_bias, qk_scale=fsla_qk_scale,
                proj_drop=drop_rate)
            self.fsla_drop_path = DropPath(drop_path_rate) if fsla_drop_path else nn.Identity()
        self.norm2 = nn.LayerNorm(embed_dims)
        self.mlp = MLP(embed_dims, int(embed_dims * mlp_ratio), drop_rate)

    def _forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape, shift=self.shift))
        if self.with_fsla:
            x = x + self.fsla_drop_path(self.attnC(self.norm4(x), hw_shape))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """``[B, H*W, C]`` -> ``[B, H*W, C]``."""
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, hw_shape, use_reentrant=False)
        return self._forward(x, hw_shape)


class BOATSwinStage(nn.Module):
    """One stage: ``blocks`` then an optional ``downsample`` (official Swin ``BasicLayer``)."""

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


def check_arch(arch: Union[str, dict], arch_zoo: Dict[str, dict], essential_keys: Sequence[str],
               name: str) -> dict:
    """Resolve ``arch`` (a zoo name or a dict) with a clear message on bad input."""
    if isinstance(arch, str):
        key = arch.lower()
        if key not in arch_zoo:
            raise KeyError(f'Arch {arch!r} is not in default archs of {name}: '
                           f'{sorted(set(arch_zoo))}')
        return dict(arch_zoo[key])
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
    missing = sorted(set(essential_keys) - set(arch))
    unknown = sorted(set(arch) - set(essential_keys))
    if missing or unknown:
        raise ValueError(f'Custom arch of {name} needs exactly the keys {sorted(essential_keys)}; '
                         f'missing {missing}, unknown {unknown}')
    return dict(arch)


@MODELS.register_module()
class BOATSwinTransformer(FrozenStagesMixin, PretrainedMixin, BaseModule):
    """BOAT-Swin backbone.

    Swin Transformer (https://arxiv.org/abs/2103.14030) with a feature-space local attention
    sub-layer (``norm4``/``attnC``, see :class:`FeatureSpaceLocalAttention`) in the shifted-window
    blocks of every stage whose map at ``img_size`` is larger than the window (stages 1-3 at 224:
    5 FSLA modules in tiny, 11 in small/base), as in the released BOAT-Swin.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with keys ``embed_dims``, ``depths``
            and ``num_heads``. Defaults to ``'tiny'``.
        in_channels: image channels. Defaults to 3.
        img_size: the pre-training input size; it decides only the default FSLA placement (any
            input size runs). Defaults to 224.
        window_size: window side. Defaults to 7.
        mlp_ratio: MLP hidden ratio. Defaults to 4.
        qkv_bias: bias in qkv projections. Defaults to True.
        qk_scale: window-attention logit scale (None: ``head_dim ** -0.5``). Defaults to None.
        drop_rate: dropout after projections. Defaults to 0.
        attn_drop_rate: window attention dropout. Defaults to 0.
        drop_path_rate: stochastic depth, linear from 0 over all blocks. Defaults to 0.1.
        out_indices: stages whose outputs are returned (NCHW, strides 4/8/16/32), each through its
            own ``norm{i}`` LayerNorm. Defaults to ``(3, )``.
        frozen_stages: -1 freezes nothing, 0 the stem (``patch_embed``), k >= 1 the stem and
            stages 0..k-1 (with their downsamplers and output norms). Defaults to -1.
        norm_eval: keep norm layers in eval mode while training. Defaults to False.
        with_cp: activation checkpointing per block. Defaults to False.
        fsla_blocks: block indices with FSLA for each stage; None is the released placement
            (odd blocks of stages whose ``img_size`` map is larger than the window). Defaults to
            None.
        fsla_cluster_size: FSLA cluster size m. Defaults to 49.
        fsla_overlap: FSLA sibling overlap o. Defaults to 20.
        fsla_iters: FSLA clustering iterations. Defaults to 2.
        fsla_tau: FSLA inverse temperature. Defaults to 100.
        fsla_qk_scale: FSLA logit scale (None: ``head_dim ** -0.5``, as the released BOAT-Swin).
            Defaults to None.
        fsla_drop_path: DropPath on the FSLA residual (released BOAT-Swin: no). Defaults to False.
        init_cfg: mmengine init config;
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
    essential_keys = ('embed_dims', 'depths', 'num_heads')

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
                 out_indices: Sequence[int] = (3, ),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 fsla_blocks: Optional[Sequence[Sequence[int]]] = None,
                 fsla_cluster_size: int = 49,
                 fsla_overlap: int = 20,
                 fsla_iters: int = 2,
                 fsla_tau: float = 100.,
                 fsla_qk_scale: Optional[float] = None,
                 fsla_drop_path: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        arch = check_arch(arch, self.arch_zoo, self.essential_keys, type(self).__name__)
        self.embed_dims = int(arch['embed_dims'])
        self.depths = tuple(int(d) for d in arch['depths'])
        self.num_heads = tuple(int(h) for h in arch['num_heads'])
        self.num_stages = len(self.depths)
        if len(self.num_heads) != self.num_stages:
            raise ValueError(f'depths {self.depths} and num_heads {self.num_heads} must have '
                             'the same length')
        self.out_indices = _check_out_indices(out_indices, self.num_stages)
        self._set_freezing(frozen_stages, norm_eval)
        self.window_size = window_size
        self.img_size = _to_pair(img_size)
        if fsla_blocks is None:
            fsla_blocks = self.released_fsla_blocks(self.depths, self.img_size, window_size)
        self.fsla_blocks = _check_fsla_blocks(fsla_blocks, self.depths)

        self.patch_embed = PatchEmbed(in_channels, self.embed_dims, patch_size=4)
        dpr = _linear_drop_path(drop_path_rate, sum(self.depths))
        self.layers = nn.ModuleList()
        dims = self.embed_dims
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            blocks = [
                BOATSwinBlock(
                    dims, heads, window_size=window_size, shift=j % 2 == 1,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                    drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                    drop_path_rate=dpr[sum(self.depths[:i]) + j],
                    with_fsla=j in self.fsla_blocks[i], fsla_cluster_size=fsla_cluster_size,
                    fsla_overlap=fsla_overlap, fsla_iters=fsla_iters, fsla_tau=fsla_tau,
                    fsla_qk_scale=fsla_qk_scale, fsla_drop_path=fsla_drop_path,
                    with_cp=with_cp) for j in range(depth)
            ]
            downsample = PatchMerging(dims) if i < self.num_stages - 1 else None
            self.layers.append(BOATSwinStage(blocks, downsample))
            if i in self.out_indices:
                self.add_module(f'norm{i}', nn.LayerNorm(dims))
            if i < self.num_stages - 1:
                dims *= 2
        self.num_features = [self.embed_dims * 2**i for i in range(self.num_stages)]
        self.apply(_init_module)
        self._freeze_stages()
        if any(self.fsla_blocks):  # which FSLA implementation runs, and why
            log_ops_impl(['feature-space attention'])

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

    @property
    def num_fsla_modules(self) -> int:
        """How many FSLA modules the backbone holds."""
        return sum(len(b) for b in self.fsla_blocks)

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
                outs.append(out.transpose(1, 2).reshape(out.shape[0], -1, *out_hw).contiguous())
            hw_shape = next_hw
        return tuple(outs)

    def _stage_modules(self, index: int) -> List[nn.Module]:
        return [self.layers[index]]  # a stage holds its downsampler

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer depth of a parameter, for layer-wise learning-rate decay.

        Args:
            param_name: parameter name, e.g. ``backbone.layers.2.blocks.3.attnC.qkv.weight``.
            prefix: prefix of the backbone's parameters, e.g. ``'backbone.'``.

        Returns:
            tuple: (layer depth, number of layers): the stem is 0, block j of stage i is
            ``sum(depths[:i]) + j + 1``, a downsampler is the depth of its stage's last block, and
            everything else (output norms, head, other modules) is the last layer.
        """
        return layer_depth(param_name, prefix, self.depths, 'patch_embed', 'layers')


def _linear_drop_path(drop_path_rate: float, num_blocks: int) -> List[float]:
    """Stochastic depth rates rising linearly from 0 to ``drop_path_rate`` over the blocks."""
    if num_blocks == 1:
        return [0.]
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


def _check_out_indices(out_indices: Sequence[int], num_stages: int) -> Tuple[int, ...]:
    if isinstance(out_indices, int):
        out_indices = [out_indices]
    indices = []
    for index in out_indices:
        if not -num_stages <= index < num_stages:
            raise ValueError(f'out_indices {tuple(out_indices)} out of range for {num_stages} '
                             'stages')
        indices.append(index % num_stages)
    return tuple(indices)


def _check_fsla_blocks(fsla_blocks: Sequence[Sequence[int]],
                       depths: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    if len(fsla_blocks) != len(depths):
        raise ValueError(f'fsla_blocks needs one list per stage ({len(depths)}), '
                         f'got {len(fsla_blocks)}')
    for i, (blocks, depth) in enumerate(zip(fsla_blocks, depths)):
        bad = [j for j in blocks if not 0 <= j < depth]
        if bad:
            raise ValueError(f'fsla_blocks[{i}] has block indices {bad} outside stage {i} '
                             f'of depth {depth}')
    return tuple(tuple(sorted(set(int(j) for j in b))) for b in fsla_blocks)


def _init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
