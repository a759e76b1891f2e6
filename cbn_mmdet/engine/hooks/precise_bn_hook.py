"""PreciseBN: re-estimate the running statistics of the norm layers after training.

A BN-type layer is trained on batch statistics and evaluated with running statistics, an exponential
moving average of the batch statistics of the last few hundred iterations, taken while the weights were
still moving. With small batches that average is noisy and lags the final weights, and the model is
evaluated with statistics that no longer match its inputs. PreciseBN (Wu & Johnson, "Rethinking
'Batch' in BatchNorm", arXiv 2105.07576; detectron2's ``PreciseBN`` hook) freezes the weights, runs
``num_iters`` training batches through the model in train mode and replaces each layer's running
statistics by the population statistics of its input over those batches:

* ``running_mean`` = the mean over every value of every batch (the concatenated batches), per channel;
* ``running_var``  = their variance over the concatenated batches, unbiased like BN's own ``running_var``
  (this includes the spread of the batch means, which an average of per-batch variances leaves out);
* MABN normalises by the second moment and keeps ``running_mean`` at zero: ``running_var`` = the mean of
  ``x²`` over the concatenated batches.

Sums are accumulated in float64 and, in a distributed run, all-reduced over the processes (one
collective), so every process gets the statistics of all the batches of all processes (SyncBN's
population; for per-process BN the same estimate from more data). The forward passes use the layers'
training behaviour: CBN runs its window (so gradients are enabled for them: the compensation needs the
graph; nothing is backpropagated), SyncBN syncs. Every buffer the passes change (BN's batch counter,
CBN's window and counter, MABN's moving averages) is restored afterwards: only ``running_mean`` and
``running_var`` change. The data loader's and the random generators' state does move on.

Layers: ``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm`` (torch's and ours), CBN/SyncCBN, BRN (eval is
BN's) and MABN. Layers in eval mode during training (``norm_eval=True``, CBN ``frozen=True``) and layers
without running statistics are left alone. Any other layer that has running statistics and trains
(BCN, mmcv's ``MMSyncBN``, ...) is refused before training starts, with its name and type.

``cbn_mmdet.models.registry`` registers it as ``type='PreciseBNHook'``::

    custom_hooks = [dict(type='PreciseBNHook', num_iters=200)]
"""
import os.path as osp

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import IterBasedTrainLoop

from ...ops.batch_renorm import BatchRenorm2d
from ...ops.cross_iter_bn import CrossIterationBatchNorm2d
from ...ops.moving_average_bn import MovingAverageBatchNorm2d

__all__ = ['PreciseBNHook', 'precise_bn_layers', 'update_bn_stats']

# torch's own BN classes, exactly (a subclass may compute something else in training or eval)
_TORCH_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
SUPPORTED = ('BatchNorm1d/2d/3d', 'SyncBatchNorm', 'CBN', 'SyncCBN', 'BRN', 'MABN')


def _has_running_stats(module):
    return getattr(module, 'running_mean', None) is not None or getattr(module, 'running_var', None) is not None


def _kind(module):
    """How a layer's running statistics are defined: ``'mean_var'``, ``'second_moment'`` or None (unknown)."""
    if isinstance(module, MovingAverageBatchNorm2d):
        return 'second_moment'
    if isinstance(module, (CrossIterationBatchNorm2d, BatchRenorm2d, torch.nn.SyncBatchNorm)):
        return 'mean_var'      # SyncBatchNorm: torch's and ours (a subclass); CBN: SyncCBN too
    if type(module) in _TORCH_BN:
        return 'mean_var'
    return None


def precise_bn_layers(model):
    """``[(name, layer, kind)]``: the layers whose running statistics PreciseBN re-estimates.

    ``model`` must already be in train mode (so that ``norm_eval`` has put frozen layers in eval). Raises
    ``TypeError`` naming the first training layer with running statistics that it cannot handle.
    """
    if is_model_wrapper(model):
        model = model.module
    layers = []
    for name, module in model.named_modules():
        if not module.training or not _has_running_stats(module):
            continue
        if not getattr(module, 'track_running_stats', True) or getattr(module, 'frozen', False):
            continue
        kind = _kind(module)
        if kind is None:
            raise TypeError(f'PreciseBNHook: cannot re-estimate the statistics of {name or "the model"} '
                            f'({type(module).__module__}.{type(module).__qualname__}); supported: '
                            f'{", ".join(SUPPORTED)}')
        layers.append((name, module, kind))
    return layers


