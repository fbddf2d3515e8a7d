"""Official checkpoint key names that mmboat's backbones keep or rename.

mmboat keeps the released parameter names, so reading an official checkpoint takes only these
renames and dropped buffers, used both by the in-memory reading of releases
(:mod:`mmboat.models.utils.pretrained`) and by the offline converters in
``tools/model_converters/``. Only ``torch`` is imported here.
"""
from collections import OrderedDict
from typing import Dict, Sequence

from torch import Tensor

__all__ = ['CSWIN_STEM_RENAMES', 'SWIN_DERIVED_BUFFERS', 'extract_state_dict']

# Renames shared by the converters and the in-memory reading of official checkpoints
# (mmboat/models/utils/pretrained.py); every other released name is kept.
# BOAT-CSWin's stem is a Sequential in the release (conv, -, LayerNorm); mmboat names its parts.
CSWIN_STEM_RENAMES = {'stage1_conv_embed.0.': 'stage1_conv_embed.conv.',
                      'stage1_conv_embed.2.': 'stage1_conv_embed.norm.'}
# Buffers that Swin derives from the window size and input size; mmboat computes them.
SWIN_DERIVED_BUFFERS = ('relative_position_index', 'attn_mask')


def extract_state_dict(checkpoint: dict,
                       keys: Sequence[str],
                       use_ema: bool = False,
                       ema_key: str = 'state_dict_ema') -> Dict[str, Tensor]:
    """Pick the weights out of a checkpoint: its tensors, without ``module.`` prefixes.

    Args:
        checkpoint (dict): A loaded checkpoint.
        keys (Sequence[str]): Wrapper keys tried in order (the first one holding a dict wins);
            the checkpoint itself is the state dict when none does.
        use_ema (bool): Take ``checkpoint[ema_key]`` instead. Defaults to False.
        ema_key (str): The key of the EMA weights. Defaults to ``'state_dict_ema'``.

    Returns:
        Dict[str, Tensor]: The tensors (non-tensor entries are dropped), in checkpoint order.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'expected a dict checkpoint, got {type(checkpoint).__name__}')
    if use_ema:
        if not isinstance(checkpoint.get(ema_key), dict):
            raise KeyError(f'--ema: the checkpoint has no "{ema_key}"; keys are '
                           f'{sorted(checkpoint)}')
        state_dict = checkpoint[ema_key]
    else:
        state_dict = checkpoint
        for key in keys:
            if isinstance(checkpoint.get(key), dict):
                state_dict = checkpoint[key]
                break
    result = OrderedDict()
    for name, value in state_dict.items():
        if isinstance(value, Tensor):
            result[name[len('module.'):] if name.startswith('module.') else name] = value
    return result
