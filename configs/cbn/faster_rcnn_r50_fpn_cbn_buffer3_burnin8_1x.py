# CBN paper, Faster R-CNN R-50-FPN, norm CBN buffer3/burnin8 (box AP 37.6).
# The norm (configs/_base_/norms/cbn_buffer3_burnin8.py) goes into the FPN (lateral + output convs) and the
# 4conv1fc box head; the backbone keeps its frozen BN.
_base_ = ['../_base_/faster_rcnn_r50_fpn_4conv1fc_1x_coco.py', '../_base_/norms/cbn_buffer3_burnin8.py']

model = dict(
    neck=dict(norm_cfg=_base_.norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=_base_.norm_cfg)))
