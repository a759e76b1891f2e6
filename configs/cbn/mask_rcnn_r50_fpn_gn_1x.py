# CBN paper, Mask R-CNN R-50-FPN, norm GN (box AP 38.5, mask AP 35.0).
# The norm (configs/_base_/norms/gn.py) goes into the FPN (lateral + output convs), the
# 4conv1fc box head and the 4conv mask head; the backbone keeps its frozen BN.
_base_ = ['../_base_/mask_rcnn_r50_fpn_4conv1fc_4conv_1x_coco.py', '../_base_/norms/gn.py']

model = dict(
    neck=dict(norm_cfg=_base_.norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=_base_.norm_cfg),
        mask_head=dict(norm_cfg=_base_.norm_cfg)))
