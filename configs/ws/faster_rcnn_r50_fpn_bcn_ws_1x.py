# Faster R-CNN R-50-FPN with BCN + WS everywhere (arXiv 1911.09738, 1903.10520): weight-standardized
# convs + Batch-Channel Normalization (32 groups, estimated statistics) in the backbone,
# the FPN and the 4conv1fc box head (configs/_base_/norms/bcn_ws.py).
# Same schedule and batch as the CBN-paper rows (1x, 4 GPUs x 4 images, lr 0.02).
# The backbone starts from the BCN authors' ImageNet BCN+WS ResNet-50, converted to mmdet's key layout
# (`bcn_ws_pretrained_r50`; see configs/_base_/norms/bcn_ws.py and docs/reproduce_coco.md).
# norm_eval=False: BCN is a _BatchNorm subclass, and norm_eval=True would keep it in eval mode, i.e.
# never update its estimated statistics on COCO. Stem + stage 1 stay frozen (frozen_stages=1).
_base_ = ['../_base_/faster_rcnn_r50_fpn_4conv1fc_1x_coco.py', '../_base_/norms/bcn_ws.py']

model = dict(
    backbone=dict(
        conv_cfg=_base_.conv_cfg,
        norm_cfg=_base_.norm_cfg,
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint=_base_.bcn_ws_pretrained_r50)),
    neck=dict(conv_cfg=_base_.conv_cfg, norm_cfg=_base_.norm_cfg),
    roi_head=dict(bbox_head=dict(conv_cfg=_base_.conv_cfg, norm_cfg=_base_.norm_cfg)))
