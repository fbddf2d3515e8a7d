"""Functional ops of mmboat: compiled (``torch.ops.mmboat.*``) with pure-PyTorch references."""
from .ext_loader import ext_error, ext_info, has_ext, requested_impl, use_ext

__all__ = ['ext_info', 'ext_error', 'has_ext', 'requested_impl', 'use_ext']
from .neighborhood_attention import (na1d, na2d, na2d_av, na2d_qk, na3d,
                                     neighborhood_attention_op_available)
from .neighborhood_attention_reference import (na1d_reference, na2d_av_reference,
                                               na2d_qk_reference, na2d_reference,
                                               na3d_reference)

__all__ += [
    'na1d', 'na2d', 'na3d', 'na2d_qk', 'na2d_av', 'neighborhood_attention_op_available',
    'na1d_reference', 'na2d_reference', 'na3d_reference', 'na2d_qk_reference',
    'na2d_av_reference'
]
from .feature_space_attention import (balanced_hierarchical_clustering, cluster_layout,
                                      clustered_attention, feature_space_local_attention)
from .feature_space_attention_reference import (balanced_hierarchical_clustering_reference,
                                                clustered_attention_reference)

__all__ += [
    'cluster_layout', 'balanced_hierarchical_clustering', 'clustered_attention',
    'feature_space_local_attention', 'balanced_hierarchical_clustering_reference',
    'clustered_attention_reference'
]
