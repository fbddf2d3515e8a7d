"""Convert released BOAT-CSWin checkpoints to mmboat (mmpretrain / mmdet / mmseg) layout.

BOAT-CSWin's release is a timm checkpoint (``state_dict`` and ``state_dict_ema``) with CSWin's
names plus FSLA sub-layers ``stage{k}.{j}.{norm3, content_attn.{qkv, proj, get_v}}``. mmboat's
``BOATCSWinTransformer`` keeps those names, so conversion is a key mapping:

* ``stage1_conv_embed.0`` / ``.2`` (the conv and LayerNorm of CSWin's stem ``Sequential``) ->
  ``backbone.stage1_conv_embed.conv`` / ``.norm``;
* ``stage{k}.*``, ``merge{k}.*`` -> ``backbone.*``;
* the final ``norm`` -> ``backbone.norm3`` (output norm of the last stage, ``out_indices=(3, )``);
  ``head`` -> ``head.fc`` (mmpretrain's ``LinearClsHead`` after a ``GlobalAveragePooling`` neck).

The released weights were trained with FSLA logit scale 1.0: keep ``fsla_cfg=dict(qk_scale=1.0)``
(the ``BOATCSWinTransformer`` default) when using them. The output is
``{'state_dict': {name: Tensor}, 'meta': {str: str|int}}`` and loads with
``torch.load(path, weights_only=True)``.

Example::

    python tools/model_converters/boat_cswin_to_mmboat.py boat_cswin_tiny.pth.tar \
        boat-cswin-tiny_in1k_mmboat.pth --ema
"""
import argparse
import os.path as osp
import re
import sys
from collections import OrderedDict
from typing import Dict, Optional

from torch import Tensor

# The repository root (mmboat without installing it) and this folder (the converters' shared
# helpers), also when the script is imported by path.
sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

# ``load_official`` is part of the script's interface.
from _converter_common import (  # noqa: E402,F401
    add_common_args, describe_keys, load_official_checkpoint as load_official, plain_tensors,
    save_converted, stage_block_layout)

from mmboat.models.utils.checkpoint_keys import (  # noqa: E402
    CSWIN_STEM_RENAMES as STEM_RENAMES, extract_state_dict as extract_tensors)

STAGE_PATTERN = re.compile(r'(stage\d+|merge\d+)\.')


def extract_state_dict(checkpoint: dict, use_ema: bool = False) -> Dict[str, Tensor]:
    """``state_dict`` (or ``state_dict_ema`` with ``use_ema``), without ``module.`` prefixes."""
    result = extract_tensors(checkpoint, ('state_dict', 'model'), use_ema)
    if not any(name.startswith('stage1_conv_embed.') for name in result):
        raise ValueError('not a BOAT-CSWin checkpoint: no "stage1_conv_embed.*" keys '
                         f'({describe_keys(checkpoint, result)})')
    return result


def describe_arch(state_dict: Dict[str, Tensor]) -> str:
    """``embed_dims``, ``depths`` and the FSLA blocks of each stage."""
    _, depths, fsla_blocks = stage_block_layout(state_dict, r'stage(\d+)\.(\d+)\.(\w+)',
                                                'content_attn')
    embed_dims = state_dict['stage1_conv_embed.0.weight'].shape[0]
    return f'embed_dims={embed_dims}, depths={depths}, fsla_blocks={fsla_blocks}'


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
        converted[new_name] = value
    return plain_tensors(converted)


def convert(checkpoint: dict, use_ema: bool = False) -> dict:
    """Convert a loaded released checkpoint; returns ``{'state_dict', 'meta'}``."""
    state_dict = extract_state_dict(checkpoint, use_ema)
    converted = convert_state_dict(state_dict)
    meta = {'converter': 'tools/model_converters/boat_cswin_to_mmboat.py',
            'weights': 'state_dict_ema' if use_ema else 'state_dict',
            'arch': describe_arch(state_dict), 'num_tensors': len(converted),
            # a dense backbone leaves it fresh (mmboat/models/utils/pretrained.py)
            'official_final_norm': 'norm3'}
    return {'state_dict': converted, 'meta': meta}


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert a released BOAT-CSWin checkpoint to mmboat layout')
    add_common_args(parser, ema_help='convert "state_dict_ema" instead of "state_dict"')
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv)
    result = convert(load_official(args.src, args.trust_checkpoint), args.ema)
    save_converted(result['state_dict'], result['meta'], args.dst)
    print(f'{args.src} -> {args.dst}: {result["meta"]["num_tensors"]} tensors '
          f'({result["meta"]["weights"]}), {result["meta"]["arch"]}')


if __name__ == '__main__':
    main()
