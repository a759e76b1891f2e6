"""Tell every MABN layer which GradScaler scales its gradients (mixed-precision training).

MABN averages a backward statistic, ``E[g·z]``, over its last K steps. Under ``AmpOptimWrapper`` the
gradient ``g`` carries the dynamic loss scale, which grows and halves during training: rows written at
different scales must not be averaged as they are. With the scaler known, MABN stores its rows unscaled
and reads the scale on the device when its backward runs (no host sync). ``tools/train.py`` adds this hook
when the optimizer wrapper is an ``AmpOptimWrapper``; it is a no-op for models without MABN.
"""
from mmengine.hooks import Hook

from ...ops import MovingAverageBatchNorm2d

__all__ = ['MABNGradScalerHook']


def loss_scaler_of(optim_wrapper):
    """The ``torch.amp.GradScaler`` of an mmengine optimizer wrapper (or the first of a wrapper dict)."""
    scaler = getattr(optim_wrapper, 'loss_scaler', None)
    if scaler is None and hasattr(optim_wrapper, 'values'):   # OptimWrapperDict
        scalers = [getattr(w, 'loss_scaler', None) for w in optim_wrapper.values()]
        scaler = next((s for s in scalers if s is not None), None)
    return scaler


class MABNGradScalerHook(Hook):
    """Attach the optimizer wrapper's loss scaler to every MABN layer of the model before training."""

    priority = 'VERY_HIGH'

    def before_train(self, runner):
        model = getattr(runner.model, 'module', runner.model)
        scaler = loss_scaler_of(runner.optim_wrapper)
        layers = [m for m in model.modules() if isinstance(m, MovingAverageBatchNorm2d)]
        for layer in layers:
            layer.use_grad_scaler(scaler)
        if layers and scaler is not None:
            runner.logger.info(f'MABNGradScalerHook: {len(layers)} MABN layers store their gradient statistics '
                               'unscaled (loss scale read from the AMP optimizer wrapper)')
