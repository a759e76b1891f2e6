"""mmengine hooks for cbn_mmdet (registered in the root HOOKS registry on import)."""
from .hooks import CBNBurnInHook, NormHealthHook, RNGStateHook

__all__ = ['CBNBurnInHook', 'NormHealthHook', 'RNGStateHook']
