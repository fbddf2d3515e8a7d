"""mmboat: neighborhood attention (NAT/DiNAT) and bilateral local attention (BOAT) backbones
for mmdet, mmseg and mmpretrain.

Importing ``mmboat`` stays light: it does not import mmdet, mmseg or mmpretrain. Configs pull
the backbones in with ``custom_imports = dict(imports=['mmboat.models'])``.
"""
from .version import __version__, version_info

__all__ = ['__version__', 'version_info']
