"""Data for the demo and the tests: a synthetic COCO-format instance-segmentation dataset.

The generated data is read by mmdet's own ``CocoDataset`` (``metainfo=dict(classes=SYNTHETIC_CLASSES)``),
so nothing is registered here.
"""
from .synthetic_coco import (
    DEFAULT_PARAMS,
    MARK_FILE,
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    SyntheticDataError,
    ensure_synthetic_coco,
    generate_synthetic_coco,
    read_mark,
    synthetic_params,
)

__all__ = ['SYNTHETIC_CLASSES', 'SYNTHETIC_PALETTE', 'DEFAULT_PARAMS', 'MARK_FILE', 'SyntheticDataError',
           'generate_synthetic_coco', 'ensure_synthetic_coco', 'synthetic_params', 'read_mark']
