from .cbn_burnin_hook import CBNBurnInHook

__all__ = ['CBNBurnInHook']
