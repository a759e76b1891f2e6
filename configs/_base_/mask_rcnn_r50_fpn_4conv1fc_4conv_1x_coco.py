# The CBN paper's Mask R-CNN R-50-FPN 1x setting without a norm in the neck/heads (the '-' row):
# model + COCO instance (4 images per GPU) + paper 1x schedule + runtime. Every Mask R-CNN config in
# configs/ starts here and adds a norm (configs/_base_/norms/) or a deeper backbone.
_base_ = [
    './models/mask_rcnn_r50_fpn_4conv1fc_4conv.py',
    './datasets/coco_instance_paper.py',
    './schedules/paper_1x.py',
    './default_runtime.py',
]
