# CBN paper, Mask R-CNN R-50-FPN, norm '-' (box AP 37.6, mask AP 34.0): the 4conv1fc box head and the
# 4conv mask head without any norm in the FPN or the heads; frozen-BN ImageNet backbone; 4 GPUs x 4
# images, lr 0.02, 1x.
_base_ = '../_base_/mask_rcnn_r50_fpn_4conv1fc_4conv_1x_coco.py'
