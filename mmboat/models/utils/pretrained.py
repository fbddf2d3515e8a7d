"""Pretrained weights for mmboat backbones: official layouts read in memory, no silent random init.

``init_cfg=dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix='backbone.')`` on an mmboat
backbone is handled here rather than by mmengine's ``PretrainedInit``:

* the checkpoint is read weights-only (mmengine's ``CheckpointLoader``: paths and URLs) and its
  layout recognised: a checkpoint saved by mmengine or by mmboat's converters (``state_dict``
  with ``prefix``-ed keys), or an official release (NAT/DiNAT: a raw dict of timm names;
  BOAT-Swin: Swin's names under ``model``; BOAT-CSWin: timm's ``state_dict`` /
  ``state_dict_ema`` with ``args``). mmboat keeps the released parameter names, so reading an
  official checkpoint into a backbone takes the same renames as the converters in
  ``tools/model_converters/`` (:mod:`mmboat.utils.checkpoint_convert`), applied in memory; the
  classification head and the final ``norm`` are not part of a dense backbone, so its output
  norms ``norm{i}`` keep their fresh initialisation, as in the official det/seg fine-tuning;
* the weights are compared with the backbone's parameters and buffers by name and shape. When
  less than half of the backbone (by element count) would be loaded, loading stops with an
  error naming the checkpoint, what it looks like and the fix, instead of training from random
  weights. ``allow_partial=True`` in the ``init_cfg`` opts out for a deliberate partial load.
  Output norms missing from a classification checkpoint are reported in one log line; any other
  missing or mismatched tensor in a warning.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from mmboat.utils.checkpoint_convert import (CSWIN_STEM_RENAMES, SWIN_DERIVED_BUFFERS,
                                             extract_state_dict)

__all__ = ['FAMILIES', 'read_backbone_weights', 'load_pretrained_backbone', 'PretrainedMixin']

# Backbone family -> (name for messages, the converter script, a key prefix only it has).
FAMILIES = {
    'nat': ('NAT/DiNAT', 'nat_to_mmboat.py', 'levels.'),
    'boat_swin': ('BOAT-Swin', 'boat_swin_to_mmboat.py', 'layers.'),
    'boat_cswin': ('BOAT-CSWin', 'boat_cswin_to_mmboat.py', 'stage1.'),
}
# The least fraction of a backbone's elements a load must cover without allow_partial=True.
MIN_COVERAGE = 0.5


def _family_of(keys) -> Optional[str]:
    for family, (_, _, marker) in FAMILIES.items():
        if any(k.startswith(marker) for k in keys):
            return family
    return None


def _official_backbone_keys(family: str, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Official names -> the backbone's names (the converters' renames without ``backbone.``);
    the classification ``head`` and final ``norm`` are left out."""
    result = OrderedDict()
    for name, value in state_dict.items():
        if name.startswith(('head.', 'norm.')):
            continue
        if family == 'boat_swin' and name.rsplit('.', 1)[-1] in SWIN_DERIVED_BUFFERS:
            continue
        if family == 'boat_cswin':
            for old, new in CSWIN_STEM_RENAMES.items():
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
        result[name] = value
    return result


