# Demo, norm SyncBN: the demo baseline (mask_rcnn_r18_fpn_baseline_demo.py) with synchronised BN in the
# FPN, the 4conv1fc box head and the 4conv mask head, placed as in configs/cbn/mask_rcnn_r50_fpn_syncbn_1x.py.
# With tools/dist_train.sh CFG 2 (one image per process) its statistics are those of both images
# (all-reduced over the gloo processes); in one process it is plain BN over that process's batch.
# Written as the baseline's `synced_bn` (SyncCBN with an empty window and torch BN's conventions: the
# computation of SyncBN), because torch's DDP refuses torch.nn.SyncBatchNorm in a CPU module; see the
# baseline config. On GPUs, configs/_base_/norms/syncbn.py (type='SyncBN') is the same computation.
_base_ = './mask_rcnn_r18_fpn_baseline_demo.py'

model = dict(
    neck=dict(norm_cfg=_base_.synced_bn),
    roi_head=dict(
        bbox_head=dict(norm_cfg=_base_.synced_bn),
        mask_head=dict(norm_cfg=_base_.synced_bn)))
