"""Deployment helpers: fold eval-mode norm layers into the convs that feed them."""
from .fuse_detector import build_detector, fuse_detector, verify_fused
from .fuse_norm import fold_norm_into_conv, fuse_norm_layers

__all__ = ['fuse_norm_layers', 'fold_norm_into_conv', 'build_detector', 'fuse_detector', 'verify_fused']
