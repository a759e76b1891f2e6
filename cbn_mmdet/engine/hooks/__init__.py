from .cbn_burnin_hook import CBNBurnInHook
from .norm_health_hook import NormHealthHook

__all__ = ['CBNBurnInHook', 'NormHealthHook']
