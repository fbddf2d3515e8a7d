"""mmboat's registry nodes.

Every mmboat module is registered once here, under the ``mmboat`` scope. Downstream configs refer
to them with the scope prefix (``type='mmboat.NAT'``), which resolves from mmdet, mmseg and
mmpretrain alike because the node is a child of mmengine's root registry.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmboat', locations=['mmboat.models'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmboat',
                          locations=['mmboat.engine'])

__all__ = ['MODELS', 'OPTIM_WRAPPERS']
