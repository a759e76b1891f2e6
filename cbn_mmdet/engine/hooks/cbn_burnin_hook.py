"""Epoch- or iteration-based burn-in for CBN layers.

The paper's ``buffer3_burnin8`` means: plain BN for the first 8 *epochs* of the 12-epoch schedule, then
the cross-iteration window. The official code counted ``burnin`` in forward calls per layer, so its
burn-in ended after 8 iterations; that behaviour stays available as the layer's own ``burnin=8``.

This hook switches ``window_enabled`` on every CBN layer of the model from the runner's epoch (or
iteration) before each one. The switch is a pure function of the runner's position, so resuming from a
checkpoint needs no extra state. ``cbn_mmdet.models.registry`` registers it as ``type='CBNBurnInHook'``.
"""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ...ops.cross_iter_bn import CrossIterationBatchNorm2d


def cbn_layers(model):
    if is_model_wrapper(model):
        model = model.module
    return [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]


class CBNBurnInHook(Hook):
    """Keep CBN layers in plain-BN mode for the first ``burnin_epochs`` epochs or ``burnin_iters`` iters.

    Args:
        burnin_epochs (int, optional): epochs of plain BN (epoch-based loops).
        burnin_iters (int, optional): runner iterations of plain BN (any loop). Give exactly one.
    """

    priority = 'VERY_HIGH'

    def __init__(self, burnin_epochs=None, burnin_iters=None):
        if (burnin_epochs is None) == (burnin_iters is None):
            raise ValueError('CBNBurnInHook: give exactly one of burnin_epochs / burnin_iters, got '
                             f'burnin_epochs={burnin_epochs!r}, burnin_iters={burnin_iters!r}')
        for name, value in (('burnin_epochs', burnin_epochs), ('burnin_iters', burnin_iters)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f'CBNBurnInHook: {name} must be an int >= 0, got {value!r}')
        self.burnin_epochs = burnin_epochs
        self.burnin_iters = burnin_iters

    def before_train(self, runner):
        layers = cbn_layers(runner.model)
        if not layers:
            runner.logger.warning('CBNBurnInHook: the model has no CBN layer; the hook does nothing')
        if self.burnin_epochs is not None and self.burnin_epochs >= runner.max_epochs:
            raise ValueError(f'CBNBurnInHook: burnin_epochs={self.burnin_epochs} is not shorter than the '
                             f'schedule (max_epochs={runner.max_epochs}): CBN would never be used')
        if self.burnin_iters is not None and self.burnin_iters >= runner.max_iters:
            raise ValueError(f'CBNBurnInHook: burnin_iters={self.burnin_iters} is not shorter than the '
                             f'schedule (max_iters={runner.max_iters}): CBN would never be used')
        self._apply(runner)

    def before_train_epoch(self, runner):
        self._apply(runner)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if self.burnin_iters is not None:
            self._apply(runner)

    def _apply(self, runner):
        if self.burnin_epochs is not None:
            enabled = runner.epoch >= self.burnin_epochs
        else:
            enabled = runner.iter >= self.burnin_iters
        for layer in cbn_layers(runner.model):
            if layer.window_enabled != enabled:
                layer.window_enabled = enabled
                if enabled:
                    layer.reset_window()   # nothing entered during burn-in; start clean regardless