class _Accumulator:
    """Per-channel float64 sums of x and x² and the value count, fed by a forward pre-hook."""

    def __init__(self, module):
        self.s1 = self.s2 = None
        self.count = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        x = inputs[0].detach()
        if x.numel() == 0:
            return
        dims = [d for d in range(x.dim()) if d != 1]
        x = x.to(torch.float64)
        s1, s2 = x.sum(dims), (x * x).sum(dims)
        if self.s1 is None:
            self.s1, self.s2 = s1, s2
        else:
            self.s1 += s1
            self.s2 += s2
        self.count += x.numel() // x.shape[1]


def _snapshot(model):
    return {name: {key: buf.detach().clone() for key, buf in module.named_buffers(recurse=False) if buf is not None}
            for name, module in model.named_modules()}


def _restore(model, saved):
    with torch.no_grad():
        for name, module in model.named_modules():
            for key, value in saved.get(name, {}).items():
                buf = module._buffers.get(key)
                if buf is not None:
                    if buf.shape != value.shape:
                        buf.resize_(value.shape)
                    buf.copy_(value)
            if isinstance(module, CrossIterationBatchNorm2d):
                module.set_iteration(int(module.iter_count))


def update_bn_stats(model, batches, num_iters, forward=None, context=None, logger=None):
    """Re-estimate the running statistics (see the module docstring) in place.

    Args:
        model (nn.Module): the model (a wrapper is unwrapped); put in train mode here, restored after.
        batches (Iterable): yields data batches; cycled if shorter than ``num_iters``.
        num_iters (int): forward passes.
        forward (callable, optional): ``forward(model, batch)``, default mmengine's
            ``model(**model.data_preprocessor(batch, True), mode='loss')``.
        context (callable, optional): ``context(model)`` giving a context manager for each pass (e.g. the
            optimizer wrapper's ``optim_context``: autocast under AMP).
        logger (callable, optional): receives the summary line.

    Returns:
        dict: ``layers`` (re-estimated names), ``unfed`` (names that saw no input, left as they were),
        ``values`` (values per channel summed over processes, per layer), ``iters``.
    """
    if not isinstance(num_iters, int) or isinstance(num_iters, bool) or num_iters < 1:
        raise ValueError(f'PreciseBNHook: num_iters must be a positive int, got {num_iters!r}')
    if is_model_wrapper(model):
        model = model.module
    was_training = model.training
    model.train()
    try:
        layers = precise_bn_layers(model)
        if not layers:
            return dict(layers=[], unfed=[], values={}, iters=0)
        saved = _snapshot(model)
        accumulators = [_Accumulator(m) for _, m, _ in layers]
        needs_graph = any(isinstance(m, CrossIterationBatchNorm2d) and m.buffer_num > 0 for _, m, _ in layers)
        forward = forward or _mmengine_forward
        try:
            iterator, done = iter(batches), 0
            while done < num_iters:
                try:
                    batch = next(iterator)
                except StopIteration:
                    if done == 0:
                        raise ValueError('PreciseBNHook: the data loader yielded no batch') from None
                    iterator = iter(batches)
                    continue
                grad = torch.enable_grad() if needs_graph else torch.no_grad()
                ctx = context(model) if context is not None else _null()
                with grad, ctx:
                    forward(model, batch)
                done += 1
        finally:
            for acc in accumulators:
                acc.handle.remove()
        _restore(model, saved)
        return _write_stats(layers, accumulators, num_iters, logger)
    finally:
        model.train(was_training)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def _mmengine_forward(model, batch):
    data = model.data_preprocessor(batch, True)
    if isinstance(data, dict):
        return model(**data, mode='loss')
    return model(*data, mode='loss')


