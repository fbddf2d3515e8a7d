__all__ = []
from .nat import NAT, DiNAT

__all__ += ['NAT', 'DiNAT']
from .boat_cswin import BOATCSWinTransformer
from .boat_swin import BOATSwinTransformer

__all__ += ['BOATSwinTransformer', 'BOATCSWinTransformer']
