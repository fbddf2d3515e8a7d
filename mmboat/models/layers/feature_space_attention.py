"""Feature-space local attention (FSLA), the module BOAT adds next to image-space attention.

BOAT: Bilateral Local Attention Vision Transformer (Yu et al., BMVC 2022,
https://arxiv.org/abs/2201.13027). Tokens are grouped by balanced hierarchical clustering of their
queries (per sample and head, no gradient) and attend inside their cluster plus an overlap with the
sibling cluster; a depthwise 3x3 conv on the values (``get_v``) adds local image context. Parameter
names (``qkv``, ``proj``, ``get_v``) are the released ones. See docs/feature_space_attention.md.
"""
import inspect
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from mmboat.ops.feature_space_attention import balanced_hierarchical_clustering, clustered_attention
from mmboat.ops.feature_space_attention_reference import CLUSTER_SIZE, ITERS, OVERLAP, TAU

__all__ = ['FeatureSpaceLocalAttention', 'resolve_fsla_cfg', 'fsla_sublayer', 'FSLA_CFG_KEYS']


def _autocast_off(device_type: str) -> ContextManager:
    """``torch.autocast(device_type, enabled=False)``; nothing for device types autocast does not
    know (``meta``: a model built on the meta device propagates shapes through this layer)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class FeatureSpaceLocalAttention(nn.Module):
    """Feature-space local attention over a token map of any size.

    Args:
        embed_dims (int): channels C.
        num_heads (int): heads h (C divisible by h).
        cluster_size (int): tokens per leaf cluster m. Defaults to 49.
        overlap (int): keys/values each leaf borrows from its sibling o. Defaults to 20.
        iters (int): centroid refinement iterations per level. Defaults to 2.
        tau (float): inverse temperature of the soft assignment. Defaults to 100.
        qkv_bias (bool): bias in the qkv projection. Defaults to True.
        qk_scale (float, optional): logit scale; None means ``(C/h) ** -0.5``. The released
            BOAT-CSWin weights were trained with 1.0. Defaults to None.
        attn_drop (float): dropout on attention weights; the clustered attention kernels have
            none, so only 0 is accepted (as in every released model). Defaults to 0.
        proj_drop (float): dropout after the output projection. Defaults to 0.
        impl (str, optional): op implementation (``'auto'``, ``'ext'``, ``'reference'``; None reads
            ``MMBOAT_OPS_IMPL``). Defaults to None.

    Examples:
        >>> attn = FeatureSpaceLocalAttention(32, 2, cluster_size=8, overlap=2)
        >>> attn(torch.rand(2, 5 * 7, 32), (5, 7)).shape
        torch.Size([2, 35, 32])
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 cluster_size: int = CLUSTER_SIZE,
                 overlap: int = OVERLAP,
                 iters: int = ITERS,
                 tau: float = TAU,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 impl: Optional[str] = None) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads '
                             f'({num_heads})')
        if cluster_size < 1:
            raise ValueError(f'cluster_size must be >= 1, got {cluster_size}')
        if overlap < 0:
            raise ValueError(f'overlap must be >= 0, got {overlap}')
        if iters < 0:
            raise ValueError(f'iters must be >= 0, got {iters}')
        if attn_drop != 0:
            raise ValueError('FeatureSpaceLocalAttention supports only attn_drop=0 (the clustered '
                             f'attention kernels have no attention dropout), got {attn_drop}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.cluster_size = cluster_size
        self.overlap = overlap
        self.iters = iters
        self.tau = float(tau)
        self.scale = float(qk_scale) if qk_scale is not None else (embed_dims // num_heads)**-0.5
        self.impl = impl
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        self.get_v = nn.Conv2d(embed_dims, embed_dims, 3, 1, 1, groups=embed_dims)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'cluster_size={self.cluster_size}, overlap={self.overlap}, iters={self.iters}, '
                f'tau={self.tau}, scale={self.scale:.4g}')

    def cluster(self, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Permutation of the tokens into leaf clusters (float32, no grad, autocast off).

        Args:
            query (torch.Tensor): ``[B, h, N, d]``.

        Returns:
            tuple: ``perm`` and ``inv_perm``, ``[B, h, N]`` int64.
        """
        with torch.no_grad(), _autocast_off(query.device.type):
            return balanced_hierarchical_clustering(
                query.detach().float(), cluster_size=self.cluster_size, iters=self.iters,
                tau=self.tau, impl=self.impl)

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Args:
            x (torch.Tensor): ``[B, H*W, C]`` tokens in raster order.
            hw_shape (tuple[int, int]): (H, W).

        Returns:
            torch.Tensor: ``[B, H*W, C]``.
        """
        if x.dim() != 3:
            raise ValueError(f'x must be [B, N, C], got shape {tuple(x.shape)}')
        B, N, C = x.shape
        H, W = hw_shape
        if N != H * W:
            raise ValueError(f'x has {N} tokens but hw_shape is {H}x{W}')
        if C != self.embed_dims:
            raise ValueError(f'expected {self.embed_dims} channels, got {C}')
        h, d = self.num_heads, C // self.num_heads
        qkv = self.qkv(x)
        # One copy to the [3, B, h, N, d] layout the kernels read.
        q, k, v = qkv.view(B, N, 3, h, d).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        perm, _ = self.cluster(q)
        # Attention in (at least) float32: the compiled kernels take float32/float64, and logits
        # with the released scale 1.0 overflow float16.
        attn_dtype = torch.promote_types(q.dtype, torch.float32)
        with _autocast_off(x.device.type):
            out = clustered_attention(q.to(attn_dtype), k.to(attn_dtype), v.to(attn_dtype), perm,
                                      cluster_size=self.cluster_size, overlap=self.overlap,
                                      scale=self.scale, impl=self.impl)
        out = out.to(v.dtype).transpose(1, 2).reshape(B, N, C)
        # get_v on v as a [B, C, H, W] map; tokens [B, N, C] are that map in channels-last
        # layout, which is also the fast layout for the depthwise conv.
        v_map = qkv[..., 2 * C:].reshape(B, H, W, C).permute(0, 3, 1, 2)
        lepe = self.get_v(v_map.contiguous(memory_format=torch.channels_last))
        out = out + lepe.permute(0, 2, 3, 1).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


# The FSLA settings a backbone's ``fsla_cfg`` takes: the layer's own (defaults in its signature,
# which reads the released values from mmboat/ops/feature_space_attention_reference.py) and
# ``drop_path``, whether the block's DropPath also covers the FSLA residual (the blocks'
# business; off unless a backbone's compatibility defaults say so).
FSLA_CFG_KEYS = ('cluster_size', 'overlap', 'iters', 'tau', 'qk_scale', 'drop_path')


def resolve_fsla_cfg(fsla_cfg: Optional[Mapping[str, Any]],
                     defaults: Mapping[str, Any], owner: str) -> Dict[str, Any]:
    """A backbone's complete FSLA settings: the layer's defaults, overridden by the backbone's
    compatibility ``defaults`` (what its released weights were trained with), overridden by the
    user's ``fsla_cfg``.

    Args:
        fsla_cfg (Mapping, optional): The user's settings (keys of :data:`FSLA_CFG_KEYS`).
        defaults (Mapping): The backbone's compatibility defaults.
        owner (str): The backbone's name, for messages.

    Returns:
        dict: Every key of :data:`FSLA_CFG_KEYS`.

    Raises:
        ValueError: An unknown key.
    """
    signature = inspect.signature(FeatureSpaceLocalAttention.__init__).parameters
    resolved: Dict[str, Any] = {k: signature[k].default for k in FSLA_CFG_KEYS if k in signature}
    resolved['drop_path'] = False
    for source, name in ((defaults, f'{owner}.default_fsla_cfg'), (fsla_cfg or {}, 'fsla_cfg')):
        unknown = sorted(set(source) - set(FSLA_CFG_KEYS))
        if unknown:
            raise ValueError(f'{owner}: {name} has unknown keys {unknown}; the FSLA settings are '
                             f'{list(FSLA_CFG_KEYS)}')
        resolved.update(source)
    return resolved


def fsla_sublayer(embed_dims: int, num_heads: int, fsla_cfg: Mapping[str, Any], qkv_bias: bool,
                  drop_rate: float, drop_path_rate: float,
                  impl: Optional[str]) -> Tuple[nn.LayerNorm, FeatureSpaceLocalAttention,
                                                nn.Module]:
    """The modules of a BOAT block's FSLA sub-layer, ``x + drop_path(fsla(norm(x)))``.

    Each block stores them under the names of its released checkpoints (BOAT-Swin ``norm4`` /
    ``attnC``, BOAT-CSWin ``norm3`` / ``content_attn``).

    Args:
        embed_dims (int): Channels C.
        num_heads (int): Heads h.
        fsla_cfg (Mapping): The block's settings, from :func:`resolve_fsla_cfg`; ``drop_path``
            says whether the block's DropPath also covers the FSLA residual.
        qkv_bias (bool): Bias in the FSLA qkv projection.
        drop_rate (float): Dropout after the FSLA output projection.
        drop_path_rate (float): The block's stochastic depth rate.
        impl (str, optional): FSLA op implementation (see :class:`FeatureSpaceLocalAttention`).

    Returns:
        tuple[nn.LayerNorm, FeatureSpaceLocalAttention, nn.Module]: The pre-norm, the attention
        and the residual's DropPath (``nn.Identity`` when ``drop_path`` is False).
    """
    from mmboat.models.utils.drop_path import DropPath

    layer_cfg = dict(fsla_cfg)
    with_drop_path = layer_cfg.pop('drop_path', False)
    attn = FeatureSpaceLocalAttention(embed_dims, num_heads, qkv_bias=qkv_bias,
                                      proj_drop=drop_rate, impl=impl, **layer_cfg)
    drop_path = DropPath(drop_path_rate) if with_drop_path else nn.Identity()
    return nn.LayerNorm(embed_dims), attn, drop_path
