"""mmengine hooks, one per file; ``cbn_mmdet.models.registry`` registers them in the root ``HOOKS``."""
from .cbn_burnin_hook import CBNBurnInHook
from .mabn_grad_scaler_hook import MABNGradScalerHook
from .nonfinite_loss_hook import NonFiniteLossHook
from .norm_health_hook import NormHealthHook
from .precise_bn_hook import PreciseBNHook
from .rng_state_hook import RNGStateHook

__all__ = ['CBNBurnInHook', 'MABNGradScalerHook', 'NonFiniteLossHook', 'NormHealthHook', 'PreciseBNHook',
           'RNGStateHook']
