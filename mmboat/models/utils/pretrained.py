"""Pretrained weights for mmboat backbones: official layouts read in memory, no silent random init.

``init_cfg=dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix='backbone.')`` on an mmboat
backbone is handled here rather than by mmengine's ``PretrainedInit``:

* the checkpoint is read weights-only (mmengine's ``CheckpointLoader``: paths and URLs) and its
  layout recognised: a checkpoint saved by mmengine or by mmboat's converters (``state_dict``
  with ``prefix``-ed keys), or an official release (NAT/DiNAT: a raw dict of timm names;
  BOAT-Swin: Swin's names under ``model``; BOAT-CSWin: timm's ``state_dict`` /
  ``state_dict_ema`` with ``args``). mmboat keeps the released parameter names, so reading an
  official checkpoint into a backbone takes the same renames as the converters in
  ``tools/model_converters/`` (:mod:`mmboat.models.utils.checkpoint_keys`), applied in memory; the
  classification head and the final ``norm`` are not part of a dense backbone, so its output
  norms ``norm{i}`` keep their fresh initialisation, as in the official det/seg fine-tuning;
* the weights are compared with the backbone's parameters and buffers by name and shape. When
  less than half of the backbone (by element count) would be loaded, loading stops with an
  error naming the checkpoint, what it looks like and the fix, instead of training from random
  weights. ``allow_partial=True`` in the ``init_cfg`` opts out for a deliberate partial load.
  Output norms missing from a classification checkpoint are reported in one log line; any other
  missing or mismatched tensor in a warning.

The same rule holds for every other load into an mmboat backbone, whoever calls it: mmengine's
``load_checkpoint`` (``load_from``, resuming, the downstream packages' own ``tools/test.py`` and
inferencers, all ``strict=False``) and ``nn.Module.load_state_dict`` reach the backbone's
``_load_from_state_dict``, which stops a load that would fill less than half of the backbone.
``MMBOAT_ALLOW_PARTIAL_CHECKPOINT=1`` in the environment (mmboat's tools:
``--allow-partial-checkpoint``) or :func:`partial_loads_allowed` opts out.
"""
import contextlib
import logging
import os
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from .checkpoint_keys import CSWIN_STEM_RENAMES, SWIN_DERIVED_BUFFERS, extract_state_dict

__all__ = [
    'FAMILIES', 'OFFICIAL_URL_PREFIXES', 'register_official_url_loader', 'official_release',
    'official_to_classifier', 'read_backbone_weights', 'compare_weights',
    'load_pretrained_backbone', 'check_model_checkpoint', 'PretrainedMixin',
    'ALLOW_PARTIAL_ENV', 'partial_loads_allowed', 'check_state_dict_load'
]

# Backbone family -> (name for messages, the converter script, a key prefix only it has).
FAMILIES = {
    'nat': ('NAT/DiNAT', 'nat_to_mmboat.py', 'levels.'),
    'boat_swin': ('BOAT-Swin', 'boat_swin_to_mmboat.py', 'layers.'),
    'boat_cswin': ('BOAT-CSWin', 'boat_cswin_to_mmboat.py', 'stage1.'),
}
# Where the official releases are downloaded from (the metafiles list the full URLs).
OFFICIAL_URL_PREFIXES = ('https://shi-labs.com/projects/nat/checkpoints/',
                         'https://shi-labs.com/projects/dinat/checkpoints/',
                         'https://www.dropbox.com/s/')
# The least fraction of a backbone's elements a load must cover without allow_partial=True.
MIN_COVERAGE = 0.5
# Set to 1 to let any load into an mmboat backbone fill less than MIN_COVERAGE of it.
ALLOW_PARTIAL_ENV = 'MMBOAT_ALLOW_PARTIAL_CHECKPOINT'
_partial = threading.local()


@contextlib.contextmanager
def partial_loads_allowed():
    """Within this context (this thread), loads into mmboat backbones may be partial."""
    depth = getattr(_partial, 'depth', 0)
    _partial.depth = depth + 1
    try:
        yield
    finally:
        _partial.depth = depth


