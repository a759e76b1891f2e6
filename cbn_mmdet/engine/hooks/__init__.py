"""mmengine hooks, one per file; ``cbn_mmdet.models.registry`` registers them in the root ``HOOKS``."""
from .cbn_burnin_hook import CBNBurnInHook
from .nonfinite_loss_hook import NonFiniteLossHook
from .norm_health_hook import NormHealthHook
from .precise_bn_hook import PreciseBNHook
from .rng_state_hook import RNGStateHook

__all__ = ['CBNBurnInHook', 'NonFiniteLossHook', 'NormHealthHook', 'PreciseBNHook', 'RNGStateHook']
