"""Small building blocks shared by mmboat's backbones."""
from .drop_path import DropPath, drop_path

__all__ = ['DropPath', 'drop_path']
from .pretrained import PretrainedMixin, load_pretrained_backbone, read_backbone_weights

__all__ += ['PretrainedMixin', 'load_pretrained_backbone', 'read_backbone_weights']
from .backbone import (DEFAULT_INIT_CFG, FrozenStagesMixin, FSLABackboneMixin,
                       HierarchicalBackbone, check_block_indices, check_out_indices,
                       checkpoint_forward, freeze_modules, layer_depth, linear_drop_path,
                       parse_arch, set_norms_eval)
from .mlp import MLP

__all__ += [
    'DEFAULT_INIT_CFG', 'FrozenStagesMixin', 'FSLABackboneMixin', 'HierarchicalBackbone',
    'check_block_indices', 'check_out_indices', 'checkpoint_forward', 'freeze_modules',
    'layer_depth', 'linear_drop_path', 'parse_arch', 'set_norms_eval', 'MLP'
]
