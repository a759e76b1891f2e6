"""mmdet side of cbn_mmdet: registration of the layers and conv finders for mmcv/mmdet blocks."""
from . import conv_finders, registry  # noqa: F401  (imported for their side effects)
from .registry import CONV_LAYERS, NORM_LAYERS

__all__ = ['NORM_LAYERS', 'CONV_LAYERS']
