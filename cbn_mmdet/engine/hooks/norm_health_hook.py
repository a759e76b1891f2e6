"""Report NaN/Inf reaching a norm layer — which layer, which iteration — instead of training on silently.

A NaN in one batch poisons BN running statistics (and, in the official CBN, the window) for good, and
usually shows up hours later as a NaN loss with no hint of where it started. CBN layers here refuse to
update their state from non-finite statistics (``num_nonfinite`` counts it); this hook makes every such
event loud for all norm layers: a forward pre-hook records, as a device tensor (no host sync), whether
each norm layer saw a non-finite input, and after each checked iteration the flags of all layers are
stacked on the device and read with one host transfer, which raises (or logs) with the layer names and
the iteration.
"""
import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


class NormHealthHook(Hook):
    """Raise (or log) when a NaN/Inf input reaches any norm layer during training.

    Args:
        interval (int): check every ``interval`` training iterations (flags accumulate in between).
        raise_error (bool): raise ``FloatingPointError``; ``False`` logs an error and goes on.
    """

    priority = 'LOW'

    def __init__(self, interval=1, raise_error=True):
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f'NormHealthHook: interval must be an int >= 1, got {interval!r}')
        self.interval = interval
        self.raise_error = bool(raise_error)
        self._names = []
        self._flags = []
        self._handles = []

    def before_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.attach(model)

    def attach(self, model):
        for handle in self._handles:
            handle.remove()
        self._names, self._flags, self._handles = [], [], []
        for name, module in model.named_modules():
            if isinstance(module, NORM_TYPES):
                index = len(self._names)
                self._names.append(name)
                self._flags.append(None)
                self._handles.append(module.register_forward_pre_hook(self._recorder(index)))

    def _recorder(self, index):
        def record(module, args):
            if module.training and args and torch.is_tensor(args[0]) and args[0].numel():
                bad = ~torch.isfinite(args[0]).all()
                previous = self._flags[index]
                self._flags[index] = bad if previous is None else previous | bad
        return record

    def bad_layers(self):
        """Names of the layers that saw a non-finite input since the last check.

        The flags are stacked on their device and read with one host transfer per check, whatever the
        number of layers (flags on several devices are first gathered on the first one's)."""
        seen = [(i, f) for i, f in enumerate(self._flags) if f is not None]
        if not seen:
            return []
        device = seen[0][1].device
        stacked = torch.stack([f if f.device == device else f.to(device) for _, f in seen])
        flags = stacked.cpu().tolist()          # the one device-to-host copy
        self._flags = [None] * len(self._flags)
        return [self._names[i] for (i, _), bad in zip(seen, flags) if bad]

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not self.every_n_train_iters(runner, self.interval):
            return
        bad = self.bad_layers()
        if not bad:
            return
        shown = ', '.join(f"'{n}'" for n in bad[:8]) + (f' and {len(bad) - 8} more' if len(bad) > 8 else '')
        message = (f'NormHealthHook: non-finite (NaN/Inf) input reached norm layer(s) {shown} at iteration '
                   f'{runner.iter + 1} (epoch {runner.epoch + 1}); CBN layers skipped their running-'
                   'statistics and window update, other norm layers\' running statistics may be corrupted')
        if self.raise_error:
            raise FloatingPointError(message)
        runner.logger.error(message)

    def after_train(self, runner):
        for handle in self._handles:
            handle.remove()
        self._handles = []