def read_backbone_weights(checkpoint: dict, prefix: str = '') -> Tuple[Dict[str, Tensor], str,
                                                                      Optional[str]]:
    """The backbone weights in a loaded checkpoint, whatever its layout.

    Args:
        checkpoint (dict): A loaded checkpoint.
        prefix (str): The backbone's key prefix in mmengine / converted checkpoints
            (e.g. ``'backbone.'``). Defaults to ``''``.

    Returns:
        tuple: ``(weights, description, family)``: the tensors under the backbone's own names,
        what the checkpoint looks like (for messages) and the backbone family its keys belong
        to (None when unknown).
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'expected a dict checkpoint, got {type(checkpoint).__name__}')
    top = sorted(checkpoint)[:8]
    if isinstance(checkpoint.get('model'), dict) and 'state_dict' not in checkpoint:
        weights = extract_state_dict(checkpoint, ('model', ))
        family = _family_of(weights)
        if family == 'boat_swin':
            return (_official_backbone_keys(family, weights),
                    'an official BOAT-Swin checkpoint (weights under "model")', family)
    if 'args' in checkpoint and isinstance(checkpoint.get('state_dict'), dict):
        weights = extract_state_dict(checkpoint, ('state_dict', ))
        family = _family_of(weights)
        if family == 'boat_cswin':
            return (_official_backbone_keys(family, weights),
                    'an official BOAT-CSWin (timm) checkpoint', family)
    weights = extract_state_dict(checkpoint, ('state_dict', 'model'))
    if prefix and any(k.startswith(prefix) for k in weights):
        own = OrderedDict((k[len(prefix):], v) for k, v in weights.items() if k.startswith(prefix))
        meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
        what = ('a checkpoint converted by mmboat' if 'converter' in meta else
                'an mmengine/mmboat checkpoint')
        return own, f'{what} (keys under "{prefix}")', _family_of(own)
    family = _family_of(weights)
    if family is not None:
        name = FAMILIES[family][0]
        if prefix:
            what = f'an official {name} classification checkpoint (timm names, no "{prefix}")'
        else:
            what = f'a {name} checkpoint'
        return _official_backbone_keys(family, weights), what, family
    return weights, f'an unrecognised checkpoint (top-level keys: {top})', None


def _output_norm(name: str) -> bool:
    head = name.split('.', 1)[0]
    return head.startswith('norm') and head[4:].isdigit()


def load_pretrained_backbone(backbone: nn.Module, family: str, checkpoint: str,
                             prefix: Optional[str] = None, map_location: str = 'cpu',
                             allow_partial: bool = False) -> Dict[str, List[str]]:
    """Load ``checkpoint`` into ``backbone`` (see the module docstring).

    Args:
        backbone (nn.Module): The backbone.
        family (str): Its family, a key of :data:`FAMILIES`.
        checkpoint (str): Path or URL.
        prefix (str, optional): The backbone's key prefix in the checkpoint. Defaults to None.
        map_location (str): Where to load tensors. Defaults to ``'cpu'``.
        allow_partial (bool): Load whatever matches, however little. Defaults to False.

    Returns:
        dict: ``missing``, ``mismatched`` and ``unexpected`` key lists.

    Raises:
        RuntimeError: Less than half of the backbone would be loaded and not ``allow_partial``.
    """
    from mmengine.logging import print_log
    from mmengine.runner.checkpoint import CheckpointLoader

    loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location,
                                              logger='current')
    weights, what, found = read_backbone_weights(loaded, prefix or '')
    cls = type(backbone).__name__
    own = backbone.state_dict()
    matched = OrderedDict((k, v) for k, v in weights.items()
                          if k in own and tuple(v.shape) == tuple(own[k].shape))
    missing = [k for k in own if k not in weights]
    mismatched = [k for k in own if k in weights and k not in matched]
    unexpected = [k for k in weights if k not in own]
    total = sum(t.numel() for t in own.values())
    coverage = sum(own[k].numel() for k in matched) / max(total, 1)
    if coverage < MIN_COVERAGE and not allow_partial:
        name, converter, _ = FAMILIES[family]
        if found is not None and found != family:
            diagnosis = (f'it looks like {what} of a {FAMILIES[found][0]} model, given to {cls} '
                         f'({name}): use a {name} checkpoint, or the {FAMILIES[found][0]} '
                         'backbone for these weights')
        elif found == family:
            shapes = ', '.join(f'{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}'
                               for k in mismatched[:3])
            diagnosis = (f'it looks like {what} of another {name} architecture (e.g. NAT-Mini '
                         f'weights in NAT-Tiny; checkpoint vs model shapes: {shapes or "n/a"}, '
                         f'missing {missing[:3]}): set the arch that matches the checkpoint')
        else:
            diagnosis = (f'it looks like {what}. Give an official {name} release or its '
                         f'conversion (tools/model_converters/{converter}), and check the '
                         f'init_cfg prefix ({prefix!r})')
        raise RuntimeError(
            f'{cls}: init_cfg Pretrained checkpoint {checkpoint!r} would load only '
            f'{100 * coverage:.0f}% of the backbone ({len(matched)} of {len(own)} tensors; '
            f'{len(missing)} missing, {len(mismatched)} shape-mismatched); training would start '
            f'from random weights. {diagnosis}. For a deliberate partial load add '
            'allow_partial=True to the init_cfg.')
    backbone.load_state_dict(matched, strict=False)
    fresh_norms = [k for k in missing if _output_norm(k)]
    others = [k for k in missing if not _output_norm(k)]
    print_log(f'{cls}: loaded {len(matched)} tensors ({100 * coverage:.1f}% of the backbone) '
              f'from {what}: {checkpoint}', logger='current')
    if fresh_norms:
        norms = sorted({k.split('.', 1)[0] for k in fresh_norms})
        print_log(f'{cls}: output norms {", ".join(norms)} are not in the checkpoint and keep '
                  'their fresh initialisation (expected for classification weights in a '
                  'detection/segmentation backbone, as in the official fine-tuning)',
                  logger='current')
    if others or mismatched:
        print_log(f'{cls}: not loaded from {checkpoint}: missing {others}, shape-mismatched '
                  f'{mismatched}', logger='current', level=logging.WARNING)
    return dict(missing=missing, mismatched=mismatched, unexpected=unexpected)


class PretrainedMixin:
    """``init_weights`` that loads a ``Pretrained`` init_cfg with
    :func:`load_pretrained_backbone` after the default initialisation.

    Put it before ``BaseModule`` in the bases and set ``checkpoint_family``.
    """
    checkpoint_family: str
    init_cfg: Optional[dict]

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if not (isinstance(cfg, dict) and cfg.get('type') == 'Pretrained'):
            super().init_weights()  # type: ignore[misc]
            return
        extra = set(cfg) - {'type', 'checkpoint', 'prefix', 'map_location', 'allow_partial'}
        if extra or 'checkpoint' not in cfg:
            raise ValueError(f'{type(self).__name__}: init_cfg Pretrained takes checkpoint, '
                             f'prefix, map_location and allow_partial; got {sorted(cfg)}')
        self.init_cfg = None
        try:
            super().init_weights()  # type: ignore[misc]
        finally:
            self.init_cfg = cfg
        load_pretrained_backbone(self, self.checkpoint_family, cfg['checkpoint'],  # type: ignore
                                 cfg.get('prefix'), cfg.get('map_location', 'cpu'),
                                 bool(cfg.get('allow_partial', False)))
