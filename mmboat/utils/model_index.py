"""mmboat's model index for mim and mmpretrain's model hub.

``model-index.yml`` (repository root; ``mmboat/.mim/`` in an installed package) imports the
``configs/*/metafile.yml`` files, which name each model, its config, its reported results and the
official release URL of its weights. :func:`register_with_mmpretrain` adds them to
``mmpretrain.apis.ModelHub``, so ``mmpretrain.list_models('*nat*')``,
``get_model('nat-tiny_in1k', pretrained=True)`` and the inferencers accept mmboat's model names.
It runs when ``mmpretrain.apis`` is imported in an environment with mmboat's start-up hook
(:mod:`mmboat._startup`) and when ``mmboat.models`` is imported after mmpretrain.
"""
import os.path as osp
import sys
from typing import Optional

__all__ = ['model_index_path', 'register_with_mmpretrain']

_registered = []


def model_index_path() -> Optional[str]:
    """``model-index.yml``: shipped in ``mmboat/.mim/`` or at the root of a source checkout."""
    package = osp.dirname(osp.dirname(osp.abspath(__file__)))
    for candidate in (osp.join(package, '.mim', 'model-index.yml'),
                      osp.join(osp.dirname(package), 'model-index.yml')):
        if osp.isfile(candidate):
            return candidate
    return None


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

    ModelHub.register_model_index(path, config_prefix=osp.dirname(path))
    _registered.append(path)
    return True


def register_if_mmpretrain_loaded() -> None:
    """:func:`register_with_mmpretrain` when mmpretrain's apis are already imported."""
    if 'mmpretrain.apis.model' in sys.modules:
        register_with_mmpretrain()
