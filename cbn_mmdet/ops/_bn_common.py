"""Pieces every BN-family core shares: the momentum factor, the running-statistics update, batch statistics
and the output of an empty batch. One definition each, so that one name never means two contracts.

None of them reads a device tensor on the host: the cumulative average (``momentum=None``) is a tensor
factor ``1/num_batches_tracked`` (torch's own BN does ``.item()`` there, a host sync per layer per step).
"""
import torch

from ._amp import compute_dtype

__all__ = ['momentum_factor', 'lerp_running_stats_', 'batch_mean_var', 'empty_batch_output',
           'check_values_per_channel', 'write_row_if_', 'cached_constant']


def momentum_factor(momentum, num_batches_tracked, dtype):
    """The running-statistics weight of this step: ``momentum``, or ``1/num_batches_tracked`` (a 0-dim
    tensor of ``dtype``, computed on the device) for the cumulative average ``momentum=None``. Call it
    after ``num_batches_tracked`` counted this step."""
    if momentum is None:
        return torch.reciprocal(num_batches_tracked.to(dtype))
    return momentum


def lerp_running_stats_(running_mean, running_var, mean, unbiased_var, factor):
    """``running ← running + factor·(batch − running)`` for both statistics; ``factor`` a float or a 0-dim
    tensor. One multi-tensor kernel for a float factor."""
    pairs = [(r, b.to(r.dtype)) for r, b in ((running_mean, mean), (running_var, unbiased_var)) if r is not None]
    if not pairs:
        return
    running, batch = map(list, zip(*pairs))
    if isinstance(factor, torch.Tensor):
        for r, b in zip(running, batch):
            r.lerp_(b, factor.to(r.dtype))
    else:
        torch._foreach_lerp_(running, batch, factor)


def batch_mean_var(x):
    """Per-channel mean and biased variance of ``x`` ``(N, C, ...)`` in float32 (float64 for a float64
    input), without a graph: BN's own one-pass statistics kernel."""
    dtype = compute_dtype(x.dtype)
    with torch.no_grad():
        if x.device.type not in ('cpu', 'cuda') or x.numel() == 0:   # the kernel exists on these only
            var, mean = torch.var_mean(x.detach().to(dtype), dim=[d for d in range(x.dim()) if d != 1],
                                       correction=0)
            return mean, var
        # with float32 "running" tensors (scratch, momentum 0) the kernel returns float32 statistics
        scratch = (None, None) if x.dtype == dtype else (x.new_empty(x.shape[1], dtype=dtype),) * 2
        return torch.ops.aten.batch_norm_update_stats(x.detach(), *scratch, 0.0)


def empty_batch_output(x, weight, bias):
    """Output of an empty batch (``N = 0``): empty, of ``x``'s dtype, and still connected to γ and β so that
    they get (zero) gradients: DDP without ``find_unused_parameters`` expects every parameter used."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = x * 0 if weight is None else x * weight.to(x.dtype).view(shape)
    return out if bias is None else out + bias.to(x.dtype).view(shape)


def check_values_per_channel(shape, owner, when='training'):
    """Batch statistics need more than one value per channel (a variance of one value is 0/0): refuse
    such an input in one line naming the layer and the shape, as torch's BN does."""
    count = 1
    for i, size in enumerate(shape):
        if i != 1:
            count *= size
    if count <= 1:   # (callers return an empty batch's output before asking)
        raise ValueError(f'{owner}: expected more than 1 value per channel when {when}, got input of shape '
                         f'{tuple(shape)}')


def write_row_if_(buffer, row, value, ok):
    """Row ``row`` (a 0-dim or 1-element long tensor) of ``buffer`` := ``value`` if ``ok`` (a 0-dim bool
    tensor), else unchanged, without reading either on the host: the row is rewritten with its own content."""
    index = row if row.dim() == 1 else row.view(1)
    buffer.index_copy_(0, index, torch.where(ok, value.to(buffer.dtype), buffer.index_select(0, index)))


_CONSTANTS = {}
_CONSTANTS_MAX = 512


def cached_constant(key, make):
    """``make()``, made once per ``key`` and reused from step to step: constant operands (a kernel's shape
    stubs, a constant output gradient, a multi-tensor kernel's constant vector) would otherwise cost
    dispatcher calls per layer per step. ``key`` must name everything the tensor depends on (shape, value,
    dtype, device). Under ``torch.compile`` a fresh tensor each time (the graph holds its own constant). A
    detector's shapes repeat, so a small cache, emptied when full, holds them."""
    if getattr(torch.compiler, 'is_compiling', lambda: False)():
        return make()
    cached = _CONSTANTS.get(key)
    if cached is None:
        if len(_CONSTANTS) >= _CONSTANTS_MAX:
            _CONSTANTS.clear()
        cached = _CONSTANTS[key] = make()
    return cached
