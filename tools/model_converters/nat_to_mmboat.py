"""Convert released NAT / DiNAT checkpoints to mmboat (mmpretrain / mmdet / mmseg) layout.

mmboat keeps the released parameter names, so conversion is a key mapping:

* classification (timm-style ``patch_embed.*``, ``levels.*``, ``norm.*``, ``head.*``):
  ``patch_embed/levels`` -> ``backbone.*``, the final ``norm`` -> ``backbone.norm{last}`` (the
  output norm of the last stage, ``out_indices=(3, )``), ``head`` -> ``head.fc`` (mmpretrain's
  ``LinearClsHead``, used with a ``GlobalAveragePooling`` neck);
* detection / segmentation (mmdet 2.x / mmseg 0.x, already ``backbone.*``, ``neck.*``,
  ``rpn_head.*``, ``roi_head.*``, ``decode_head.*``, ``auxiliary_head.*``): names are unchanged
  in mmdet 3 / mmseg 1, so only the wrapper (``module.`` prefixes, optimizer state, pickled
  objects) is removed.

The output is ``{'state_dict': {name: Tensor}, 'meta': {str: str|int}}`` and loads with
``torch.load(path, weights_only=True)`` and ``init_cfg=dict(type='Pretrained', ...)`` /
``load_from``.

Example::

    python tools/model_converters/nat_to_mmboat.py nat_tiny.pth nat-tiny_in1k_mmboat.pth
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
    save_converted)

from mmboat.models.utils.checkpoint_keys import (  # noqa: E402
    extract_state_dict as extract_tensors)

BACKBONE_PREFIXES = ('patch_embed.', 'levels.')
DENSE_PREFIXES = ('backbone.', 'neck.', 'rpn_head.', 'roi_head.', 'decode_head.',
                  'auxiliary_head.', 'bbox_head.', 'mask_head.')


def extract_state_dict(checkpoint: dict, use_ema: bool = False) -> Dict[str, Tensor]:
    """Pick the weights out of a checkpoint and strip ``module.`` prefixes."""
    result = extract_tensors(checkpoint, ('state_dict', 'model'), use_ema)
    if not result:
        raise ValueError('no tensors found in the checkpoint '
                         f'({describe_keys(checkpoint, result)})')
    if not any(name.startswith(BACKBONE_PREFIXES + ('backbone.levels.', )) for name in result):
        raise ValueError('not a NAT/DiNAT checkpoint: no "levels.*" or "backbone.levels.*" keys '
                         f'({describe_keys(checkpoint, result)})')
    return result


def detect_task(state_dict: Dict[str, Tensor]) -> str:
    """``'cls'`` for timm-style classification weights, ``'dense'`` for mmdet/mmseg ones."""
    if any(name.startswith(BACKBONE_PREFIXES) for name in state_dict):
        return 'cls'
    if any(name.startswith('backbone.levels.') for name in state_dict):
        return 'dense'
    raise ValueError('not a NAT/DiNAT checkpoint: no "levels.*" or "backbone.levels.*" keys '
                     f'(first keys: {list(state_dict)[:5]})')


def num_stages(state_dict: Dict[str, Tensor], prefix: str = '') -> int:
    pattern = re.compile(re.escape(prefix) + r'levels\.(\d+)\.')
    stages = {int(m.group(1)) for m in map(pattern.match, state_dict) if m}
    if not stages:
        raise ValueError(f'no "{prefix}levels.*" keys in the checkpoint')
    return max(stages) + 1


def describe_arch(state_dict: Dict[str, Tensor], prefix: str = '') -> str:
    """Infer ``embed_dims, depths, num_heads, kernel_size, mlp_ratio, layer_scale``."""
    n = num_stages(state_dict, prefix)
    embed_dims = state_dict[f'{prefix}patch_embed.proj.1.weight'].shape[0]
    depths, heads = [], []
    for i in range(n):
        pattern = re.compile(re.escape(prefix) + rf'levels\.{i}\.blocks\.(\d+)\.')
        depths.append(max(int(m.group(1)) for m in map(pattern.match, state_dict) if m) + 1)
        heads.append(state_dict[f'{prefix}levels.{i}.blocks.0.attn.rpb'].shape[0])
    rpb = state_dict[f'{prefix}levels.0.blocks.0.attn.rpb']
    kernel_size = (rpb.shape[-1] + 1) // 2
    mlp_ratio = state_dict[f'{prefix}levels.0.blocks.0.mlp.fc1.weight'].shape[0] / embed_dims
    layer_scale = f'{prefix}levels.0.blocks.0.gamma1' in state_dict
    return (f'embed_dims={embed_dims}, depths={depths}, num_heads={heads}, '
            f'kernel_size={kernel_size}, mlp_ratio={mlp_ratio:g}, layer_scale={layer_scale}')


def convert_cls(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """timm-style classification weights -> mmpretrain ``ImageClassifier`` weights."""
    last = num_stages(state_dict) - 1
    converted = OrderedDict()
    for name, value in state_dict.items():
        if name.startswith(BACKBONE_PREFIXES):
            new_name = 'backbone.' + name
        elif name.startswith('norm.'):
            new_name = f'backbone.norm{last}.' + name[len('norm.'):]
        elif name.startswith('head.'):
            new_name = 'head.fc.' + name[len('head.'):]
        else:
            raise KeyError(f'unexpected key {name!r} in a NAT classification checkpoint')
        converted[new_name] = value
    return converted


def convert_dense(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """mmdet 2.x / mmseg 0.x weights -> mmdet 3 / mmseg 1 weights (same names)."""
    converted = OrderedDict()
    for name, value in state_dict.items():
        if not name.startswith(DENSE_PREFIXES):
            raise KeyError(f'unexpected key {name!r} in a NAT detection/segmentation checkpoint')
        converted[name] = value
    return converted


def convert(checkpoint: dict, use_ema: bool = False, task: str = 'auto') -> dict:
    """Convert a loaded released checkpoint; returns ``{'state_dict', 'meta'}``."""
    state_dict = extract_state_dict(checkpoint, use_ema)
    detected = detect_task(state_dict)
    if task == 'auto':
        task = detected
    elif task != detected:
        raise ValueError(f'--task {task} but the checkpoint looks like a {detected} checkpoint')
    if task == 'cls':
        arch = describe_arch(state_dict)
        converted = convert_cls(state_dict)
    else:
        arch = describe_arch(state_dict, 'backbone.')
        converted = convert_dense(state_dict)
    converted = plain_tensors(converted)
    meta = {'converter': 'tools/model_converters/nat_to_mmboat.py', 'task': task, 'arch': arch,
            'num_tensors': len(converted)}
    if task == 'cls':
        # The release's final norm, mapped to the last output norm for classification; a
        # dense backbone leaves it fresh, as the official det/seg fine-tuning does
        # (mmboat/models/utils/pretrained.py).
        meta['official_final_norm'] = f'norm{num_stages(state_dict) - 1}'
    return {'state_dict': converted, 'meta': meta}


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert a released NAT/DiNAT checkpoint to mmboat layout')
    add_common_args(parser, ema_help='convert "state_dict_ema" instead of the raw weights')
    parser.add_argument('--task', choices=('auto', 'cls', 'dense'), default='auto',
                        help='checkpoint kind (auto: from the key layout)')
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv)
    result = convert(load_official(args.src, args.trust_checkpoint), args.ema, args.task)
    save_converted(result['state_dict'], result['meta'], args.dst)
    print(f'{args.src} -> {args.dst}: {result["meta"]["num_tensors"]} tensors, '
          f'task {result["meta"]["task"]}, {result["meta"]["arch"]}')


if __name__ == '__main__':
    main()
