"""Small building blocks shared by mmboat's backbones."""
from .drop_path import DropPath, drop_path

__all__ = ['DropPath', 'drop_path']
