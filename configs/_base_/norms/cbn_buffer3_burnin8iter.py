# CBN buffer3 with the OFFICIAL code's effective burn-in: 8 ITERATIONS.
#
# The official implementation (Howal/Cross-iterationBatchNorm) passes `burnin=8` to its CBatchNorm2d,
# which increments a per-layer counter at every training forward and uses the cross-iteration window
# once the counter exceeds 8. Its configs describe this as burn-in "epochs", but in effect the window
# starts at the 9th iteration, not in epoch 9. This variant reproduces that: the layer's own
# `burnin=8` (counted per layer and per forward call, like the official code) and no CBNBurnInHook.
# The paper-intent variant is cbn_buffer3_burnin8.py (8 epochs through the hook).
_base_ = './cbn_buffer3_burnin8.py'

norm_cfg = dict(burnin=8)

# Replaces the base's [CBNBurnInHook(burnin_epochs=8)]: the burn-in is the layer's alone here.
custom_hooks = []
