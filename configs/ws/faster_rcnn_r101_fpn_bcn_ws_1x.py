# Faster R-CNN R-101-FPN with BCN + WS: faster_rcnn_r50_fpn_bcn_ws_1x.py with the BCN authors' ImageNet
# BCN+WS ResNet-101, converted (`bcn_ws_pretrained_r101` in configs/_base_/norms/bcn_ws.py).
_base_ = './faster_rcnn_r50_fpn_bcn_ws_1x.py'

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained', checkpoint=_base_.bcn_ws_pretrained_r101)))
