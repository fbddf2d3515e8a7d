"""mmboat's model index for mim and mmpretrain's model hub.

``model-index.yml`` (repository root; ``mmboat/.mim/`` in an installed package) imports the
``configs/*/metafile.yml`` files, which name each model, its config, its reported results and the
official release URL of its weights. :func:`register_with_mmpretrain` adds them to
``mmpretrain.apis.ModelHub``, so ``mmpretrain.list_models('*nat*')``,
``get_model('nat-tiny_8xb128_in1k', pretrained=True)`` and the inferencers accept mmboat's model
names. The names are the config stems, as in mmpretrain's own metafiles; every ImageNet-1K
classification model also answers to its short name without the GPU x batch part
(``nat-tiny_in1k``, ``boat-cswin-tiny_in1k``, ``dinat-large_in21k-pre_in1k``).
It runs when ``mmpretrain.apis`` is imported in an environment with mmboat's start-up hook
(:mod:`mmboat._startup`) and when ``mmboat.models`` is imported after mmpretrain.
"""
import os.path as osp
import re
import sys
from typing import Optional

__all__ = ['model_index_path', 'register_with_mmpretrain', 'short_name']

_GPUS_X_BATCH = re.compile(r'^(?P<model>.+)_\d+xb\d+_in1k$')

_registered = []


def model_index_path() -> Optional[str]:
    """``model-index.yml``: shipped in ``mmboat/.mim/`` or at the root of a source checkout."""
    package = osp.dirname(osp.dirname(osp.abspath(__file__)))
    for candidate in (osp.join(package, '.mim', 'model-index.yml'),
                      osp.join(osp.dirname(package), 'model-index.yml')):
        if osp.isfile(candidate):
            return candidate
    return None


def short_name(name: str) -> Optional[str]:
    """``nat-tiny_8xb128_in1k`` -> ``nat-tiny_in1k``; None for a name without a GPU x batch
    part before ``_in1k`` (detection / segmentation models)."""
    match = _GPUS_X_BATCH.match(name.lower())
    return None if match is None else match.group('model') + '_in1k'


def register_with_mmpretrain() -> bool:
    """Register mmboat's models with mmpretrain's model hub (idempotent).

    Returns:
        bool: True when mmboat's models are registered.
    """
    if _registered:
        return True
    path = model_index_path()
    if path is None:
        return False
    from mmpretrain.apis.model import ModelHub

    from modelindex.load_model_index import load

    ModelHub.register_model_index(path, config_prefix=osp.dirname(path))
    index = load(path)
    index.build_models_with_collections()
    for model in index.models:
        alias = short_name(model.name)
        # The hub has no alias field: the short name maps to the same entry.
        if alias is not None and alias not in ModelHub._models_dict:
            ModelHub._models_dict[alias] = ModelHub._models_dict[model.name.lower()]
    _registered.append(path)
    return True


def register_if_mmpretrain_loaded() -> None:
    """:func:`register_with_mmpretrain` when mmpretrain's apis are already imported."""
    if 'mmpretrain.apis.model' in sys.modules:
        register_with_mmpretrain()