def _write_stats(layers, accumulators, num_iters, logger):
    # one vector per layer: [s1 (C), s2 (C), count]; a layer that saw nothing contributes zeros
    packed = []
    for (_, module, _), acc in zip(layers, accumulators):
        channels = module.num_features
        ref = module.running_var if module.running_var is not None else module.running_mean
        if acc.s1 is None:
            packed.append(torch.zeros(2 * channels + 1, dtype=torch.float64, device=ref.device))
        else:
            packed.append(torch.cat([acc.s1, acc.s2, acc.s1.new_tensor([float(acc.count)])]))
    flat = torch.cat([p.to(packed[0].device) for p in packed])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    done, unfed, values, offset = [], [], {}, 0
    with torch.no_grad():
        for (name, module, kind), p in zip(layers, packed):
            channels = module.num_features
            chunk = flat[offset:offset + p.numel()].to(p.device)
            offset += p.numel()
            s1, s2, count = chunk[:channels], chunk[channels:2 * channels], float(chunk[-1])
            if count < 2:
                unfed.append(name)
                continue
            if kind == 'second_moment':
                module.running_var.copy_((s2 / count).to(module.running_var.dtype))
            else:
                mean = s1 / count
                var = ((s2 - count * mean * mean) / (count - 1)).clamp_min(0)
                module.running_mean.copy_(mean.to(module.running_mean.dtype))
                module.running_var.copy_(var.to(module.running_var.dtype))
            done.append(name)
            values[name] = int(count)
    if logger is not None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        line = (f'PreciseBNHook: re-estimated the running statistics of {len(done)} layer(s) from {num_iters} '
                f'training batch(es) x {world} process(es)')
        if unfed:
            line += f'; {len(unfed)} layer(s) saw no input and keep theirs: {", ".join(unfed)}'
        logger(line)
    return dict(layers=done, unfed=unfed, values=values, iters=num_iters)


class PreciseBNHook(Hook):
    """Re-estimate norm layers' running statistics from ``num_iters`` training batches (PreciseBN).

    Runs after the last training epoch (epoch-based loops) or iteration (iteration-based loops), and
    every ``interval`` epochs / iterations when given, before the checkpoint of that epoch is saved.

    Args:
        num_iters (int): training batches run through the model per process. Default: 200 (detectron2).
        interval (int, optional): also run every ``interval`` epochs (iterations for an
            iteration-based loop). Default: only at the end of training.
        original_checkpoint (str, optional): a file name in the work dir; when given, the model is saved
            there (weights and buffers, no optimizer) just before the statistics are replaced, so that
            both versions can be evaluated.
    """

    priority = 'ABOVE_NORMAL'   # before the CheckpointHook (VERY_LOW) saves the epoch's checkpoint

    def __init__(self, num_iters=200, interval=None, original_checkpoint=None):
        if not isinstance(num_iters, int) or isinstance(num_iters, bool) or num_iters < 1:
            raise ValueError(f'PreciseBNHook: num_iters must be a positive int, got {num_iters!r}')
        if interval is not None and (not isinstance(interval, int) or isinstance(interval, bool) or interval < 1):
            raise ValueError(f'PreciseBNHook: interval must be a positive int or None, got {interval!r}')
        if original_checkpoint is not None and (not isinstance(original_checkpoint, str) or not original_checkpoint
                                                or osp.basename(original_checkpoint) != original_checkpoint):
            raise ValueError('PreciseBNHook: original_checkpoint must be a file name (no directory), got '
                             f'{original_checkpoint!r}')
        self.num_iters = num_iters
        self.interval = interval
        self.original_checkpoint = original_checkpoint
        self.last_result = None

    def before_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        was_training = model.training
        model.train()
        try:
            layers = precise_bn_layers(model)    # refuses an unsupported layer now, not after training
        finally:
            model.train(was_training)
        if not layers:
            runner.logger.warning('PreciseBNHook: the model has no trained layer with running statistics; '
                                  'the hook does nothing')

    def after_train_epoch(self, runner):
        if isinstance(runner.train_loop, IterBasedTrainLoop):
            return
        if self.is_last_train_epoch(runner) or (self.interval and self.every_n_epochs(runner, self.interval)):
            self._run(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not isinstance(runner.train_loop, IterBasedTrainLoop):
            return
        if self.is_last_train_iter(runner) or (self.interval and self.every_n_train_iters(runner, self.interval)):
            self._run(runner)

    def _run(self, runner):
        if self.original_checkpoint:
            runner.save_checkpoint(runner.work_dir, self.original_checkpoint, save_optimizer=False,
                                   save_param_scheduler=False)
        optim_wrapper = getattr(runner, 'optim_wrapper', None)
        context = getattr(optim_wrapper, 'optim_context', None)
        self.last_result = update_bn_stats(runner.model, runner.train_dataloader, self.num_iters, context=context,
                                           logger=runner.logger.info)
