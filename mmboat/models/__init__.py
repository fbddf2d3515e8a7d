"""mmboat models: importing this registers every backbone in :data:`mmboat.registry.MODELS`.

It also allow-lists mmengine's checkpoint types for torch's weights-only loading
(:func:`mmboat.utils.compat.fix_checkpoint_loading`), so a config whose ``custom_imports`` names
``mmboat.models`` can resume, test and run the downstream inferencers on checkpoints that
mmengine saved.
"""
from mmboat.utils.compat import fix_checkpoint_loading

from . import backbones, layers  # noqa: F401
from .backbones import *  # noqa: F401,F403
from .layers import *  # noqa: F401,F403

fix_checkpoint_loading()
