# BCN (Qiao et al., arXiv 1911.09738) + WS (Qiao et al., arXiv 1903.10520): weight-standardized convs
# (`WSConv`) followed by Batch-Channel Normalization, i.e. per-channel batch normalization then group
# normalization over 32 groups, then the affine. Used in the backbone, the FPN and the RoI heads.
#
# estimate_stats=True is the paper's micro-batch mode: the batch-norm part normalises with running
# statistics that are updated from every batch, instead of the noisy statistics of 4 images. It only
# acts in training mode, so leaves using this file also set the backbone's norm_eval=False (mmdet's
# norm_eval=True would freeze every _BatchNorm subclass, BCN included, in eval mode for the whole run).
# eps_inside_sqrt: the BCN authors' networks were trained with WS dividing by sqrt(var_unbiased + 1e-5)
# (mmcv's ConvWS2d and our default divide by std + 1e-5): their converted weights need that variant.
conv_cfg = dict(type='WSConv', eps_inside_sqrt=True)
norm_cfg = dict(type='BCN', num_groups=32, estimate_stats=True, requires_grad=True)

# The backbone MUST start from ImageNet weights trained with BCN + WS. The BCN authors released them
# (joe-siyuan-qiao/Batch-Channel-Normalization, imagenet/README.md):
#   https://cs.jhu.edu/~syqiao/BatchChannelNormalization/rn50_bcn_ws.pth
#   https://cs.jhu.edu/~syqiao/BatchChannelNormalization/rn101_bcn_ws.pth
# Their layout differs from mmdet's ResNet with our BCN (released: `bn1.pbn.*` = an affine BN, then a
# per-GROUP affine `bn1.weight/bias` of shape (1, 32, 1); ours: `bn1.*` with one per-channel affine),
# so they must be converted first: tools/model_converters/bcn_ws_to_mmdet.py (docs/reproduce_coco.md).
# The paths below are where the converted files are expected (relative to the working directory).
# Without such weights, see gn_ws.py: a BN-pretrained backbone with WS convs diverges or underperforms;
# from scratch needs a much longer schedule.
bcn_ws_pretrained_r50 = 'checkpoints/resnet50_bcn_ws_mmdet.pth'
bcn_ws_pretrained_r101 = 'checkpoints/resnet101_bcn_ws_mmdet.pth'
