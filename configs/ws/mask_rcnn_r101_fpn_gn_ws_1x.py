# Mask R-CNN R-101-FPN with GN + WS: mask_rcnn_r50_fpn_gn_ws_1x.py with the WS authors' ImageNet
# GN+WS ResNet-101 (`ws_pretrained_r101` in configs/_base_/norms/gn_ws.py).
_base_ = './mask_rcnn_r50_fpn_gn_ws_1x.py'

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained', checkpoint=_base_.ws_pretrained_r101)))
