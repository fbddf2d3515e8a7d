"""Convert released BOAT-CSWin checkpoints to mmboat (mmpretrain / mmdet / mmseg) layout.

BOAT-CSWin's release is a timm checkpoint (``state_dict`` and ``state_dict_ema``) with CSWin's
names plus FSLA sub-layers ``stage{k}.{j}.{norm3, content_attn.{qkv, proj, get_v}}``. mmboat's
``BOATCSWinTransformer`` keeps those names, so conversion is a key mapping:

* ``stage1_conv_embed.0`` / ``.2`` (the conv and LayerNorm of CSWin's stem ``Sequential``) ->
  ``backbone.stage1_conv_embed.conv`` / ``.norm``;
* ``stage{k}.*``, ``merge{k}.*`` -> ``backbone.*``;
* the final ``norm`` -> ``backbone.norm3`` (output norm of the last stage, ``out_indices=(3, )``);
  ``head`` -> ``head.fc`` (mmpretrain's ``LinearClsHead`` after a ``GlobalAveragePooling`` neck).

The released weights were trained with FSLA logit scale 1.0: keep ``fsla_qk_scale=1.0`` (the
``BOATCSWinTransformer`` default) when using them. The output is
``{'state_dict': {name: Tensor}, 'meta': {str: str|int}}`` and loads with
``torch.load(path, weights_only=True)``.

Example::

    python tools/model_converters/boat_cswin_to_mmboat.py boat_cswin_tiny.pth.tar \
        boat-cswin-tiny_in1k_mmboat.pth --ema
"""
import argparse
import os
import re
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import Tensor

STEM_RENAMES = {'stage1_conv_embed.0.': 'stage1_conv_embed.conv.',
                'stage1_conv_embed.2.': 'stage1_conv_embed.norm.'}
STAGE_PATTERN = re.compile(r'(stage\d+|merge\d+)\.')


def load_official(path: str, trust_checkpoint: bool = False) -> dict:
    """Load a released checkpoint (weights only unless ``trust_checkpoint``)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust_checkpoint)
    except Exception as exc:  # UnpicklingError names the offending global (timm saves args)
        if trust_checkpoint:
            raise
        raise RuntimeError(
            f'{path} holds pickled objects besides tensors ({type(exc).__name__}: {exc}). '
            'If you trust its source, rerun with --trust-checkpoint to unpickle it fully.'
        ) from exc


def extract_state_dict(checkpoint: dict, use_ema: bool = False) -> Dict[str, Tensor]:
    """``state_dict`` (or ``state_dict_ema`` with ``use_ema``), without ``module.`` prefixes."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f'expected a dict checkpoint, got {type(checkpoint).__name__}')
    if use_ema:
        if not isinstance(checkpoint.get('state_dict_ema'), dict):
            raise KeyError('--ema: the checkpoint has no "state_dict_ema"; keys are '
                           f'{sorted(checkpoint)}')
        state_dict = checkpoint['state_dict_ema']
    else:
        state_dict = checkpoint
        for key in ('state_dict', 'model'):
            if isinstance(checkpoint.get(key), dict):
                state_dict = checkpoint[key]
                break
    result = OrderedDict()
    for name, value in state_dict.items():
        if isinstance(value, Tensor):
            result[name[len('module.'):] if name.startswith('module.') else name] = value
    if not any(name.startswith('stage1_conv_embed.') for name in result):
        raise ValueError('not a BOAT-CSWin checkpoint: no "stage1_conv_embed.*" keys '
                         f'(first keys: {list(result)[:5]})')
    return result


def describe_arch(state_dict: Dict[str, Tensor]) -> str:
    """``embed_dims``, ``depths`` and the FSLA blocks of each stage."""
    blocks: Dict[int, set] = {}
    fsla: Dict[int, set] = {}
    pattern = re.compile(r'stage(\d+)\.(\d+)\.(\w+)')
    for name in state_dict:
        match = pattern.match(name)
        if match:
            k, j = int(match.group(1)), int(match.group(2))
            blocks.setdefault(k, set()).add(j)
            if match.group(3) == 'content_attn':
                fsla.setdefault(k, set()).add(j)
    stages = sorted(blocks)
    embed_dims = state_dict['stage1_conv_embed.0.weight'].shape[0]
    return (f'embed_dims={embed_dims}, depths={[max(blocks[k]) + 1 for k in stages]}, '
            f'fsla_blocks={[sorted(fsla.get(k, ())) for k in stages]}')


def convert_state_dict(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Official BOAT-CSWin names -> mmpretrain ``ImageClassifier`` with ``BOATCSWinTransformer``."""
    converted = OrderedDict()
    for name, value in state_dict.items():
        for old, new in STEM_RENAMES.items():
            if name.startswith(old):
                new_name = 'backbone.' + new + name[len(old):]
                break
        else:
            if STAGE_PATTERN.match(name):
                new_name = 'backbone.' + name
            elif name.startswith('norm.'):
                new_name = 'backbone.norm3.' + name[len('norm.'):]
            elif name.startswith('head.'):
                new_name = 'head.fc.' + name[len('head.'):]
            else:
                raise KeyError(f'unexpected key {name!r} in a BOAT-CSWin checkpoint')
        converted[new_name] = value.detach().clone().contiguous()
    return converted


def convert(checkpoint: dict, use_ema: bool = False) -> dict:
    """Convert a loaded released checkpoint; returns ``{'state_dict', 'meta'}``."""
    state_dict = extract_state_dict(checkpoint, use_ema)
    converted = convert_state_dict(state_dict)
    meta = {'converter': 'tools/model_converters/boat_cswin_to_mmboat.py',
            'weights': 'state_dict_ema' if use_ema else 'state_dict',
            'arch': describe_arch(state_dict), 'num_tensors': len(converted)}
    return {'state_dict': converted, 'meta': meta}


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert a released BOAT-CSWin checkpoint to mmboat layout')
    parser.add_argument('src', help='released checkpoint')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--ema', action='store_true',
                        help='convert "state_dict_ema" instead of "state_dict"')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='unpickle non-tensor objects in the source (trusted files only)')
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv)
    result = convert(load_official(args.src, args.trust_checkpoint), args.ema)
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    torch.save(result, args.dst)
    print(f'{args.src} -> {args.dst}: {result["meta"]["num_tensors"]} tensors '
          f'({result["meta"]["weights"]}), {result["meta"]["arch"]}')


if __name__ == '__main__':
    main()
