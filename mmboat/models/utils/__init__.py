"""Small building blocks shared by mmboat's backbones."""
from .drop_path import DropPath, drop_path

__all__ = ['DropPath', 'drop_path']
from .backbone import FrozenStagesMixin, freeze_modules, layer_depth, set_norms_eval

__all__ += ['FrozenStagesMixin', 'freeze_modules', 'layer_depth', 'set_norms_eval']
from .pretrained import PretrainedMixin, load_pretrained_backbone, read_backbone_weights

__all__ += ['PretrainedMixin', 'load_pretrained_backbone', 'read_backbone_weights']
