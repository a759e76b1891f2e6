# Demo, norm GN: the demo baseline (mask_rcnn_r18_fpn_baseline_demo.py) with GroupNorm(32)
# (configs/_base_/norms/gn.py) in the FPN, the 4conv1fc box head and the 4conv mask head, placed as in
# configs/cbn/mask_rcnn_r50_fpn_gn_1x.py.
_base_ = ['./mask_rcnn_r18_fpn_baseline_demo.py', '../_base_/norms/gn.py']

model = dict(
    neck=dict(norm_cfg=_base_.norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=_base_.norm_cfg),
        mask_head=dict(norm_cfg=_base_.norm_cfg)))
