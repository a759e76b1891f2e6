# Faster R-CNN R-50-FPN with GN + WS everywhere (Qiao et al., arXiv 1903.10520): weight-standardized
# convs + GroupNorm(32) in the backbone, the FPN and the 4conv1fc box head
# (configs/_base_/norms/gn_ws.py). Same schedule and batch as the CBN-paper rows (1x, 4 GPUs x 4 images,
# lr 0.02), so it sits beside them in one table.
# The backbone starts from the WS authors' ImageNet GN+WS ResNet-50 (`ws_pretrained_r50`): WS convs
# need WS-pretrained weights, see configs/_base_/norms/gn_ws.py and docs/reproduce_coco.md.
# GN is no _BatchNorm, so the backbone's norm_eval=True leaves it training (stem + stage 1 frozen).
_base_ = ['../_base_/faster_rcnn_r50_fpn_4conv1fc_1x_coco.py', '../_base_/norms/gn_ws.py']

model = dict(
    backbone=dict(
        conv_cfg=_base_.conv_cfg,
        norm_cfg=_base_.norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint=_base_.ws_pretrained_r50)),
    neck=dict(conv_cfg=_base_.conv_cfg, norm_cfg=_base_.norm_cfg),
    roi_head=dict(bbox_head=dict(conv_cfg=_base_.conv_cfg, norm_cfg=_base_.norm_cfg)))
