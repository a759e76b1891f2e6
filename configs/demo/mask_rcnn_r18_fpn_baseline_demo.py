# Demo, norm '-': the CBN paper's Mask R-CNN FPN (4conv1fc box head + 4conv mask head, no norm in the
# FPN or the heads; configs/cbn/mask_rcnn_r50_fpn_baseline_1x.py) shrunk so that it trains in about a
# minute on 2 CPU cores, on the synthetic shapes dataset (cbn_mmdet/datasets/synthetic_coco.py, 3
# classes, 128x128 images, generated into data/synthetic_coco/ by tools/train.py on first use).
#
# What differs from the paper setting, and why:
# - ResNet-18 at half width (base_channels=32: 32-64-128-256 channels, 2.8 M parameters) from random init
#   (no pretrained weights offline): init_cfg=None, all stages trained. Its norm is GN (16 groups)
#   instead of the paper's frozen ImageNet BN, the same in every variant: like a frozen BN it keeps no
#   running statistics that differ between train and eval mode, so the train/eval-mode losses and
#   PreciseBN below measure the FPN/head norm alone, and it needs no per-layer all-reduce (a synchronised
#   BN backbone over gloo cost 0.07 s of the 0.30 s of an iteration; the full-width R-18 backbone,
#   0.08 s more of DDP's gradient all-reduce: 0.39 s/iter before, 0.14 s/iter now on 2 processes).
# - 64 FPN/RoI-head channels, 128x128 images, anchors of scale 4 (objects are 18-52 px), 32 sampled
#   RoIs per image, fewer proposals, RoIAlign with 2x2 samples per bin: the RoI heads dominate the
#   cost on a CPU.
# - A short schedule (max_epochs below): linear warm-up, x0.1 steps at 8/12 and 11/12 of it (as the
#   paper's 1x), gradient clipping at 35 (paper); a global batch of 2. AdamW (lr 1e-3) instead of the
#   paper's SGD: from random init and in 480 iterations (6 epochs, 64 RoIs) it reached about 1.5x the box
#   AP of SGD (lr 0.02; measured 0.34 vs 0.20-0.25 AP^b); torch's fused CPU AdamW kernel (fused=True,
#   the same update) is 0.07 s/iter faster than the per-tensor loop. 128 images x 4 epochs (256
#   iterations) and 32 RoIs per image keep the six variants of `bash tools/demo.sh` within its 10-minute
#   budget on 2 cores. Every variant uses the same schedule.
# - Run as the paper runs, in miniature: `tools/dist_train.sh CFG 2` (gloo on CPU), one image per process
#   (global_batch_size 2 is split over the processes), so a per-process norm sees one image. Only the
#   norm of the FPN and the RoI heads differs between variants.
# - Synchronised BN is written `synced_bn` below: SyncCBN with an empty window (buffer_num=0) and torch
#   BN's conventions (eps inside the sqrt, biased variance to normalise, unbiased in running_var), i.e.
#   BN over the images of all processes, computed like SyncBN (gradient through the all-reduce);
#   type='SyncBN' is the same computation (it trains on several gloo processes too: cbn_mmdet lets torch
#   DDP accept its CPU-capable SyncBN), and the demo's results were measured with this form. With one
#   process (tools/train.py) the batch is 2 on that process and this is plain BN.
# - PreciseBN (cbn_mmdet's PreciseBNHook) after the last epoch: the final checkpoint carries running
#   statistics re-estimated from `num_iters` training batches per process with the weights frozen;
#   `original_stats.pth` in the work dir keeps the model with the statistics training left. The baseline
#   and GN have no running statistics anywhere: the hook leaves them as they are.
_base_ = '../cbn/mask_rcnn_r50_fpn_baseline_1x.py'

data_root = 'data/synthetic_coco/'
# tools/train.py (cbn_mmdet.engine.runner_setup.ensure_config_data) generates this dataset if it is missing.
# 200 validation images: an AP on 40 moves by several points from one draw of images to the next
synthetic_data = dict(out_dir=data_root, seed=0, num_train=128, num_val=200, image_size=128)
metainfo = dict(classes=('rectangle', 'ellipse', 'triangle'),
                palette=[(220, 20, 60), (0, 128, 255), (60, 180, 75)])
synced_bn = dict(type='SyncCBN', buffer_num=0, eps_inside_sqrt=True, unbiased_plain_var=False, requires_grad=True)
image_scale = (128, 128)
channels = 64
max_epochs = 4
global_batch_size = 2
backbone_width = 32     # ResNet-18 at half width
backbone_norm = dict(type='GN', num_groups=16, requires_grad=True)

model = dict(
    backbone=dict(depth=18, base_channels=backbone_width, stem_channels=backbone_width, frozen_stages=-1,
                  norm_eval=False, init_cfg=None, norm_cfg=backbone_norm),
    neck=dict(in_channels=[backbone_width * 2**i for i in range(4)], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels, anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels, roi_layer=dict(sampling_ratio=2)),
        bbox_head=dict(in_channels=channels, conv_out_channels=channels, fc_out_channels=256,
                       num_classes=3),
        mask_roi_extractor=dict(out_channels=channels, roi_layer=dict(sampling_ratio=2)),
        mask_head=dict(in_channels=channels, conv_out_channels=channels, num_classes=3)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
# In iterations (the epoch boundaries of a 4-epoch run would put both steps at whole epochs 2 and 3):
# 30 warm-up iterations, x0.1 at 8/12 and at 11/12 of the schedule, as the paper's 1x.
train_iters = max_epochs * synthetic_data['num_train'] // global_batch_size
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='MultiStepLR', begin=0, end=train_iters, by_epoch=False,
         milestones=[train_iters * 8 // 12, train_iters * 11 // 12], gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=1e-3, weight_decay=1e-4, fused=True))
auto_scale_lr = dict(base_batch_size=2)

default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))   # one checkpoint, at the end
log_processor = dict(window_size=20)
randomness = dict(seed=0)
# 64 training images (32 per process, one each)
precise_bn_hook = dict(type='PreciseBNHook', num_iters=32, original_checkpoint='original_stats.pth')
custom_hooks = [precise_bn_hook]
