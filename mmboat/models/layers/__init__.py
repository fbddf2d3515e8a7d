__all__ = []
from .neighborhood_attention import NeighborhoodAttention2d

__all__ += ['NeighborhoodAttention2d']
from .cswin_attention import StripeAttention
from .feature_space_attention import (FSLA_CFG_KEYS, FeatureSpaceLocalAttention,
                                      fsla_sublayer, resolve_fsla_cfg)
from .window_attention import ShiftedWindowAttention, WindowMultiheadAttention

__all__ += [
    'FSLA_CFG_KEYS', 'FeatureSpaceLocalAttention', 'fsla_sublayer', 'resolve_fsla_cfg',
    'ShiftedWindowAttention',
    'StripeAttention', 'WindowMultiheadAttention'
]
