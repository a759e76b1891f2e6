# Mask R-CNN R-50-FPN, CBN buffer3 with a burn-in of 8 ITERATIONS: the official code's effective
# behaviour, not the paper's intent. The official CBatchNorm2d counts `burnin=8` in training forwards
# of each layer, so its window starts at the 9th iteration; the paper describes 8 epochs of a 12-epoch
# schedule, which is mask_rcnn_r50_fpn_cbn_buffer3_burnin8_1x.py (the paper's CBN row, via
# CBNBurnInHook). Here: the layer's own burnin=8 and no hook (configs/_base_/norms/cbn_buffer3_burnin8iter.py).
# Norm placement as in every CBN-paper row: the FPN, the 4conv1fc box head and the 4conv mask head;
# frozen-BN backbone.
_base_ = [
    '../_base_/mask_rcnn_r50_fpn_4conv1fc_4conv_1x_coco.py',
    '../_base_/norms/cbn_buffer3_burnin8iter.py',
]

model = dict(
    neck=dict(norm_cfg=_base_.norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=_base_.norm_cfg),
        mask_head=dict(norm_cfg=_base_.norm_cfg)))
