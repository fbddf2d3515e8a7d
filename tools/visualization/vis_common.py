"""What the visualization tools share: a config's backbone, its weights and the title strip.

Weights come from ``--checkpoint`` only. A config's ``Pretrained`` init_cfg is not followed (no
download); without a checkpoint the backbone keeps its random initialisation and the tools say so
on the console and in the figure's title. A checkpoint is checked against the backbone before it
is used: a whole model's checkpoint (keys under ``backbone.``), a backbone's own state dict and
the official NAT/DiNAT, BOAT-Swin and BOAT-CSWin releases are read (a release is converted in
memory with the renames of its converter in ``tools/model_converters/``, as ``init_cfg`` and
``load_from`` do, and the tools say so); weights of another backbone family or architecture, or
that would leave any block of the backbone random, stop the tool with an error saying what the
checkpoint looks like.
"""
import logging
import os.path as osp
import sys
from typing import Optional, Tuple

import cv2
import numpy as np

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

#: The title line of a figure drawn from a randomly initialised backbone.
RANDOM_WEIGHTS = 'RANDOM WEIGHTS (no --checkpoint)'


def text_header(text: str, width: int) -> np.ndarray:
    """White strip with ``text`` (split into lines at ``'; '``) in black."""
    lines = text.split('; ')
    header = np.full((8 + 18 * len(lines), width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(header, line, (4, 18 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return header


def build_backbone(config: Optional[str], default: Optional[dict] = None):
    """The backbone of ``config``'s model (or the backbone ``default``), randomly initialised.

    Returns:
        tuple: ``(backbone in eval mode, the checkpoint its Pretrained init_cfg names or None)``.
    """
    from mmboat.utils import apply_stack_fixes

    apply_stack_fixes()
    from mmengine.logging import MMLogger
    from mmengine.registry import MODELS, init_default_scope

    import mmboat.models  # noqa: F401
    if config is None:
        if default is None:
            raise ValueError('no --config given and this tool has no default backbone')
        model = MODELS.build(default)
    else:
        from mmengine.config import Config

        from mmboat.engine.runner_setup import register_downstream
        cfg = Config.fromfile(config)
        if cfg.get('default_scope', None) is not None:
            init_default_scope(register_downstream(cfg))
        model = MODELS.build(cfg.model)
    backbone = getattr(model, 'backbone', model)
    init_cfg = backbone.init_cfg
    named = (init_cfg.get('checkpoint') if isinstance(init_cfg, dict)
             and init_cfg.get('type') == 'Pretrained' else None)
    backbone.init_cfg = None  # random initialisation, no download
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # not one "value is the same" line per parameter
    try:
        backbone.init_weights()
    finally:
        logger.setLevel(level)
    return backbone.eval(), named


def _output_norm(key: str) -> bool:
    head = key.split('.', 1)[0]
    return head.startswith('norm') and head[4:].isdigit()


def load_backbone_checkpoint(backbone, checkpoint: str) -> str:
    """Load ``checkpoint`` into an mmboat ``backbone``, or stop and say why it does not fit.

    Every tensor of the backbone must come from the checkpoint, except its output norms
    (``norm{i}``), which classification weights do not have and which no block uses.

    Returns:
        str: what was loaded, for the console and the title.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint belongs to another backbone family or architecture, or holds
            no weights of the backbone.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    from mmboat.models.utils.pretrained import FAMILIES, compare_weights, read_backbone_weights

    cls = type(backbone).__name__
    family = getattr(backbone, 'checkpoint_family', None)
    if family not in FAMILIES:
        raise ValueError(f'{cls} is not an mmboat backbone (NAT/DiNAT, BOAT-Swin, BOAT-CSWin); '
                         'use a config with one')
    name, converter, _ = FAMILIES[family]
    if '://' not in checkpoint and not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu', logger='current')
    if not isinstance(loaded, dict):
        raise ValueError(f'{checkpoint} holds a {type(loaded).__name__}, not a checkpoint dict')
    last = backbone.num_stages - 1
    final_norm = f'norm{last}' if tuple(backbone.out_indices) == (last, ) else None
    weights, what, found = read_backbone_weights(loaded, 'backbone.', final_norm)
    if found is not None and found != family:
        raise ValueError(f'{checkpoint} looks like {what} of a {FAMILIES[found][0]} model, but '
                         f'the backbone is {cls} ({name}): give a {name} checkpoint, or the '
                         f'config of a {FAMILIES[found][0]} model')
    own = backbone.state_dict()
    matched, missing, mismatched, _, _ = compare_weights(own, weights)
    unfilled = [k for k in missing + mismatched if not _output_norm(k)]
    if unfilled and not matched and found is None:
        raise ValueError(f'{checkpoint} holds no weights of {cls}: it looks like {what}. Give an '
                         f'official {name} release (read in memory), its conversion by '
                         f'tools/model_converters/{converter}, or the checkpoint of a model with '
                         'this backbone')
    if unfilled:
        bad_shape = [k for k in mismatched if not _output_norm(k)]
        absent = [k for k in missing if not _output_norm(k)]
        details = [f'{len(bad_shape)} of another shape, e.g. ' + ', '.join(
            f'{k} {tuple(weights[k].shape)} in the checkpoint vs {tuple(own[k].shape)}'
            for k in bad_shape[:2])] if bad_shape else []
        details += [f'{len(absent)} missing, e.g. {", ".join(absent[:2])}'] if absent else []
        raise ValueError(f'{checkpoint} would leave {len(unfilled)} of the {len(own)} tensors of '
                         f'{cls} random ({"; ".join(details)}): it looks like {what} of another '
                         f'{name} architecture; use the config it belongs to')
    backbone.load_state_dict(matched, strict=False)
    meta = loaded.get('meta', None)
    if isinstance(meta, dict) and meta.get('official_release'):
        what += f' (the renames of tools/model_converters/{converter})'
    fresh = sorted({k.split('.', 1)[0] for k in missing})
    return (f'weights: {checkpoint}: {what}, {len(matched)} tensors'
            + (f', output norms {"/".join(fresh)} left fresh' if fresh else ''))


def load_backbone(config: Optional[str], checkpoint: Optional[str],
                  default: Optional[dict] = None) -> Tuple[object, Optional[str], str]:
    """:func:`build_backbone`, then :func:`load_backbone_checkpoint` when there is a checkpoint.

    Returns:
        tuple: ``(backbone, what was loaded or None for random weights, advice)``: the advice
        says where trained weights come from (printed with the random-weights warning).
    """
    backbone, named = build_backbone(config, default)
    if checkpoint:
        note = load_backbone_checkpoint(backbone, checkpoint)
        print(note)
        return backbone, note, ''
    advice = (f'the config\'s backbone init_cfg names {named}: pass it as --checkpoint (or a '
              'trained model\'s checkpoint)' if named else 'pass --checkpoint (an official '
              'release or an mmboat/mmengine checkpoint of this model)')
    return backbone, None, advice
