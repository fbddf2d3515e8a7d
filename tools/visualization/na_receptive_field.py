"""Draw the neighborhood-attention window of one pixel over an image.

    python tools/visualization/na_receptive_field.py IMAGE --pixel Y X [--stage 0] [--block 0]
        [--config CFG [--checkpoint CKPT]] [--kernel-size 7] [--dilation 1] [--out na_rf.png]

The window is found through mmboat's own op, not re-derived: ``na2d_av`` is run with all-one
attention weights on the stage's token grid and the gradient of the chosen query's output with
respect to the values is non-zero exactly on that query's keys (border shifting, dilation groups
and the padding of maps smaller than ``kernel_size * dilation`` included, as in the backbone).
Kernel size and dilation come from the config's NAT/DiNAT backbone (``--stage``/``--block``)
or from ``--kernel-size``/``--dilation``. Tokens of stage ``i`` cover ``4 * 2**i`` pixels.

The window does not depend on the weights. ``--checkpoint`` is still checked against the config's
backbone (see ``vis_common.py``: official NAT/DiNAT releases are read in memory, a checkpoint of
another family or architecture is refused), and without one the tool says that the backbone has
random weights, on the console and in the figure's title.
"""
import argparse
import math
import os.path as osp
import sys
from typing import List, Optional, Tuple

import cv2
import numpy as np

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from vis_common import RANDOM_WEIGHTS, load_backbone, text_header  # noqa: E402  (same folder)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Draw the NA window of a pixel')
    parser.add_argument('image', help='image file')
    parser.add_argument('--pixel', type=int, nargs=2, required=True, metavar=('Y', 'X'),
                        help='query pixel (row, column) in image coordinates')
    parser.add_argument('--config', help='config with a NAT/DiNAT backbone (optional)')
    parser.add_argument('--checkpoint', help='weights for --config\'s backbone (checked; the '
                        'window does not depend on them)')
    parser.add_argument('--stage', type=int, default=0, help='backbone stage (0-3)')
    parser.add_argument('--block', type=int, default=0, help='block inside the stage')
    parser.add_argument('--kernel-size', type=int, default=7, help='without --config')
    parser.add_argument('--dilation', type=int, default=1, help='without --config')
    parser.add_argument('--out', default='na_receptive_field.png', help='output PNG')
    return parser.parse_args(argv)


def stage_grid(height: int, width: int, stage: int) -> Tuple[int, int, int]:
    """Token grid ``(H, W)`` of a NAT stage and its nominal stride (3x3 stride-2 convs: ceil)."""
    if stage < 0:
        raise ValueError(f'stage must be >= 0, got {stage}')
    h, w = height, width
    for _ in range(2 + stage):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w, 4 * 2**stage


def na_window_mask(grid: Tuple[int, int], query: Tuple[int, int], kernel_size: int,
                   dilation: int = 1) -> np.ndarray:
    """Keys of ``query`` on a ``grid`` token map, as the backbone's NA layer sees them.

    Maps smaller than ``kernel_size * dilation`` are zero-padded at the bottom/right first (the
    layer's rule); keys that fall on padding are dropped from the returned mask.

    Returns:
        np.ndarray: ``[H, W]`` bool.
    """
    import torch

    from mmboat.ops import na2d_av

    height, width = grid
    qy, qx = query
    if not (0 <= qy < height and 0 <= qx < width):
        raise ValueError(f'query {query} is outside the {height}x{width} token grid')
    if kernel_size < 1 or dilation < 1:
        raise ValueError(f'kernel_size and dilation must be >= 1, got {kernel_size}, {dilation}')
    window = kernel_size * dilation
    ph, pw = max(height, window), max(width, window)
    attn = torch.ones(1, 1, ph, pw, kernel_size * kernel_size, dtype=torch.float64)
    value = torch.zeros(1, 1, ph, pw, 1, dtype=torch.float64, requires_grad=True)
    out = na2d_av(attn, value, kernel_size=kernel_size, dilation=dilation)
    out[0, 0, qy, qx].sum().backward()
    mask = (value.grad[0, 0, :, :, 0] != 0).numpy()
    return mask[:height, :width]


