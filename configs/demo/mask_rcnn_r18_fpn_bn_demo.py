# Demo, norm BN: the demo baseline (mask_rcnn_r18_fpn_baseline_demo.py) with plain BN, per process, in
# the FPN, the 4conv1fc box head and the 4conv mask head (where the other variants put their norm).
# With tools/dist_train.sh CFG 2 each process has one image, so these BN layers see the statistics of
# one image: the small-batch case CBN and SyncBN address.
_base_ = './mask_rcnn_r18_fpn_baseline_demo.py'

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
