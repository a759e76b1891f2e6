# Mask R-CNN R-50-FPN trained FROM SCRATCH with MABN + centred convs everywhere, 2x -- the MABN paper's
# COCO row (Yan et al., ICLR 2020: 36.50 box / 32.69 mask AP; SyncBN from scratch: 36.80 / 33.10), as
# in the official e2e_mask_rcnn_R_50_FPN_mabn_2x_from_scratch.yaml (megvii-model/MABN, det/):
#   - every conv that feeds a norm is a CenConv followed by MABN: backbone (stem, bottlenecks,
#     downsample), FPN, the 4conv1fc box head and the 4conv mask head (configs/_base_/norms/mabn_cenconv.py);
#   - no pretrained weights, nothing frozen, norms in training mode (init_cfg=None, frozen_stages=-1,
#     norm_eval=False);
#   - 8 GPUs x 2 images = 16 images per iteration, lr 0.02, weight decay 1e-4. The official run is
#     180k iterations with steps at 120k/160k (~24 epochs of COCO train2017, steps ~16/21); we use
#     mmdet's 2x: 24 epochs, steps at 16 and 22 (configs/_base_/schedules/paper_2x.py). Warm-up and
#     gradient clipping are those of the other configs here (500 iterations from 0.001 x lr; max_norm 35).
# MABN's B must equal the images per GPU. Run on 8 GPUs: in a distributed run tools/train.py gives
# each GPU global_batch_size (16, schedules/paper_1x.py) / #GPUs images. On another GPU count either
# keep 2 per GPU (`--cfg-options global_batch_size=<2 x #GPUs>` plus `--auto-scale-lr`), or set
# norm_cfg B to 16 / #GPUs as well (the moving averages then cover real_B / B iterations).
_base_ = [
    '../_base_/models/mask_rcnn_r50_fpn_4conv1fc_4conv.py',
    '../_base_/datasets/coco_instance_paper.py',
    '../_base_/schedules/paper_2x.py',
    '../_base_/default_runtime.py',
    '../_base_/norms/mabn_cenconv.py',
]

model = dict(
    backbone=dict(
        conv_cfg=_base_.conv_cfg,
        norm_cfg=_base_.norm_cfg,
        norm_eval=False,
        frozen_stages=-1,
        init_cfg=None),
    neck=dict(conv_cfg=_base_.conv_cfg, norm_cfg=_base_.norm_cfg),
    roi_head=dict(
        bbox_head=dict(conv_cfg=_base_.conv_cfg, norm_cfg=_base_.norm_cfg),
        mask_head=dict(conv_cfg=_base_.conv_cfg, norm_cfg=_base_.norm_cfg)))

# 2 images per GPU = MABN's B (8 GPUs x 2 = 16 images per iteration, the lr's base batch).
train_dataloader = dict(batch_size=_base_.norm_cfg.B)
