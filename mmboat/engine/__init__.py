"""Training-loop pieces mmboat adds to mmengine: :class:`CPUAmpOptimWrapper` (registered as
``mmboat.CPUAmpOptimWrapper``; this package is the ``OPTIM_WRAPPERS`` node's import location)
and the runner set-up that mmboat's ``tools/train.py`` / ``tools/test.py`` share
(:mod:`mmboat.engine.runner_setup`, imported on its own by the tools)."""
from .optim_wrappers import CPUAmpOptimWrapper

__all__ = ['CPUAmpOptimWrapper']
