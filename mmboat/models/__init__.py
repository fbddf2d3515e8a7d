"""mmboat models: importing this registers every backbone in :data:`mmboat.registry.MODELS`.

It also allow-lists mmengine's checkpoint types for torch's weights-only loading
(:func:`mmboat.utils.compat.fix_checkpoint_loading`), so a config whose ``custom_imports`` names
``mmboat.models`` can resume, test and run the downstream inferencers on checkpoints that
mmengine saved, and makes mmengine read the official release URLs (converting the
classification releases in memory, :mod:`mmboat.models.utils.pretrained`). It is also the one
point where mmboat's FLOP handles join mmengine's analyzers
(:func:`mmboat.ops.flops.register_flop_handles`).
"""
from mmboat.ops.flops import register_flop_handles
from mmboat.utils.compat import fix_checkpoint_loading
from mmboat.utils.model_index import register_if_mmpretrain_loaded

from . import backbones, layers  # noqa: F401
from .utils.pretrained import register_official_url_loader
from .backbones import *  # noqa: F401,F403
from .layers import *  # noqa: F401,F403

fix_checkpoint_loading()
register_official_url_loader()
register_if_mmpretrain_loaded()
register_flop_handles()
