# GN row: GroupNorm with 32 groups (mmcv's `GN`), batch-independent.
# A leaf places `norm_cfg` (as `_base_.norm_cfg`) into the FPN and the RoI heads.
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