def _partial_allowed() -> bool:
    return (getattr(_partial, 'depth', 0) > 0
            or os.environ.get(ALLOW_PARTIAL_ENV, '').lower() in ('1', 'true', 'yes'))


def _family_of(keys) -> Optional[str]:
    for family, (_, _, marker) in FAMILIES.items():
        if any(k.startswith(marker) for k in keys):
            return family
    return None


def _official_backbone_keys(family: str, state_dict: Dict[str, Tensor],
                            final_norm: Optional[str] = None) -> Dict[str, Tensor]:
    """Official names -> the backbone's names (the converters' renames without ``backbone.``).

    The classification ``head`` is left out; the release's final ``norm`` becomes
    ``final_norm`` (the output norm of a classification backbone) or is left out (a dense
    backbone's output norms start fresh, as the official det/seg fine-tuning leaves them).
    """
    result = OrderedDict()
    for name, value in state_dict.items():
        if name.startswith('head.'):
            continue
        if name.startswith('norm.'):
            if final_norm is not None:
                result[final_norm + name[len('norm'):]] = value
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


def official_release(checkpoint: dict) -> Optional[Tuple[str, Dict[str, Tensor], str]]:
    """Recognise an official NAT/DiNAT, BOAT-Swin or BOAT-CSWin release.

    Returns:
        tuple | None: ``(family, weights under the release's names, description)``, or None
        when the checkpoint is not laid out as one of the releases.
    """
    if isinstance(checkpoint.get('model'), dict) and 'state_dict' not in checkpoint:
        weights = extract_state_dict(checkpoint, ('model', ))
        if _family_of(weights) == 'boat_swin':
            return ('boat_swin', weights,
                    'an official BOAT-Swin checkpoint (weights under "model")')
    if 'args' in checkpoint and isinstance(checkpoint.get('state_dict'), dict):
        weights = extract_state_dict(checkpoint, ('state_dict', ))
        if _family_of(weights) == 'boat_cswin':
            return 'boat_cswin', weights, 'an official BOAT-CSWin (timm) checkpoint'
    if not isinstance(checkpoint.get('state_dict'), dict):
        weights = extract_state_dict(checkpoint, ())
        if _family_of(weights) == 'nat' and any(k.startswith('head.') for k in weights):
            return ('nat', weights,
                    'an official NAT/DiNAT classification checkpoint (timm names)')
    return None


def official_to_classifier(family: str, weights: Dict[str, Tensor],
                           num_stages: int = 4) -> Dict[str, Tensor]:
    """An official release's weights as an mmpretrain ``ImageClassifier``'s (``backbone.*``
    with the final norm as ``norm{last}``, ``head.fc.*``): the converters' classification
    mapping, in memory."""
    result = OrderedDict()
    backbone = _official_backbone_keys(family, weights, final_norm=f'norm{num_stages - 1}')
    for name, value in backbone.items():
        result['backbone.' + name] = value
    for name, value in weights.items():
        if name.startswith('head.'):
            result['head.fc.' + name[len('head.'):]] = value
    return result


