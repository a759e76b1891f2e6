"""The demo's runs: which configs, which are required, what counts as learning."""

__all__ = ['VARIANTS', 'REQUIRED', 'UNTRAINED', 'MIN_AP_GAIN']

# name -> (norm in the FPN and the RoI heads, config relative to the checkout)
VARIANTS = {
    'baseline': ('–', 'configs/demo/mask_rcnn_r18_fpn_baseline_demo.py'),
    'cbn': ('CBN', 'configs/demo/mask_rcnn_r18_fpn_cbn_demo.py'),
    'gn': ('GN', 'configs/demo/mask_rcnn_r18_fpn_gn_demo.py'),
    'syncbn': ('SyncBN', 'configs/demo/mask_rcnn_r18_fpn_syncbn_demo.py'),
}
REQUIRED = ('baseline', 'cbn')
UNTRAINED = 'untrained'
# A trained model must beat the untrained one by this much box AP (in [0, 1]) to count as learning.
MIN_AP_GAIN = 0.05
