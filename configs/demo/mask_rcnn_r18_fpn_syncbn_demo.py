# Demo, norm SyncBN: the demo baseline (mask_rcnn_r18_fpn_baseline_demo.py) with SyncBN
# (configs/_base_/norms/syncbn.py) in the FPN, the 4conv1fc box head and the 4conv mask head, placed as
# in configs/cbn/mask_rcnn_r50_fpn_syncbn_1x.py. In one process it is plain BN over the 2 images of the
# batch (the small-batch case CBN addresses); with tools/dist_train.sh it syncs over the processes
# (gloo on CPU).
_base_ = ['./mask_rcnn_r18_fpn_baseline_demo.py', '../_base_/norms/syncbn.py']

model = dict(
    neck=dict(norm_cfg=_base_.norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=_base_.norm_cfg),
        mask_head=dict(norm_cfg=_base_.norm_cfg)))
