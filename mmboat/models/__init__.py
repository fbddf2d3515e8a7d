"""mmboat models: importing this registers every backbone in :data:`mmboat.registry.MODELS`."""
from . import backbones, layers  # noqa: F401
from .backbones import *  # noqa: F401,F403
from .layers import *  # noqa: F401,F403
