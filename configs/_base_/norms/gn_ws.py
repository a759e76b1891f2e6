# GN + WS (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
# Standardization", arXiv 1903.10520): every conv that feeds a norm standardizes its weight per output
# channel (cbn_mmdet's `WSConv`, the mmcv ConvWS2d definition: unbiased std, eps added to the std),
# followed by GroupNorm(32). Used in the backbone, the FPN and the RoI heads.
conv_cfg = dict(type='WSConv')
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)

# WS changes what a conv computes, so the backbone MUST start from ImageNet weights trained WITH WS
# (and GN). These are the WS authors' GN+WS ResNets, as re-hosted by OpenMMLab (mmdet's gn+ws configs);
# mmengine downloads them on first use. A torchvision (BN) checkpoint would still load its conv
# weights (only the norm keys mismatch, with a warning), but those weights were not trained to be
# standardized: fine-tuning from them underperforms badly or diverges, and training from scratch needs
# a much longer schedule (e.g. mmdet's 6x scratch configs). See docs/reproduce_coco.md, "Pretrained
# backbones".
ws_pretrained_r50 = 'open-mmlab://jhu/resnet50_gn_ws'
ws_pretrained_r101 = 'open-mmlab://jhu/resnet101_gn_ws'
