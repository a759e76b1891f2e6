# Demo, norm CBN buffer3: the demo baseline (mask_rcnn_r18_fpn_baseline_demo.py) with Cross-Iteration
# BN (window of the current + 3 previous iterations, as configs/_base_/norms/cbn_buffer3_burnin8.py) in
# the FPN, the 4conv1fc box head and the 4conv mask head, placed as in
# configs/cbn/mask_rcnn_r50_fpn_cbn_buffer3_burnin8_1x.py. With tools/dist_train.sh CFG 2 each process
# has one image: CBN's statistics are those of one image per iteration over its window of 4.
#
# Burn-in as the same fraction of the schedule as the paper's 8 of 12 epochs: plain BN for the first
# 8/12 of the epochs (CBNBurnInHook), then the compensated window. The norm is written out here rather
# than inherited from _base_/norms/cbn_buffer3_burnin8.py because both that file and the demo baseline
# define custom_hooks (the baseline's PreciseBNHook is kept below).
_base_ = './mask_rcnn_r18_fpn_baseline_demo.py'

norm_cfg = dict(type='CBN', buffer_num=3, burnin=0, requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))

custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=round(_base_.max_epochs * 8 / 12)),
                _base_.precise_bn_hook]
