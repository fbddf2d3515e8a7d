"""Colour an image's tokens by their feature-space (FSLA) cluster in one BOAT block.

    python tools/visualization/fsla_clusters.py IMAGE [--config CFG] [--checkpoint CKPT]
        [--fsla-index 0] [--img-size 224] [--out fsla_clusters.png]

The image is resized to ``--img-size`` and run through the backbone (the config's, or BOAT-Swin-T
without ``--config``) with the weights of ``--checkpoint``: a checkpoint of the model, or an
official BOAT release, converted in memory (see ``vis_common.py``; a checkpoint of another family
or architecture is refused). Without a checkpoint the weights are random, and the tool says so on
the console and in the figure's title: such clusters show what an untrained model does. The
input of the chosen
``FeatureSpaceLocalAttention`` module (``--fsla-index`` counts them in module order; ``--list``
prints them) is captured, its queries are computed with the module's own ``qkv``, and
``mmboat.ops.balanced_hierarchical_clustering`` (the module's own ``cluster``) assigns every token
of every head to a leaf cluster. One panel per head: tokens coloured by cluster id over the image.
"""
import argparse
import os.path as osp
import sys
from typing import Dict, List, Optional

import cv2
import numpy as np

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from vis_common import RANDOM_WEIGHTS, load_backbone, text_header  # noqa: E402  (same folder)

DEFAULT_BACKBONE = dict(type='mmboat.BOATSwinTransformer', arch='tiny', out_indices=(0, 1, 2, 3))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Draw the FSLA clusters of a BOAT block')
    parser.add_argument('image', help='image file')
    parser.add_argument('--config', help='config with a BOAT backbone (default: BOAT-Swin-T)')
    parser.add_argument('--checkpoint', help='weights for the backbone: a checkpoint of the '
                        'model or an official BOAT release (without it: random weights)')
    parser.add_argument('--fsla-index', type=int, default=0,
                        help='which FeatureSpaceLocalAttention module, in module order')
    parser.add_argument('--list', action='store_true', help='list the FSLA modules and exit')
    parser.add_argument('--img-size', type=int, default=224, help='resize the image to this')
    parser.add_argument('--out', default='fsla_clusters.png', help='output PNG')
    return parser.parse_args(argv)


def fsla_modules(backbone) -> Dict[str, object]:
    from mmboat.models.layers.feature_space_attention import FeatureSpaceLocalAttention

    found = {name: m for name, m in backbone.named_modules()
             if isinstance(m, FeatureSpaceLocalAttention)}
    if not found:
        raise ValueError(f'{type(backbone).__name__} has no FeatureSpaceLocalAttention module; '
                         'use a BOAT backbone')
    return found


def cluster_ids(module, tokens, hw_shape):
    """Leaf-cluster id of every token, per head: ``[heads, H, W]`` int64 (batch 1).

    Args:
        module: a ``FeatureSpaceLocalAttention``.
        tokens: its input ``[1, N, C]``.
        hw_shape: ``(H, W)`` with ``H * W = N``.
    """
    import torch

    from mmboat.ops import cluster_layout

    _, n, c = tokens.shape
    h = module.num_heads
    with torch.no_grad():
        q = module.qkv(tokens).reshape(1, n, 3, h, c // h).permute(2, 0, 3, 1, 4)[0]
        perm, _ = module.cluster(q)  # [1, heads, N]
    _, sizes = cluster_layout(n, module.cluster_size)
    leaf_of_slot = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ids = torch.empty_like(perm[0])
    ids.scatter_(-1, perm[0], leaf_of_slot.expand_as(perm[0]).contiguous())
    return ids.reshape(h, *hw_shape)


def palette(num: int) -> np.ndarray:
    """``num`` well separated BGR colours (golden-ratio hues)."""
    hues = (np.arange(num) * 0.618033988749895 % 1.0 * 179).astype(np.uint8)
    hsv = np.stack([hues, np.full(num, 200, np.uint8), np.full(num, 255, np.uint8)], -1)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2BGR)[0]


def main(argv: Optional[List[str]] = None):
    args = parse_args(argv)
    import torch

    backbone, weights, advice = load_backbone(args.config, args.checkpoint, DEFAULT_BACKBONE)
    if weights is None:
        print(f'WARNING: no --checkpoint: {type(backbone).__name__} has RANDOM weights, so the '
              'clusters drawn are those of an untrained model, not of a trained BOAT; '
              f'{advice}.')
    modules = fsla_modules(backbone)
    names = list(modules)
    if args.list:
        for i, name in enumerate(names):
            print(f'{i}: {name} ({modules[name].extra_repr()})')
        return None
    if not 0 <= args.fsla_index < len(names):
        raise ValueError(f'--fsla-index {args.fsla_index} is out of range: the backbone has '
                         f'{len(names)} FSLA modules (see --list)')
    name = names[args.fsla_index]
    module = modules[name]

    image = cv2.imread(args.image)
    if image is None:
        raise FileNotFoundError(f'could not read image {args.image}')
    image = cv2.resize(image, (args.img_size, args.img_size), interpolation=cv2.INTER_AREA)
    mean = np.array([103.53, 116.28, 123.675], np.float32)
    std = np.array([57.375, 57.12, 58.395], np.float32)
    x = torch.from_numpy(((image.astype(np.float32) - mean) / std)[..., ::-1].copy())
    x = x.permute(2, 0, 1)[None]

    captured = {}

    def hook(mod, inputs):
        captured['tokens'], captured['hw'] = inputs[0].detach(), tuple(inputs[1])

    handle = module.register_forward_pre_hook(hook)
    with torch.no_grad():
        backbone(x)
    handle.remove()
    if 'tokens' not in captured:
        raise RuntimeError(f'{name} was not called in the forward pass')
    ids = cluster_ids(module, captured['tokens'], captured['hw']).numpy()
    num_clusters = int(ids.max()) + 1
    colours = palette(num_clusters)
    size = max(args.img_size, 192)
    base = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    panels = [base]
    for head in range(ids.shape[0]):
        overlay = cv2.resize(colours[ids[head]], (size, size), interpolation=cv2.INTER_NEAREST)
        panels.append(cv2.addWeighted(base, 0.35, overlay, 0.65, 0))
    gap = np.full((size, 4, 3), 255, np.uint8)
    row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], 1)
    title = (f'FSLA clusters of {name}: {captured["hw"][0]}x{captured["hw"][1]} tokens, '
             f'{num_clusters} clusters (m={module.cluster_size}); image, then one panel per head; '
             + (RANDOM_WEIGHTS + ': an untrained model\'s clusters' if weights is None else
                f'weights: {osp.basename(args.checkpoint)}'))
    picture = np.concatenate([text_header(title, row.shape[1]), row], 0)
    if not cv2.imwrite(args.out, picture):
        raise OSError(f'could not write {args.out}')
    print(f'{title}\nsaved {args.out}')
    return ids


if __name__ == '__main__':
    main()
