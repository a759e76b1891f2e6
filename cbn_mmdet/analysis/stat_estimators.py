"""Estimators of a conv output's channel statistics from a window of iterations, and their errors.

For one conv layer ``y = conv(x, W)`` (no bias, ``groups=1``) an iteration leaves a
:class:`WindowEntry`: its weight ``W_τ``, the channel mean ``μ_τ`` and second moment ``ν_τ`` of ``y`` over
``(N, H, W)``, and their weight-gradients ``∂μ/∂W`` (the mean input patch, shared by all output
channels) and ``∂ν/∂W = 2·E[y·x_patch]``. These are exactly the quantities ``CrossIterationBatchNorm2d``
keeps in its ``window_*`` buffers, computed with the same closed-form functions of ``cbn_mmdet.ops``.

:func:`window_estimate` reproduces the layer's aggregation with torch ops (tests check it against the
layer): every past entry is moved to the current weight ``W_t`` by a first-order Taylor step::

    μ_τ(W_t) ≈ μ_τ + ρ_μ·Σ_k (W_t − W_τ)[c, k]·∂μ_τ/∂W[k]
    ν_τ(W_t) ≈ ν_τ + ρ_ν·Σ_k (W_t − W_τ)[c, k]·∂ν_τ/∂W[c, k]

entries whose ``ν − μ²`` is negative are dropped, ``μ̄`` is the mean of the kept ``μ`` and
``σ̄² = mean(kept ν) − μ̄²``. ``(ρ_μ, ρ_ν) = (1, 1)`` is CBN, ``(0, 0)`` naive cross-iteration
averaging, ``(1, 0)`` CBN without the ν-compensation. A window of one entry is plain BN on the current
batch (biased variance, as torch BN normalises).

Errors against the true statistics ``(μ, σ²)`` (averaged over channels)::

    mean_error = mean_c |μ̂_c − μ_c| / σ_c          var_error = mean_c |σ̂²_c − σ²_c| / σ²_c
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import mean_input_patch, second_moment_weight_grad

__all__ = ['ESTIMATORS', 'WindowEntry', 'record_entry', 'exact_entry', 'compensate', 'window_estimate',
           'mean_error', 'var_error', 'batch_moments']

# name -> (rho for μ, rho for ν); the window estimators of the study.
ESTIMATORS = {'naive': (0.0, 0.0), 'cbn': (1.0, 1.0), 'cbn_mean_only': (1.0, 0.0)}


@dataclass
class WindowEntry:
    """What one iteration contributes to one layer's window (all detached)."""
    weight: torch.Tensor      # (C_out, C_in, kh, kw): the conv weight of that iteration
    mean: torch.Tensor        # (C_out,): μ over (N, H, W)
    sq: torch.Tensor          # (C_out,): ν = E[y²] over (N, H, W)
    mean_grad: torch.Tensor   # (C_in·kh·kw,): ∂μ_c/∂W_c, the same for every c
    sq_grad: torch.Tensor     # (C_out, C_in, kh, kw): ∂ν_c/∂W_c


def _check_conv(conv):
    if conv.groups != 1 or conv.bias is not None or isinstance(conv.padding, str):
        raise ValueError('stat_estimators: only bias-free, groups=1 convs with explicit padding are '
                         f'supported, got groups={conv.groups}, bias={conv.bias is not None}, '
                         f'padding={conv.padding!r}')


def batch_moments(y):
    """``(μ, ν)`` of ``y`` over ``(N, H, W)``."""
    return y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))


@torch.no_grad()
def record_entry(conv, x, weight=None):
    """The :class:`WindowEntry` of ``conv`` applied to ``x`` with ``weight`` (default: ``conv.weight``)."""
    _check_conv(conv)
    weight = (conv.weight if weight is None else weight).detach()
    y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation)
    mean, sq = batch_moments(y)
    patch = mean_input_patch(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    sq_grad = second_moment_weight_grad(x, y, weight.shape, conv.stride, conv.padding, conv.dilation)
    return WindowEntry(weight.clone(), mean, sq, patch.flatten(), sq_grad)


@torch.no_grad()
def exact_entry(conv, x, weight):
    """``(μ, ν)`` of ``conv(x)`` computed exactly with ``weight`` (no Taylor step)."""
    _check_conv(conv)
    return batch_moments(F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation))


def compensate(entry, weight_t, rho_mean=1.0, rho_sq=1.0):
    """``(μ_τ(W_t), ν_τ(W_t))`` of a past ``entry`` by the first-order Taylor step of the module docstring."""
    delta = (weight_t - entry.weight).flatten(1)                     # (C_out, K)
    mean = entry.mean + rho_mean * (delta @ entry.mean_grad)
    sq = entry.sq + rho_sq * (delta * entry.sq_grad.flatten(1)).sum(1)
    return mean, sq


def window_estimate(current, past, weight_t=None, rho_mean=1.0, rho_sq=1.0):
    """``(μ̄, σ̄²)`` from the ``current`` entry (used as is) and the ``past`` entries (compensated).

    Mirrors ``CrossIterationBatchNorm2d._aggregate``: an entry (the current one included) whose
    ``ν − μ²`` is negative is dropped per channel; if none is left, the current entry alone is used.

    Args:
        current (WindowEntry | tuple): the current iteration (a ``(μ, ν)`` tuple is accepted).
        past (list): past entries, each a :class:`WindowEntry` (compensated to ``weight_t``) or a
            ``(μ, ν)`` tuple of already-exact statistics (used as is).
        weight_t (Tensor): the current weight; default ``current.weight``.
    """
    cur_mean, cur_sq = (current.mean, current.sq) if isinstance(current, WindowEntry) else current
    if weight_t is None and past and isinstance(current, WindowEntry):
        weight_t = current.weight
    means, sqs = [cur_mean], [cur_sq]
    for entry in past:
        if isinstance(entry, WindowEntry):
            mean, sq = compensate(entry, weight_t, rho_mean, rho_sq)
        else:
            mean, sq = entry
        means.append(mean)
        sqs.append(sq)
    means, sqs = torch.stack(means), torch.stack(sqs)
    keep = (sqs - means * means >= 0).to(means.dtype)
    kept = keep.sum(0)
    none = kept == 0
    mean = torch.where(none, cur_mean, (keep * means).sum(0) / kept.clamp_min(1))
    sq = torch.where(none, cur_sq, (keep * sqs).sum(0) / kept.clamp_min(1))
    return mean, (sq - mean * mean).clamp_min(0)


def mean_error(mean_est, mean_true, var_true, floor=1e-12):
    """``mean_c |μ̂_c − μ_c| / σ_c``: the mean's error in units of the true standard deviation."""
    return ((mean_est - mean_true).abs() / var_true.clamp_min(floor).sqrt()).mean().item()


def var_error(var_est, var_true, floor=1e-12):
    """``mean_c |σ̂²_c − σ²_c| / σ²_c``: the relative error of the variance."""
    return ((var_est - var_true).abs() / var_true.clamp_min(floor)).mean().item()
