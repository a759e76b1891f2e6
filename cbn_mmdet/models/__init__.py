"""mmdet side of cbn_mmdet: the registration of layers, convs and hooks, and the conv finders that bind
CBN inside mmcv/mmdet blocks."""
from . import conv_finders  # noqa: F401  (imported for its finder registrations)
from .registry import (
    CBN_TYPES,
    CONV_LAYERS,
    HOOK_TYPES,
    NORM_LAYERS,
    NOT_SYNCBN_CONVERTIBLE,
    SYNC_NORM_TYPES,
    register_all,
)

__all__ = ['NORM_LAYERS', 'CONV_LAYERS', 'HOOK_TYPES', 'CBN_TYPES', 'SYNC_NORM_TYPES', 'NOT_SYNCBN_CONVERTIBLE',
           'register_all']
