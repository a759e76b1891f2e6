"""Differentiable collectives for normalisation layers that pool statistics across ranks.

Torch only, device agnostic: the same code runs with gloo on CPU tensors and with nccl on CUDA
tensors. Everything degrades to a no-op (no collective at all) when ``torch.distributed`` is not
available, not initialised, or the group has a single member, so single-process training and unit
tests never need a process group.

Public helpers:

* :func:`get_world_size` -- world size of a group, ``1`` without an initialised process group.
* :func:`sync_weighted_mean` -- count-weighted global mean of per-rank statistics, with a backward
  that is the exact gradient of the sum of the per-rank losses (used by :mod:`.sync_bn` and meant
  to be reused by cross-iteration BN).
"""
import numbers

import torch
import torch.distributed as dist

__all__ = ['get_world_size', 'sync_weighted_mean']


def _dist_ready():
    return dist.is_available() and dist.is_initialized()


def get_world_size(group=None):
    """Number of ranks in ``group`` (default: the whole world).

    Returns ``1`` when ``torch.distributed`` is unavailable or no process group has been
    initialised, so callers can write ``if get_world_size(pg) > 1:`` unconditionally. On a rank that
    is not a member of ``group`` torch reports ``-1``; that is passed through (callers treat any
    value ``<= 1`` as "nothing to synchronise").
    """
    if not _dist_ready():
        return 1
    return dist.get_world_size(group)


class _SyncWeightedMean(torch.autograd.Function):
    """All-reduce ``count * t`` and ``count`` in one message; see :func:`sync_weighted_mean`."""

    @staticmethod
    def forward(ctx, group, count, *tensors):
        buf_dtype = count.dtype
        numels = [t.numel() for t in tensors]
        # A rank with count 0 may carry garbage statistics (e.g. NaN from an empty mean); 0 * NaN is
        # NaN, so the contribution is zeroed explicitly instead of multiplied away.
        has_data = count > 0
        zero = torch.zeros((), dtype=buf_dtype, device=count.device)
        parts = [torch.where(has_data, t.to(buf_dtype) * count, zero).reshape(-1) for t in tensors]
        parts.append(count.reshape(1))
        buf = torch.cat(parts)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        total = buf[-1]
        # All counts zero: the mean is undefined; report zeros rather than NaN.
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        means = []
        for t, chunk in zip(tensors, torch.split(buf[:-1], numels)):
            means.append((chunk / safe_total).reshape(t.shape).to(t.dtype))
        ctx.group = group
        ctx.numels = numels
        ctx.shapes = [t.shape for t in tensors]
        ctx.dtypes = [t.dtype for t in tensors]
        # Share of this rank in the global mean; 0 when the global count is 0.
        ctx.save_for_backward(count / safe_total)
        total_out = total.clone()
        ctx.mark_non_differentiable(total_out)
        return (*means, total_out)

    @staticmethod
    def backward(ctx, *grads):
        (share, ) = ctx.saved_tensors
        grads = grads[:-1]  # the global count is not differentiable
        buf = torch.cat([g.to(share.dtype).reshape(-1) for g in grads])
        # Every rank's loss depends on the same global mean: sum their gradients first.
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=ctx.group)
        buf = buf * share
        out = [chunk.reshape(shape).to(dtype)
               for chunk, shape, dtype in zip(torch.split(buf, ctx.numels), ctx.shapes, ctx.dtypes)]
        return (None, None, *out)


def _check_tensors(tensors):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError('sync_weighted_mean: tensors must be a list or tuple of tensors, got '
                        f'{type(tensors).__name__}')
    if len(tensors) == 0:
        raise ValueError('sync_weighted_mean: tensors must not be empty, got 0 tensors')
    device = None
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'sync_weighted_mean: tensors[{i}] must be a torch.Tensor, got '
                            f'{type(t).__name__}')
        if not t.is_floating_point():
            raise TypeError(f'sync_weighted_mean: tensors[{i}] must be floating point, got {t.dtype}')
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f'sync_weighted_mean: all tensors must be on one device, got {device} '
                             f'and {t.device} (tensors[{i}])')
    return device


