"""mmengine hooks for cbn_mmdet (registered in the root HOOKS registry on import)."""
from .hooks import CBNBurnInHook, NormHealthHook

__all__ = ['CBNBurnInHook', 'NormHealthHook']
