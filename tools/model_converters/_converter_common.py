"""Shared pieces of the released-checkpoint converters in this folder.

Every converter loads a released checkpoint weights-only (a ``--trust-checkpoint`` flag unpickles
it fully), picks the weights out of the wrapper dict (:func:`extract_state_dict`, shared with the
in-memory reading of releases in mmboat), renames keys (its own business) and saves
``{'state_dict': {name: Tensor}, 'meta': {...}}`` with plain, contiguous tensors, so that the
output loads with ``torch.load(path, weights_only=True)``.
"""
import argparse
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    'load_official_checkpoint', 'plain_tensors', 'stage_block_layout', 'save_converted',
    'add_common_args', 'describe_keys', 'CONVERTER_EPILOG'
]


def load_official_checkpoint(path: str, trust_checkpoint: bool = False) -> dict:
    """Load a released checkpoint on CPU, weights only unless ``trust_checkpoint``.

    Args:
        path (str): The checkpoint file.
        trust_checkpoint (bool): Unpickle arbitrary objects (trusted files only).
            Defaults to False.

    Returns:
        dict: The loaded checkpoint.

    Raises:
        RuntimeError: The file holds pickled objects besides tensors and ``trust_checkpoint`` is
            off; the message names the ``--trust-checkpoint`` flag.
        ValueError: The file was already converted by mmboat.
    """
    try:
        checkpoint = _load(path, trust_checkpoint)
    except Exception as exc:  # UnpicklingError names the offending global (timm saves args)
        if trust_checkpoint:
            raise
        raise RuntimeError(
            f'{path} holds pickled objects besides tensors ({type(exc).__name__}: {exc}). '
            'If you trust its source, rerun with --trust-checkpoint to unpickle it fully.'
        ) from exc
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if isinstance(meta, dict) and 'converter' in meta:
        raise ValueError(f'{path} is already converted by mmboat ({meta["converter"]}, '
                         f'{meta.get("arch", "")}): use it as it is (load_from, or init_cfg '
                         "Pretrained with prefix='backbone.')")
    return checkpoint


def _load(path: str, trust_checkpoint: bool) -> dict:
    # timm's checkpoints (BOAT-CSWin) keep their command line as an argparse.Namespace, which
    # only holds attributes. (torch's safe_globals context removes its globals on exit, also
    # ones allow-listed before, so it is entered only when needed.)
    if argparse.Namespace in torch.serialization.get_safe_globals():
        return torch.load(path, map_location='cpu', weights_only=not trust_checkpoint)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=not trust_checkpoint)


def describe_keys(checkpoint: dict, weights: Dict[str, Tensor]) -> str:
    """The checkpoint's top-level keys and its first weight names, for error messages."""
    top = sorted(str(k) for k in checkpoint)[:10] if isinstance(checkpoint, dict) else []
    return f'top-level keys: {top}; first weight names: {list(weights)[:5]}'


def plain_tensors(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Detached, contiguous copies (no views into the source's storage, no autograd history)."""
    return OrderedDict((name, value.detach().clone().contiguous())
                       for name, value in state_dict.items())


def stage_block_layout(state_dict: Dict[str, Tensor], pattern: str,
                       marker: str) -> Tuple[List[int], List[int], List[List[int]]]:
    """Stages, blocks per stage and the blocks holding ``marker``, read from the key names.

    Args:
        state_dict (Dict[str, Tensor]): The weights.
        pattern (str): A regex matched at the start of each key, with groups (stage index,
            block index, the block's first sub-module name).
        marker (str): The sub-module name that marks a block (e.g. its FSLA attention).

    Returns:
        tuple: The sorted stage indices, the depth of each stage (highest block index + 1) and
        the sorted indices of the blocks holding ``marker`` in each stage.
    """
    blocks: Dict[int, set] = {}
    marked: Dict[int, set] = {}
    regex = re.compile(pattern)
    for name in state_dict:
        match = regex.match(name)
        if match:
            i, j = int(match.group(1)), int(match.group(2))
            blocks.setdefault(i, set()).add(j)
            if match.group(3) == marker:
                marked.setdefault(i, set()).add(j)
    stages = sorted(blocks)
    return (stages, [max(blocks[i]) + 1 for i in stages],
            [sorted(marked.get(i, ())) for i in stages])


def save_converted(state_dict: Dict[str, Tensor], meta: dict, path: str) -> None:
    """Save ``{'state_dict': state_dict, 'meta': meta}`` to ``path``, creating its folder.

    Args:
        state_dict (Dict[str, Tensor]): Converted weights (plain tensors).
        meta (dict): ``str`` keys to ``str``/``int`` values describing the conversion.
        path (str): The output file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({'state_dict': state_dict, 'meta': meta}, path)


CONVERTER_EPILOG = '''\
classification vs dense use:
  A classification release converts to an mmpretrain ImageClassifier checkpoint (backbone.*,
  the final norm as backbone.norm3, head.fc.*): use it with `load_from` in an mmpretrain config,
  or as the backbone init of a det/seg config with
  init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.') -- there the dense
  backbone's output norms start fresh, as in the official fine-tuning.
  A released detection/segmentation checkpoint converts to mmdet 3 / mmseg 1 names: use it with
  `load_from` or tools/test.py.
  No conversion is needed at all to train or test: mmboat reads the official files (and URLs)
  in memory; the converters are for offline use.'''


def add_common_args(parser: argparse.ArgumentParser,
                    ema_help: Optional[str] = None) -> argparse.ArgumentParser:
    """Add ``src``, ``dst``, ``--ema`` (only with ``ema_help``) and ``--trust-checkpoint``.

    Args:
        parser (argparse.ArgumentParser): The converter's parser.
        ema_help (str, optional): Help of the ``--ema`` flag; no flag when None.
            Defaults to None.

    Returns:
        argparse.ArgumentParser: ``parser``.
    """
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = CONVERTER_EPILOG
    parser.add_argument('src', help='released checkpoint')
    parser.add_argument('dst', help='output path')
    if ema_help is not None:
        parser.add_argument('--ema', action='store_true', help=ema_help)
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='unpickle non-tensor objects in the source (trusted files only)')
    return parser
