# Demo, norm CBN buffer3: the demo baseline (mask_rcnn_r18_fpn_baseline_demo.py) with Cross-Iteration
# BN (configs/_base_/norms/cbn_buffer3_burnin8.py: window of the current + 3 previous iterations) in the
# FPN, the 4conv1fc box head and the 4conv mask head, placed as in
# configs/cbn/mask_rcnn_r50_fpn_cbn_buffer3_burnin8_1x.py.
#
# Burn-in as the same fraction of the schedule as the paper's 8 of 12 epochs: plain BN for the first
# 8/12 of the epochs (CBNBurnInHook), then the compensated window.
_base_ = ['./mask_rcnn_r18_fpn_baseline_demo.py', '../_base_/norms/cbn_buffer3_burnin8.py']

model = dict(
    neck=dict(norm_cfg=_base_.norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=_base_.norm_cfg),
        mask_head=dict(norm_cfg=_base_.norm_cfg)))

custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=round(_base_.max_epochs * 8 / 12))]
