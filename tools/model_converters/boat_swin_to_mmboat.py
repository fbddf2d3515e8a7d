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
import os.path as osp
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
    SWIN_DERIVED_BUFFERS as DERIVED_BUFFERS, extract_state_dict as extract_tensors)

BACKBONE_PREFIXES = ('patch_embed.', 'layers.')


def extract_state_dict(checkpoint: dict) -> Dict[str, Tensor]:
    """The weights under ``model`` (or ``state_dict``, or the dict itself), without ``module.``."""
    result = extract_tensors(checkpoint, ('model', 'state_dict'))
    if not any(name.startswith('layers.') for name in result):
        raise ValueError('not a BOAT-Swin checkpoint: no "layers.*" keys '
                         f'({describe_keys(checkpoint, result)})')
    return result


def describe_arch(state_dict: Dict[str, Tensor]) -> str:
    """``embed_dims, depths, num_heads, window_size`` and the FSLA blocks of each stage."""
    stages, depths, fsla_blocks = stage_block_layout(
        state_dict, r'layers\.(\d+)\.blocks\.(\d+)\.(\w+)', 'attnC')
    heads = [state_dict[f'layers.{i}.blocks.0.attn.relative_position_bias_table'].shape[1]
             for i in stages]
    table = state_dict['layers.0.blocks.0.attn.relative_position_bias_table'].shape[0]
    window = (round(table**0.5) + 1) // 2
    embed_dims = state_dict['patch_embed.proj.weight'].shape[0]
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
        converted[new_name] = value
    return plain_tensors(converted)


def convert(checkpoint: dict) -> dict:
    """Convert a loaded released checkpoint; returns ``{'state_dict', 'meta'}``."""
    state_dict = extract_state_dict(checkpoint)
    converted = convert_state_dict(state_dict)
    meta = {'converter': 'tools/model_converters/boat_swin_to_mmboat.py',
            'arch': describe_arch(state_dict), 'num_tensors': len(converted),
            # a dense backbone leaves it fresh (mmboat/models/utils/pretrained.py)
            'official_final_norm': 'norm3'}
    return {'state_dict': converted, 'meta': meta}


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert a released BOAT-Swin checkpoint to mmboat layout')
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv)
    result = convert(load_official(args.src, args.trust_checkpoint))
    save_converted(result['state_dict'], result['meta'], args.dst)
    print(f'{args.src} -> {args.dst}: {result["meta"]["num_tensors"]} tensors, '
          f'{result["meta"]["arch"]}')


if __name__ == '__main__':
    main()
