"""Data for the demo and the tests: a synthetic COCO-format instance-segmentation dataset.

The generated data is read by mmdet's own ``CocoDataset`` (``metainfo=dict(classes=SYNTHETIC_CLASSES)``),
so nothing is registered here.
"""
from .synthetic_coco import (
    DEFAULT_PARAMS,
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    ensure_synthetic_coco,
    generate_synthetic_coco,
    synthetic_params,
)

__all__ = ['SYNTHETIC_CLASSES', 'SYNTHETIC_PALETTE', 'DEFAULT_PARAMS', 'generate_synthetic_coco',
           'ensure_synthetic_coco', 'synthetic_params']
