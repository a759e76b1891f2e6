# COCO 2017 detection (train2017 / val2017, CocoMetric bbox) from mmdet, with the paper's per-GPU batch.
# Data layout: see docs/reproduce_coco.md.
_base_ = 'mmdet::_base_/datasets/coco_detection.py'

# The CBN paper trains with 16 images per iteration as 4 GPUs x 4 images. The lr in
# schedules/paper_1x.py belongs to that total (its `global_batch_size`); with another GPU count keep
# 16 images in total (8 GPUs x 2) or scale the lr linearly (`--auto-scale-lr`).
train_dataloader = dict(batch_size=4, num_workers=4)
