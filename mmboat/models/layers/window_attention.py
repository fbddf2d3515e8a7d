"""Swin window attention (W-MSA / SW-MSA) with relative position bias, for any map size.

Parameter names follow the official Swin Transformer (``qkv``, ``proj``,
``relative_position_bias_table``), so Swin and BOAT-Swin checkpoints load unchanged. The derived
tables (relative position index, shift masks) are computed on the fly and never enter checkpoints.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model.weight_init import trunc_normal_

__all__ = [
    'window_partition', 'window_reverse', 'relative_position_index', 'shifted_window_mask',
    'WindowMultiheadAttention', 'ShiftedWindowAttention'
]

# Added to the logits of keys a query must not see (Swin's value; finite so fp16 stays safe and a
# window made only of padding still gives a defined, discarded output).
MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window_size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """Split a map into non-overlapping windows (CSWin's stripes are ``(h, w)`` windows).

    Args:
        x (torch.Tensor): ``[B, H, W, C]`` with H and W multiples of the window sides.
        window_size (int | tuple[int, int]): window side w, or its (height, width).

    Returns:
        torch.Tensor: ``[B * H/wh * W/ww, wh * ww, C]``, windows in raster order per sample.
    """
    # A side may be a traced 0-d tensor (jit.trace of the FLOP counter): only a pair is a pair.
    wh, ww = window_size if isinstance(window_size, (tuple, list)) else (window_size, window_size)
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B * (H // wh) * (W // ww), wh * ww, C)


def window_reverse(windows: torch.Tensor, window_size: Union[int, Tuple[int, int]], height: int,
                   width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows (torch.Tensor): ``[B * H/wh * W/ww, wh * ww, C]``.
        window_size (int | tuple[int, int]): window side w, or its (height, width).
        height (int): H (multiple of the window height).
        width (int): W (multiple of the window width).

    Returns:
        torch.Tensor: ``[B, H, W, C]``.
    """
    # A side may be a traced 0-d tensor (jit.trace of the FLOP counter): only a pair is a pair.
    wh, ww = window_size if isinstance(window_size, (tuple, list)) else (window_size, window_size)
    C = windows.shape[-1]
    B = windows.shape[0] // ((height // wh) * (width // ww))
    x = windows.view(B, height // wh, width // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, height, width, C)


def relative_position_index(window_size: int, table_window_size: int,
                            device: Optional[torch.device] = None) -> torch.Tensor:
    """Index of each (query, key) pair of a window into Swin's relative position bias table.

    Args:
        window_size (int): side w of the window actually used (w <= table_window_size; smaller when
            the map is smaller than the configured window).
        table_window_size (int): side W the ``(2W-1)^2`` table was built for.
        device (torch.device | str, optional): where to build the index.

    Returns:
        torch.Tensor: ``[w*w, w*w]`` int64, ``(dy + W - 1) * (2W - 1) + (dx + W - 1)``.
    """
    coords = torch.arange(window_size, device=device)
    ys, xs = torch.meshgrid(coords, coords, indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + table_window_size - 1
    dx = xs[:, None] - xs[None, :] + table_window_size - 1
    return dy * (2 * table_window_size - 1) + dx


def shifted_window_mask(height: int, width: int, padded_height: int, padded_width: int,
                        window_size: int, shift_size: int,
                        device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """Attention mask of (shifted) windows on a padded map, or None when nothing is masked.

    As in Swin, the nine shift regions are labelled on the *shifted* map (slices ``[0, -w)``,
    ``[-w, -s)``, ``[-s, Hp)`` per axis), so tokens wrapped around from the other side of the map
    are not seen. Padding (bottom/right of the unshifted map, moved by the shift) gets a label of
    its own, so real tokens never attend to padding.

    Args:
        height (int): real map height H.
        width (int): real map width W.
        padded_height (int): H padded to a multiple of the window.
        padded_width (int): W padded to a multiple of the window.
        window_size (int): window side w.
        shift_size (int): cyclic shift s (0 for regular windows).
        device (torch.device | str, optional): where to build the mask.

    Returns:
        torch.Tensor or None: ``[num_windows, w*w, w*w]`` with 0 (visible) and ``MASK_VALUE``.
    """
    if shift_size == 0 and padded_height == height and padded_width == width:
        return None
    labels = torch.zeros(padded_height, padded_width, dtype=torch.long, device=device)
    if shift_size > 0:
        bounds = (slice(0, -window_size), slice(-window_size, -shift_size),
                  slice(-shift_size, None))
        region = 0
        for hs in bounds:
            for ws in bounds:
                labels[hs, ws] = region
                region += 1
    padding = torch.ones(padded_height, padded_width, dtype=torch.bool, device=device)
    padding[:height, :width] = False
    if shift_size > 0:
        padding = torch.roll(padding, shifts=(-shift_size, -shift_size), dims=(0, 1))
    labels[padding] = 9
    windows = window_partition(labels[None, :, :, None], window_size).squeeze(-1)
    mask = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(mask.shape, device=device).masked_fill_(mask, MASK_VALUE)


class WindowMultiheadAttention(nn.Module):
    """Multi-head self-attention inside windows, with Swin's relative position bias.

    Args:
        embed_dims (int): channels C.
        num_heads (int): heads h (C divisible by h).
        window_size (int): window side W of the relative position bias table.
        qkv_bias (bool): bias in the qkv projection. Defaults to True.
        qk_scale (float, optional): logit scale; None means ``(C/h) ** -0.5``. Defaults to None.
        attn_drop (float): dropout on attention weights. Defaults to 0.
        proj_drop (float): dropout after the output projection. Defaults to 0.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads '
                             f'({num_heads})')
        if window_size < 1:
            raise ValueError(f'window_size must be >= 1, got {window_size}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = qk_scale if qk_scale is not None else (embed_dims // num_heads)**-0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1)**2, num_heads))
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)
        # Derived table: a non-persistent buffer, never in checkpoints.
        self.register_buffer('relative_position_index',
                             relative_position_index(window_size, window_size), persistent=False)

    def relative_position_bias(self, window_size: int) -> torch.Tensor:
        """Bias ``[h, w*w, w*w]`` for windows of side ``window_size`` (<= the table's window)."""
        if window_size == self.window_size:
            index = self.relative_position_index
        else:
            index = relative_position_index(window_size, self.window_size,
                                            self.relative_position_bias_table.device)
        n = window_size * window_size
        bias = self.relative_position_bias_table[index.flatten()].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def window_forward(self, windows: torch.Tensor, window_size: int,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention inside windows.

        Args:
            windows (torch.Tensor): ``[B * nW, w*w, C]``, ``nW`` windows per sample.
            window_size (int): side w of these windows.
            mask (torch.Tensor, optional): ``[nW, w*w, w*w]`` additive mask shared by all
                samples, or None.

        Returns:
            torch.Tensor: ``[B * nW, w*w, C]``.
        """
        Bw, n, C = windows.shape
        h = self.num_heads
        qkv = self.qkv(windows).reshape(Bw, n, 3, h, C // h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # [B * nW, h, n, d] each
        bias = self.relative_position_bias(window_size).to(q.dtype)  # [h, n, n]
        if mask is None:
            bias = bias.unsqueeze(0)
        else:
            # Windows of a sample as extra heads, so the [nW, h, n, n] bias broadcasts over the
            # batch instead of being copied per sample.
            num_windows = mask.shape[0]
            bias = (bias[None] + mask[:, None].to(q.dtype)).reshape(1, num_windows * h, n, n)
            q, k, v = (t.view(Bw // num_windows, num_windows * h, n, C // h) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.,
            scale=self.scale)
        out = out.reshape(Bw, h, n, C // h)
        out = out.transpose(1, 2).reshape(Bw, n, C)
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention inside windows of side ``self.window_size``; see :meth:`window_forward`."""
        return self.window_forward(x, self.window_size, mask)


class ShiftedWindowAttention(WindowMultiheadAttention):
    """Swin's (shifted) window attention on a token map of any size.

    The map is padded on the bottom/right to a multiple of the window (padding is masked out), and
    for ``shift=True`` cyclically shifted by half a window. As in Swin, a map no larger than the
    window on its shorter side uses one window row/column of that side and no shift.

    Args: as :class:`WindowMultiheadAttention`.

    Examples:
        >>> attn = ShiftedWindowAttention(32, 2, window_size=7)
        >>> attn(torch.rand(2, 9 * 11, 32), (9, 11), shift=True).shape
        torch.Size([2, 99, 32])
    """

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int],  # type: ignore[override]
                shift: bool = False) -> torch.Tensor:
        """Args:
            x (torch.Tensor): ``[B, H*W, C]`` tokens in raster order.
            hw_shape (tuple[int, int]): (H, W).
            shift (bool): shifted windows (SW-MSA) instead of regular ones (W-MSA).

        Returns:
            torch.Tensor: ``[B, H*W, C]``.
        """
        B, N, C = x.shape
        H, W = hw_shape
        if N != H * W:
            raise ValueError(f'x has {N} tokens but hw_shape is {H}x{W}')
        window_size = self.window_size
        shift_size = window_size // 2 if shift else 0
        if min(H, W) <= window_size:
            window_size, shift_size = min(H, W), 0
        Hp = -(-H // window_size) * window_size
        Wp = -(-W // window_size) * window_size
        x = x.view(B, H, W, C)
        if Hp != H or Wp != W:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if shift_size > 0:
            x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))
        mask = shifted_window_mask(H, W, Hp, Wp, window_size, shift_size, x.device)
        windows = self.window_forward(window_partition(x, window_size), window_size, mask)
        x = window_reverse(windows, window_size, Hp, Wp)
        if shift_size > 0:
            x = torch.roll(x, shifts=(shift_size, shift_size), dims=(1, 2))
        return x[:, :H, :W].reshape(B, N, C)
