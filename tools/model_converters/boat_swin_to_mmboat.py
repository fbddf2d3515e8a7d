"""Convert released BOAT-Swin checkpoints to mmboat (mmpretrain / mmdet / mmseg) layout.

BOAT-Swin's release is an official-Swin checkpoint (weights under ``model``) with FSLA sub-layers
``layers.{i}.blocks.{j}.{norm4, attnC.{qkv, proj, get_v}}``. mmboat's ``BOATSwinTransformer`` keeps
those names, so conversion is a key mapping:

* ``patch_embed.*``, ``layers.*`` -> ``backbone.*``;
* the final ``norm`` -> ``backbone.norm3`` (the output norm of the last stage,
  ``out_indices=(3, )``); ``head`` -> ``head.fc`` (mmpretrain's ``LinearClsHead`` after a
  ``GlobalAveragePooling`` neck);
* the derived buffers ``relative_position_index`` and ``attn_mask`` are dropped (mmboat computes
  them for every input size).

The output is ``{'state_dict': {name: Tensor}, 'meta': {str: str|int}}``; it loads with
``torch.load(path, weights_only=True)``, with ``load_from`` in mmpretrain configs and with
``init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.')`` in mmdet/mmseg ones.

Example::

    python tools/model_converters/boat_swin_to_mmboat.py boat_swin_tiny.pth \
        boat-swin-tiny_in1k_mmboat.pth
"""
import argparse
import os
import re
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import Tensor

BACKBONE_PREFIXES = ('patch_embed.', 'layers.')
DERIVED_BUFFERS = ('relative_position_index', 'attn_mask')


def load_official(path: str, trust_checkpoint: bool = False) -> dict:
    """Load a released checkpoint (weights only unless ``trust_checkpoint``)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust_checkpoint)
    except Exception as exc:  # UnpicklingError names the offending global
        if trust_checkpoint:
            raise
        raise RuntimeError(
            f'{path} holds pickled objects besides tensors ({type(exc).__name__}: {exc}). '
            'If you trust its source, rerun with --trust-checkpoint to unpickle it fully.'
        ) from exc


def extract_state_dict(checkpoint: dict) -> Dict[str, Tensor]:
    """The weights under ``model`` (or ``state_dict``, or the dict itself), without ``module.``."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f'expected a dict checkpoint, got {type(checkpoint).__name__}')
    state_dict = checkpoint
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            state_dict = checkpoint[key]
            break
    result = OrderedDict()
    for name, value in state_dict.items():
        if isinstance(value, Tensor):
            result[name[len('module.'):] if name.startswith('module.') else name] = value
    if not any(name.startswith('layers.') for name in result):
        raise ValueError('not a BOAT-Swin checkpoint: no "layers.*" keys '
                         f'(first keys: {list(result)[:5]})')
    return result


def describe_arch(state_dict: Dict[str, Tensor]) -> str:
    """``embed_dims, depths, num_heads, window_size`` and the FSLA blocks of each stage."""
    blocks: Dict[int, set] = {}
    fsla: Dict[int, set] = {}
    pattern = re.compile(r'layers\.(\d+)\.blocks\.(\d+)\.(\w+)')
    for name in state_dict:
        match = pattern.match(name)
        if match:
            i, j = int(match.group(1)), int(match.group(2))
            blocks.setdefault(i, set()).add(j)
            if match.group(3) == 'attnC':
                fsla.setdefault(i, set()).add(j)
    stages = sorted(blocks)
    depths = [max(blocks[i]) + 1 for i in stages]
    heads = [state_dict[f'layers.{i}.blocks.0.attn.relative_position_bias_table'].shape[1]
             for i in stages]
    table = state_dict['layers.0.blocks.0.attn.relative_position_bias_table'].shape[0]
    window = (round(table**0.5) + 1) // 2
    embed_dims = state_dict['patch_embed.proj.weight'].shape[0]
    fsla_blocks = [sorted(fsla.get(i, ())) for i in stages]
    return (f'embed_dims={embed_dims}, depths={depths}, num_heads={heads}, '
            f'window_size={window}, fsla_blocks={fsla_blocks}')


def convert_state_dict(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Official BOAT-Swin names -> mmpretrain ``ImageClassifier`` with ``BOATSwinTransformer``."""
    converted = OrderedDict()
    for name, value in state_dict.items():
        if name.rsplit('.', 1)[-1] in DERIVED_BUFFERS:
            continue
        if name.startswith(BACKBONE_PREFIXES):
            new_name = 'backbone.' + name
        elif name.startswith('norm.'):
            new_name = 'backbone.norm3.' + name[len('norm.'):]
        elif name.startswith('head.'):
            new_name = 'head.fc.' + name[len('head.'):]
        else:
            raise KeyError(f'unexpected key {name!r} in a BOAT-Swin checkpoint')
        converted[new_name] = value.detach().clone().contiguous()
    return converted


def convert(checkpoint: dict) -> dict:
    """Convert a loaded released checkpoint; returns ``{'state_dict', 'meta'}``."""
    state_dict = extract_state_dict(checkpoint)
    converted = convert_state_dict(state_dict)
    meta = {'converter': 'tools/model_converters/boat_swin_to_mmboat.py',
            'arch': describe_arch(state_dict), 'num_tensors': len(converted)}
    return {'state_dict': converted, 'meta': meta}


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert a released BOAT-Swin checkpoint to mmboat layout')
    parser.add_argument('src', help='released checkpoint')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='unpickle non-tensor objects in the source (trusted files only)')
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv)
    result = convert(load_official(args.src, args.trust_checkpoint))
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    torch.save(result, args.dst)
    print(f'{args.src} -> {args.dst}: {result["meta"]["num_tensors"]} tensors, '
          f'{result["meta"]["arch"]}')


if __name__ == '__main__':
    main()
