"""cbn_mmdet: small-batch normalization layers for mmdetection 3.x.

``import cbn_mmdet`` (or ``custom_imports=dict(imports=['cbn_mmdet'], allow_failed_imports=False)`` in a
config) registers the norm layers (CBN, SyncCBN, SyncBN, BCN, MABN), the convs (WSConv, CenConv) and the
hooks in mmengine's root registries, so every mmdet ``norm_cfg``/``conv_cfg``/``custom_hooks`` finds them.

``cbn_mmdet.ops`` holds the pure-torch cores and imports with torch alone; registration happens only
when mmengine and mmcv are installed.
"""
from importlib.util import find_spec

from .compat import TESTED_TORCH, check_torch_version

__version__ = '0.1.0'

# A torch outside the tested range installs (no upper bound in the dependencies) but is told so once.
check_torch_version()

if find_spec('mmengine') is not None and find_spec('mmcv') is not None:
    from . import engine, models  # noqa: F401  (imported for their registrations)

    # mmcv's fuse_conv_bn / efficient_conv_bn_eval would silently mis-fold WS convs, CBN and BCN:
    # from here on they fold those exactly (plain conv + BN pairs still take mmcv's own code).
    from .deploy.fuse_norm import install_mmcv_fold_guard
    install_mmcv_fold_guard()

__all__ = ['TESTED_TORCH', 'check_torch_version', '__version__']