def backbone_window(backbone, stage: int, block: int) -> Tuple[int, int]:
    """Kernel size and dilation of one block of a NAT/DiNAT backbone."""
    levels = getattr(backbone, 'levels', None)
    if levels is None:
        raise ValueError(f'{type(backbone).__name__} has no NA stages (`levels`); use a NAT or '
                         'DiNAT backbone, or --kernel-size/--dilation without --config')
    if not 0 <= stage < len(levels) or not 0 <= block < len(levels[stage].blocks):
        raise ValueError(f'no block {block} in stage {stage} of {type(backbone).__name__}')
    attn = levels[stage].blocks[block].attn
    return int(attn.kernel_size), int(attn.dilation)


def draw(image: np.ndarray, mask: np.ndarray, query: Tuple[int, int], stride: int,
         title: str) -> np.ndarray:
    """Tint the key tokens' pixels, outline the query token, add a title line."""
    h, w = image.shape[:2]
    pixel_mask = np.kron(mask.astype(np.uint8), np.ones((stride, stride), np.uint8))[:h, :w]
    canvas = image.astype(np.float32)
    tint = np.array([40, 200, 255], np.float32)  # BGR: amber
    sel = pixel_mask.astype(bool)
    canvas[sel] = 0.45 * canvas[sel] + 0.55 * tint
    canvas[~sel] *= 0.55
    canvas = canvas.clip(0, 255).astype(np.uint8)
    scale = max(1, 512 // max(h, w))
    canvas = cv2.resize(canvas, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    qy, qx = query
    cv2.rectangle(canvas, (qx * stride * scale, qy * stride * scale),
                  ((qx + 1) * stride * scale - 1, (qy + 1) * stride * scale - 1), (0, 0, 255),
                  max(1, scale // 2))
    return np.concatenate([text_header(title, canvas.shape[1]), canvas], 0)


def main(argv: Optional[List[str]] = None) -> np.ndarray:
    args = parse_args(argv)
    image = cv2.imread(args.image)
    if image is None:
        raise FileNotFoundError(f'could not read image {args.image}')
    if args.checkpoint and not args.config:
        raise ValueError('--checkpoint needs --config (the model it belongs to)')
    if args.config:
        backbone, weights, _ = load_backbone(args.config, args.checkpoint)
        kernel_size, dilation = backbone_window(backbone, args.stage, args.block)
        if weights is None:
            print(f'WARNING: no --checkpoint: {type(backbone).__name__} has RANDOM weights. The '
                  'window drawn does not depend on them (only on the block\'s kernel size and '
                  'dilation), so it is the trained model\'s window too.')
        source = (RANDOM_WEIGHTS + '; the window does not depend on the weights' if weights is None
                  else f'weights: {osp.basename(args.checkpoint)}')
    else:
        kernel_size, dilation = args.kernel_size, args.dilation
        source = 'no model: k and d from the command line'
    gh, gw, stride = stage_grid(image.shape[0], image.shape[1], args.stage)
    py, px = args.pixel
    if not (0 <= py < image.shape[0] and 0 <= px < image.shape[1]):
        raise ValueError(f'--pixel {py} {px} is outside the {image.shape[0]}x{image.shape[1]} '
                         'image')
    query = (py // stride, px // stride)
    mask = na_window_mask((gh, gw), query, kernel_size, dilation)
    title = (f'NA window: stage {args.stage} ({gh}x{gw} tokens, stride {stride}), '
             f'k={kernel_size}, d={dilation}; query token {query} (red): {int(mask.sum())} keys; '
             f'{source}')
    picture = draw(image, mask, query, stride, title)
    if not cv2.imwrite(args.out, picture):
        raise OSError(f'could not write {args.out}')
    print(f'{title}\nsaved {args.out}')
    return mask


if __name__ == '__main__':
    main()
