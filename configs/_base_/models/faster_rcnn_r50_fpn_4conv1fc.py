# Faster R-CNN R-50-FPN with the CBN paper's box head: 4 shared 3x3 convs (256 channels) + 1 fc
# (mmdet's Shared4Conv1FCBBoxHead) instead of mmdet's default 2fc head.
# No norm in the FPN or the head: this is the paper's baseline row ('-'). `norm_cfg` is left out (i.e.
# None) rather than written as None, because a norm config merges a dict into it and mmengine refuses
# to merge a dict into an explicit None. The backbone is mmdet's: torchvision ImageNet weights, BN
# frozen (norm_eval=True, frozen_stages=1) -- the same in every row.
_base_ = 'mmdet::_base_/models/faster-rcnn_r50_fpn.py'

model = dict(
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256)))