def _as_count(count, dtype, device):
    if isinstance(count, torch.Tensor):
        if count.numel() != 1:
            raise ValueError('sync_weighted_mean: count must hold a single value, got shape '
                             f'{tuple(count.shape)}')
        return count.detach().reshape(()).to(device=device, dtype=dtype)
    if not isinstance(count, numbers.Real) or isinstance(count, bool):
        raise TypeError(f'sync_weighted_mean: count must be a number or a tensor, got {count!r} '
                        f'({type(count).__name__})')
    if count < 0:
        raise ValueError(f'sync_weighted_mean: count must be >= 0, got {count!r}')
    # torch.full, not torch.tensor: a fill kernel on the device instead of a blocking host-to-device copy.
    return torch.full((), float(count), dtype=dtype, device=device)


def sync_weighted_mean(tensors, count, group=None):
    r"""Count-weighted mean of per-rank statistics over a process group, differentiable.

    Each rank :math:`r` holds statistics :math:`t_r^{(k)}` (for example the per-channel mean and the
    mean of squares of its local batch) computed over :math:`c_r` local elements. The result for
    each statistic is the global mean over all elements of all ranks,

    .. math::

        m^{(k)} = \frac{\sum_r c_r\, t_r^{(k)}}{C}, \qquad C = \sum_r c_r,

    computed with a single ``all_reduce`` (SUM) of the concatenation
    ``[c_r t_r^{(1)}, ..., c_r t_r^{(K)}, c_r]``. Every rank receives the same :math:`m` and
    :math:`C`.

    Backward. Training minimises :math:`L = \sum_s L_s` (what DDP's gradient averaging computes up
    to a constant), and every :math:`L_s` depends on the shared :math:`m`. Hence

    .. math::

        \frac{\partial L}{\partial t_r^{(k)}}
        = \sum_s \frac{\partial L_s}{\partial m^{(k)}} \frac{\partial m^{(k)}}{\partial t_r^{(k)}}
        = \frac{c_r}{C} \sum_s \frac{\partial L_s}{\partial m^{(k)}},

    i.e. one ``all_reduce`` (SUM) of the incoming gradients, then a scale by :math:`c_r / C`. The
    counts are treated as constants (no gradient).

    Edge cases. A rank with :math:`c_r = 0` still takes part in both collectives (no deadlock), its
    statistics are ignored even when they are NaN, it receives the global result and a zero
    gradient. If :math:`C = 0` on every rank the means are zeros. With no initialised process group
    or a group of size one the inputs are returned unchanged and no collective is issued. No
    ``.item()`` (host synchronisation) is used.

    Args:
        tensors (list[Tensor] | tuple[Tensor]): floating-point statistics of this rank, any shapes,
            one device. The shapes must agree across ranks.
        count (Tensor | float): number of elements (or total weight) behind this rank's statistics,
            ``>= 0``; a one-element tensor or a Python number.
        group (ProcessGroup, optional): group to reduce over. Default: the whole world.

    Returns:
        tuple[tuple[Tensor, ...], Tensor]: the global means, in the order, shapes and dtypes of
        ``tensors``, and the global count :math:`C` as a 0-dim tensor (on the device of
        ``tensors``, float dtype, no gradient).

    Example:
        >>> mean = x.mean(dim=(0, 2, 3))
        >>> sq_mean = (x * x).mean(dim=(0, 2, 3))
        >>> (mean, sq_mean), n = sync_weighted_mean((mean, sq_mean), x.numel() // x.size(1))
        >>> var = sq_mean - mean * mean
    """
    device = _check_tensors(tensors)
    count_dtype = torch.float32
    for t in tensors:
        count_dtype = torch.promote_types(count_dtype, t.dtype)
    count_t = _as_count(count, count_dtype, device)
    if get_world_size(group) <= 1:
        return tuple(tensors), count_t
    *means, total = _SyncWeightedMean.apply(group, count_t, *tensors)
    return tuple(means), total
