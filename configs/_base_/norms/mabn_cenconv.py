# MABN (Yan et al., ICLR 2020; official code megvii-model/MABN): Moving Average Batch Normalization
# after centred-weight convs (`CenConv`), everywhere a conv feeds a norm (backbone, FPN, RoI heads), as
# in the official Mask R-CNN (R-50-FPN-MABN backbone, FPNXconv1fcMABN box head, MABN mask head).
#
# B = images per GPU (2, as in the official detection runs: 8 GPUs x 2 images). real_B = 32 is the
# official MABN2d default that the official detection code uses unchanged, so the moving averages run
# over K = real_B / B = 16 iterations. (Taking real_B = the global batch, 16, would give K = 8; we
# follow the official code.) B must equal train_dataloader.batch_size.
conv_cfg = dict(type='CenConv')
norm_cfg = dict(type='MABN', B=2, real_B=32, requires_grad=True)
