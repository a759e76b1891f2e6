# The CBN paper's Faster R-CNN R-50-FPN 1x setting without a norm in the neck/heads (the '-' row):
# model + COCO detection (4 images per GPU) + paper 1x schedule + runtime. Every Faster R-CNN config
# in configs/ starts here and adds a norm (configs/_base_/norms/) or a deeper backbone.
_base_ = [
    './models/faster_rcnn_r50_fpn_4conv1fc.py',
    './datasets/coco_detection_paper.py',
    './schedules/paper_1x.py',
    './default_runtime.py',
]
