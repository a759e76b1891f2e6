# Faster R-CNN R-50-FPN with the CBN paper's box head: 4 shared 3x3 convs (256 channels) + 1 fc
# (mmdet's Shared4Conv1FCBBoxHead) instead of mmdet's default 2fc head. No norm in the neck or
# heads here: that is the paper's baseline row ('-'); the norm configs add `norm_cfg` to the FPN and
# to this head. The backbone is mmdet's: ImageNet (torchvision) weights, BN frozen (norm_eval=True,
# frozen_stages=1), in every row.
_base_ = 'mmdet::_base_/models/faster-rcnn_r50_fpn.py'

model = dict(
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=None)))
