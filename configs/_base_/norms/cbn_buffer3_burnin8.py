# CBN row, "buffer3 / burnin8": Cross-Iteration BN with the statistics of the current and the 3
# previous iterations (window 4), compensated by a first-order Taylor step in the conv weight.
# A leaf places `norm_cfg` (as `_base_.norm_cfg`) into the FPN and the RoI heads.
#
# Burn-in: the paper's `burnin=8` of a 12-epoch schedule means 8 EPOCHS of plain BN before the window is
# used (the statistics of a quickly changing network are not worth compensating early on). The layer's
# own `burnin` counts training forwards, so it stays 0 here and CBNBurnInHook switches every CBN layer
# from plain BN to the window at the start of epoch 9 (runner.epoch == 8). For the official code's
# effective behaviour (burn-in over after 8 iterations) see cbn_buffer3_burnin8iter.py.
norm_cfg = dict(type='CBN', buffer_num=3, burnin=0, requires_grad=True)

custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=8)]
