# CBN paper, Faster R-CNN R-50-FPN, norm '-' (box AP 36.8): the 4conv1fc head without any norm in the
# FPN or the head; frozen-BN ImageNet backbone; 4 GPUs x 4 images, lr 0.02, 1x.
_base_ = '../_base_/faster_rcnn_r50_fpn_4conv1fc_1x_coco.py'
