"""The demo's runs: which configs, which are required, what counts as learning."""

__all__ = ['VARIANTS', 'REQUIRED', 'BN_TYPE', 'REFERENCES', 'UNTRAINED', 'MIN_AP_GAIN']

# name -> (norm in the FPN and the RoI heads, config relative to the checkout); the order of the tables
VARIANTS = {
    'baseline': ('–', 'configs/demo/mask_rcnn_r18_fpn_baseline_demo.py'),
    'bn': ('BN', 'configs/demo/mask_rcnn_r18_fpn_bn_demo.py'),
    'syncbn': ('SyncBN', 'configs/demo/mask_rcnn_r18_fpn_syncbn_demo.py'),
    'gn': ('GN', 'configs/demo/mask_rcnn_r18_fpn_gn_demo.py'),
    'cbn': ('CBN', 'configs/demo/mask_rcnn_r18_fpn_cbn_demo.py'),
    'cbn_gtw': ('CBN, grad_through_window', 'configs/demo/mask_rcnn_r18_fpn_cbn_gtw_demo.py'),
}
REQUIRED = ('baseline', 'cbn')
# Variants whose FPN/head norm has running statistics (PreciseBN re-estimates them).
BN_TYPE = ('bn', 'syncbn', 'cbn', 'cbn_gtw')
# Every variant is compared with these (when they ran).
REFERENCES = ('baseline', 'bn')
UNTRAINED = 'untrained'
# A trained model must beat the untrained one by this much box AP (in [0, 1]) to count as learning.
MIN_AP_GAIN = 0.05