def read_backbone_weights(checkpoint: dict, prefix: str = '',
                          final_norm: Optional[str] = None
                          ) -> Tuple[Dict[str, Tensor], str, Optional[str]]:
    """The backbone weights in a loaded checkpoint, whatever its layout.

    Args:
        checkpoint (dict): A loaded checkpoint.
        prefix (str): The backbone's key prefix in mmengine / converted checkpoints
            (e.g. ``'backbone.'``). Defaults to ``''``.
        final_norm (str, optional): The backbone's output norm that an official release's final
            ``norm`` (or that of a release converted in memory) goes to; None for a dense
            backbone, whose output norms then start fresh. Defaults to None.

    Returns:
        tuple: ``(weights, description, family)``: the tensors under the backbone's own names,
        what the checkpoint looks like (for messages) and the backbone family its keys belong
        to (None when unknown).
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'expected a dict checkpoint, got {type(checkpoint).__name__}')
    release = official_release(checkpoint)
    if release is not None:
        family, weights, what = release
        return _official_backbone_keys(family, weights, final_norm), what, family
    weights = extract_state_dict(checkpoint, ('state_dict', 'model'))
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    if prefix and any(k.startswith(prefix) for k in weights):
        own = OrderedDict((k[len(prefix):], v) for k, v in weights.items() if k.startswith(prefix))
        released_norm = meta.get('official_final_norm')
        if released_norm and released_norm != final_norm:
            # A release converted in memory (an official URL): its final norm is not a dense
            # backbone's output norm.
            own = OrderedDict((k, v) for k, v in own.items()
                              if k.split('.', 1)[0] != released_norm)
        if 'official_release' in meta:
            what = f'{meta["official_release"]}, converted in memory'
        elif 'converter' in meta:
            what = f'a checkpoint converted by mmboat (keys under "{prefix}")'
        else:
            what = f'an mmengine/mmboat checkpoint (keys under "{prefix}")'
        return own, what, _family_of(own)
    family = _family_of(weights)
    top = sorted(checkpoint)[:8]
    if family is not None:
        return weights, f'a {FAMILIES[family][0]} checkpoint without the "{prefix}" prefix', family
    return weights, f'an unrecognised checkpoint (top-level keys: {top})', None


def _as_classifier(checkpoint, source: str):
    """An official classification release as an mmpretrain classifier's checkpoint (converted
    in memory); anything else (mmengine checkpoints, converted files, the det/seg releases,
    which already use mmdet/mmseg names) as it is."""
    release = official_release(checkpoint) if isinstance(checkpoint, dict) else None
    if release is None:
        return checkpoint
    family, weights, what = release
    return {'state_dict': official_to_classifier(family, weights),
            'meta': {'official_release': what, 'official_final_norm': 'norm3',
                     'source': source}}


def _load_official_url(filename: str, map_location=None) -> dict:
    """mmengine checkpoint loader for the official release URLs (weights-only download into
    torch.hub's cache, then :func:`_as_classifier`)."""
    from mmengine.runner.checkpoint import load_from_http

    return _as_classifier(load_from_http(filename, map_location=map_location), filename)


_local_loader = []  # mmengine's own loader of local files, wrapped once


def _load_local(filename: str, map_location=None) -> dict:
    """mmengine's local-file loader, then :func:`_as_classifier`: an official release given by
    path (``load_from``, ``tools/test.py``, ``init_cfg``) loads like a converted file."""
    return _as_classifier(_local_loader[0](filename, map_location), filename)


def register_official_url_loader() -> None:
    """Make mmengine's ``load_checkpoint`` / ``CheckpointLoader`` read official releases, by
    URL or local path, through :func:`_as_classifier` (``load_from``, ``init_cfg``, mmpretrain's
    ``get_model(..., pretrained=True)``). Idempotent."""
    from mmengine.runner.checkpoint import CheckpointLoader

    if _local_loader:
        return
    _local_loader.append(CheckpointLoader._schemes[''])
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local, force=True)
    CheckpointLoader.register_scheme(prefixes=list(OFFICIAL_URL_PREFIXES),
                                     loader=_load_official_url, force=True)


def compare_weights(own: Dict[str, Tensor], weights: Dict[str, Tensor]) -> tuple:
    """Match checkpoint ``weights`` to a module's state dict ``own`` by name and shape.

    Returns:
        tuple: ``(matched, missing, mismatched, unexpected, coverage)``: the loadable tensors,
        the module's keys absent from / of another shape in the checkpoint, the checkpoint's
        keys the module lacks, and the fraction of the module's elements that would load.
    """
    matched = OrderedDict((k, v) for k, v in weights.items()
                          if k in own and tuple(v.shape) == tuple(own[k].shape))
    missing = [k for k in own if k not in weights]
    mismatched = [k for k in own if k in weights and k not in matched]
    unexpected = [k for k in weights if k not in own]
    total = sum(t.numel() for t in own.values())
    coverage = sum(own[k].numel() for k in matched) / max(total, 1)
    return matched, missing, mismatched, unexpected, coverage


