"""Estimators of a conv output's channel statistics from a window of iterations, and their errors.

For one conv layer ``y = conv(x, W)`` (no bias, ``groups=1``) an iteration leaves a
:class:`WindowEntry`: its weight ``W_τ``, the channel mean ``μ_τ`` and second moment ``ν_τ`` of ``y`` over
``(N, H, W)``, and their weight-gradients ``∂μ/∂W`` (the mean input patch, shared by all output
channels) and ``∂ν/∂W = 2·E[y·x_patch]``. These are exactly the quantities ``CrossIterationBatchNorm2d``
keeps in its ``window_*`` buffers, computed with the same closed-form functions of ``cbn_mmdet.ops``.

:func:`compensate` moves one past entry to the current weight ``W_t`` by CBN's first-order Taylor step
(for the study's per-entry drift table; tests check it against the layer)::

    μ_τ(W_t) ≈ μ_τ + ρ_μ·Σ_k (W_t − W_τ)[c, k]·∂μ_τ/∂W[k]
    ν_τ(W_t) ≈ ν_τ + ρ_ν·Σ_k (W_t − W_τ)[c, k]·∂ν_τ/∂W[c, k]

The window estimates themselves (naive, CBN, CBN without the ν-compensation) come from the real layer
(:mod:`cbn_mmdet.analysis.cbn_probe`); :func:`pooled_moments` pools exact statistics (BN on the current
batch, the diagnostic and oracle estimators).

Errors against the true statistics ``(μ, σ²)`` (averaged over channels)::

    mean_error = mean_c |μ̂_c − μ_c| / σ_c          var_error = mean_c |σ̂²_c − σ²_c| / σ²_c
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import mean_input_patch, second_moment_weight_grad

__all__ = ['ESTIMATORS', 'WindowEntry', 'record_entry', 'exact_entry', 'compensate', 'pooled_moments',
           'mean_error', 'var_error', 'batch_moments']

# name -> (rho, compensate ν): the window estimators of the study, all computed by the real
# CrossIterationBatchNorm2d (``cbn_probe``); ``cbn_mean_only`` is CBN with its stored ∂ν/∂W zeroed.
ESTIMATORS = {'naive': (0.0, True), 'cbn': (1.0, True), 'cbn_mean_only': (1.0, False)}


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


def pooled_moments(entries):
    """``(μ̄, σ̄²)`` pooled over ``entries``, each a :class:`WindowEntry` or an exact ``(μ, ν)`` pair:
    ``μ̄`` = mean of the ``μ``, ``σ̄² = mean(ν) − μ̄²`` (equal-size batches). One entry: BN's biased
    statistics of that batch; exact statistics of several batches: those of their union. No Taylor
    step and no dropped entries (exact pairs always have ``ν ≥ μ²``): for the compensated window
    estimators see :func:`cbn_mmdet.analysis.cbn_probe.cbn_window_statistics` (the real layer)."""
    pairs = [(e.mean, e.sq) if isinstance(e, WindowEntry) else e for e in entries]
    mean = torch.stack([m for m, _ in pairs]).mean(0)
    sq = torch.stack([q for _, q in pairs]).mean(0)
    return mean, (sq - mean * mean).clamp_min(0)


def mean_error(mean_est, mean_true, var_true, floor=1e-12):
    """``mean_c |μ̂_c − μ_c| / σ_c``: the mean's error in units of the true standard deviation."""
    return ((mean_est - mean_true).abs() / var_true.clamp_min(floor).sqrt()).mean().item()


def var_error(var_est, var_true, floor=1e-12):
    """``mean_c |σ̂²_c − σ²_c| / σ²_c``: the relative error of the variance."""
    return ((var_est - var_true).abs() / var_true.clamp_min(floor)).mean().item()
