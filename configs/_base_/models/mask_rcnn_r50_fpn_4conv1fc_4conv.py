# Mask R-CNN R-50-FPN with the CBN paper's heads: the 4conv1fc box head (see
# faster_rcnn_r50_fpn_4conv1fc.py) and a 4-conv mask head (FCNMaskHead, 4 x 3x3 convs of 256 channels).
# No norm in the FPN or the heads: the paper's baseline row ('-'); `norm_cfg` is left out (None) so that
# a norm config can merge a dict into it. Backbone: ImageNet weights, frozen BN, as in every row.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'

model = dict(
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256),
        mask_head=dict(
            type='FCNMaskHead',
            num_convs=4,
            conv_out_channels=256)))