def _output_norm(name: str) -> bool:
    head = name.split('.', 1)[0]
    return head.startswith('norm') and head[4:].isdigit()


def _diagnosis(cls: str, family: str, what: str, found: Optional[str],
               weights: Dict[str, Tensor], own: Dict[str, Tensor], missing: List[str],
               mismatched: List[str], prefix_hint: str) -> str:
    """Why weights (``what``, keys of backbone ``found``) do not fit backbone ``cls`` of
    ``family``, and the fix."""
    name, converter, _ = FAMILIES[family]
    if found is not None and found != family:
        return (f'it looks like {what} of a {FAMILIES[found][0]} model, given to {cls} '
                f'({name}): use a {name} checkpoint, or the {FAMILIES[found][0]} backbone for '
                'these weights')
    if found == family:
        shapes = ', '.join(f'{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}'
                           for k in mismatched[:3])
        return (f'it looks like {what} of another {name} architecture (e.g. NAT-Mini weights '
                f'in NAT-Tiny; checkpoint vs model shapes: {shapes or "n/a"}, missing '
                f'{missing[:3]}): set the arch that matches the checkpoint')
    return (f'it looks like {what}. Give an official {name} release or its conversion '
            f'(tools/model_converters/{converter}), and {prefix_hint}')


def load_pretrained_backbone(backbone: nn.Module, family: str, checkpoint: str,
                             prefix: Optional[str] = None, map_location: str = 'cpu',
                             allow_partial: bool = False,
                             final_norm: Optional[str] = None) -> Dict[str, List[str]]:
    """Load ``checkpoint`` into ``backbone`` (see the module docstring).

    Args:
        backbone (nn.Module): The backbone.
        family (str): Its family, a key of :data:`FAMILIES`.
        checkpoint (str): Path or URL.
        prefix (str, optional): The backbone's key prefix in the checkpoint. Defaults to None.
        map_location (str): Where to load tensors. Defaults to ``'cpu'``.
        allow_partial (bool): Load whatever matches, however little. Defaults to False.
        final_norm (str, optional): See :func:`read_backbone_weights`. Defaults to None.

    Returns:
        dict: ``missing``, ``mismatched`` and ``unexpected`` key lists.

    Raises:
        RuntimeError: Less than half of the backbone would be loaded and not ``allow_partial``.
    """
    from mmengine.logging import print_log
    from mmengine.runner.checkpoint import CheckpointLoader

    loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location,
                                              logger='current')
    weights, what, found = read_backbone_weights(loaded, prefix or '', final_norm)
    cls = type(backbone).__name__
    own = backbone.state_dict()
    matched, missing, mismatched, unexpected, coverage = compare_weights(own, weights)
    if coverage < MIN_COVERAGE and not allow_partial:
        diagnosis = _diagnosis(cls, family, what, found, weights, own, missing, mismatched,
                               f'check the init_cfg prefix ({prefix!r})')
        raise RuntimeError(
            f'{cls}: init_cfg Pretrained checkpoint {checkpoint!r} would load only '
            f'{100 * coverage:.0f}% of the backbone ({len(matched)} of {len(own)} tensors; '
            f'{len(missing)} missing, {len(mismatched)} shape-mismatched); training would start '
            f'from random weights. {diagnosis}. For a deliberate partial load add '
            'allow_partial=True to the init_cfg.')
    with partial_loads_allowed():  # checked above
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


