# Mask R-CNN R-101-FPN, same setting as mask_rcnn_r50_fpn_1x.py with a ResNet-101 backbone
# (torchvision ImageNet weights, frozen BN). The paper reports R-50 only; this row extends it.
_base_ = './mask_rcnn_r50_fpn_1x.py'

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet101')))
