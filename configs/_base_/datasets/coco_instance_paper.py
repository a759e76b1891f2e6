# COCO 2017 instance segmentation (train2017 / val2017, CocoMetric bbox + segm) from mmdet, with the
# paper's per-GPU batch. Data layout: see docs/reproduce_coco.md.
_base_ = 'mmdet::_base_/datasets/coco_instance.py'

# 4 GPUs x 4 images = 16 images per iteration, as in the CBN paper (see coco_detection_paper.py).
train_dataloader = dict(batch_size=4, num_workers=4)