def check_model_checkpoint(model: nn.Module, checkpoint: str, allow_partial: bool = False,
                           map_location: str = 'cpu') -> float:
    """Stop before a whole model (a runner's ``load_from``, ``tools/test.py``) starts from a
    checkpoint that would leave most of it unloaded, which mmengine's ``strict=False`` loading
    only reports as missing keys.

    Args:
        model (nn.Module): The model (a DDP wrapper is unwrapped).
        checkpoint (str): Path or URL (official releases are converted as mmengine loads them).
        allow_partial (bool): Only report. Defaults to False.
        map_location (str): Where to load tensors. Defaults to ``'cpu'``.

    Returns:
        float: the fraction of the model's elements the checkpoint covers.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    model = getattr(model, 'module', model)
    loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location,
                                              logger='current')
    weights = extract_state_dict(loaded, ('state_dict', )) if isinstance(loaded, dict) else {}
    *_, missing, mismatched, _, coverage = compare_weights(model.state_dict(), weights)
    if coverage >= MIN_COVERAGE or allow_partial:
        return coverage
    cls = type(model).__name__
    backbone = getattr(model, 'backbone', None)
    family = getattr(backbone, 'checkpoint_family', None)
    _, what, found = read_backbone_weights(loaded, 'backbone.') if isinstance(
        loaded, dict) else (None, f'a {type(loaded).__name__}', None)
    if found is not None and family is not None and found != family:
        diagnosis = (f'it looks like {what} of a {FAMILIES[found][0]} model, given to a '
                     f'{FAMILIES[family][0]} {cls}')
    else:
        diagnosis = f'it looks like {what}'
    raise RuntimeError(
        f'{cls}: checkpoint {checkpoint!r} would load only {100 * coverage:.0f}% of the model '
        f'({len(missing)} tensors missing, {len(mismatched)} shape-mismatched, e.g. '
        f'{(missing + mismatched)[:3]}); {diagnosis}. Give the checkpoint that belongs to this '
        'config (a classification release or conversion goes in the backbone init_cfg, not in '
        'load_from), or pass --allow-partial-checkpoint for a deliberate partial load.')


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
        # A classification backbone (only the last stage out) takes a release's final norm.
        last = self.num_stages - 1  # type: ignore[attr-defined]
        final_norm = f'norm{last}' if tuple(self.out_indices) == (last, ) else None  # type: ignore
        load_pretrained_backbone(self, self.checkpoint_family, cfg['checkpoint'],  # type: ignore
                                 cfg.get('prefix'), cfg.get('map_location', 'cpu'),
                                 bool(cfg.get('allow_partial', False)), final_norm)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """Stop any load (mmengine's ``strict=False`` ones included) that would fill less than
        half of this backbone, before a run starts from random weights."""
        if not _partial_allowed():
            check_state_dict_load(self, state_dict, prefix)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs)


def check_state_dict_load(backbone: nn.Module, state_dict: Dict[str, Tensor],
                          prefix: str) -> None:
    """Raise when ``state_dict`` (a whole model's, the backbone's keys under ``prefix``) would
    fill less than half of ``backbone`` by element count.

    Raises:
        RuntimeError: Names what the weights look like and the fix.
    """
    own = backbone.state_dict()
    weights = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items()
                          if k.startswith(prefix))
    matched, missing, mismatched, _, coverage = compare_weights(own, weights)
    if coverage >= MIN_COVERAGE:
        return
    cls = type(backbone).__name__
    if not state_dict:
        what, found = f'no weights under {prefix!r}', None
    elif weights:
        found, what = _family_of(weights), f'weights under {prefix!r}'
    else:
        _, what, found = read_backbone_weights({'state_dict': state_dict}, prefix)
        if found is None:
            what = f'weights with no key under {prefix!r} (e.g. {list(state_dict)[:3]})'
    diagnosis = _diagnosis(cls, getattr(backbone, 'checkpoint_family'), what, found, weights,
                           own, missing, mismatched,
                           f'check that the keys carry the prefix {prefix!r}')
    raise RuntimeError(
        f'{cls}: the weights being loaded would fill only {100 * coverage:.0f}% of the '
        f'backbone at {prefix!r} ({len(matched)} of {len(own)} tensors; {len(missing)} missing, '
        f'{len(mismatched)} shape-mismatched), so it would run from random weights; '
        f'{diagnosis}. A classification checkpoint for a detection/segmentation model goes in '
        "the backbone's init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.'), "
        f'not in load_from. For a deliberate partial load set {ALLOW_PARTIAL_ENV}=1 (mmboat\'s '
        'tools: --allow-partial-checkpoint).')
