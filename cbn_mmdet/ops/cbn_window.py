"""The stateless core of CBN's cross-iteration window: layout, compensation, combination and the ring write.

The window of ``n = buffer_num`` past iterations lives in ONE tensor ``window`` of shape ``(n, L)``, one row
per entry, so that writing an entry is a single ``index_copy_`` (not one guarded write per quantity)::

    row = [ μ (C) | ν (C) | W (C·K) | ∂ν/∂W (C·K) | ∂μ/∂W (groups·K_g) ]

with ``K = C_in/groups·kh·kw`` and ``K_g = K`` (the mean slope is per group, not per channel). An empty
slot holds the *empty marker*: ``ν = −1`` and zeros elsewhere. A second moment is never negative, so an
empty slot fails the validity test ``ν − μ² ≥ 0`` that every entry takes anyway, and its zero slopes keep
its compensated values finite: no separate "filled" mask has to be read or written per step.

Every function here is a pure function of tensors (plus ``*_`` ones that write the tensors they are
given), with a fixed sequence of operators whatever the window holds: no branch on tensor values, no
host read, so a step never synchronises with the device and the functions trace under
``torch.compile(fullgraph=True)``.
"""
import torch

from ._bn_common import lerp_running_stats_, write_row_if_

__all__ = ['window_row_length', 'empty_window', 'window_views', 'compensate', 'combine', 'window_row',
           'push_row_', 'keep_newest_', 'StepCommit', 'EMPTY_SQ']

# Second moment of an empty slot: impossible for real data (E[y²] >= 0), so the slot is always dropped.
EMPTY_SQ = -1.0


def window_row_length(num_features, weight_numel_per_channel, groups):
    """``L`` of a window row for a conv with ``C`` outputs, ``K`` weights per output and ``groups``."""
    c, k = num_features, weight_numel_per_channel
    return 2 * c + 2 * c * k + groups * k


def empty_window(num_entries, row_length, num_features, dtype=None, device=None):
    """A window of empty slots (see the module docstring)."""
    window = torch.zeros(num_entries, row_length, dtype=dtype, device=device)
    window[:, num_features:2 * num_features] = EMPTY_SQ
    return window


def window_views(window, num_features, groups):
    """Named views of a window ``(n, L)``: ``mean``/``sq`` ``(n, C)``, ``weight``/``sq_grad`` ``(n, C, K)``,
    ``mean_grad`` ``(n, groups, K)``. Views share the window's storage: writing them writes the window."""
    n, length = window.shape
    c = num_features
    k = (length - 2 * c) // (2 * c + groups) if length > 2 * c else 0
    a, b, d = 2 * c, 2 * c + c * k, 2 * c + 2 * c * k
    return {'mean': window[:, :c], 'sq': window[:, c:a],
            'weight': window[:, a:b].view(n, c, k), 'sq_grad': window[:, b:d].view(n, c, k),
            'mean_grad': window[:, d:].view(n, groups, k), 'stats': window[:, :a].view(n, 2, c)}


def compensate(views, weight_t, rho):
    """Every stored entry moved to the current weight by CBN's Taylor step: ``(n, 2, C)`` of ``[μ_τ(W_t), ν_τ(W_t)]``.

    ``μ_τ(W_t) = μ_τ + ρ·Σ_k (W_t − W_τ)[c, k]·∂μ_τ/∂W[g(c), k]`` (same for ν). The weight difference is
    formed first and then contracted with the stored slopes: subtracting two large products
    ``Σ W_t·g − Σ W_τ·g`` instead would lose the (small) offset to cancellation, badly so under TF32.
    """
    stored_w = views['weight']
    n, c, k = stored_w.shape
    delta = weight_t.reshape(c, k).to(stored_w.dtype) - stored_w                          # (n, C, K)
    mean_grad = views['mean_grad']
    groups = mean_grad.shape[1]
    if groups == 1:   # the one mean slope broadcasts over the channels: no copy
        mean_dot = (delta * mean_grad).sum(-1)
    else:
        mean_dot = (delta.view(n, groups, c // groups, k) * mean_grad.unsqueeze(2)).sum(-1).view(n, c)
    sq_dot = (delta * views['sq_grad']).sum(-1)
    return torch.add(views['stats'], torch.stack((mean_dot, sq_dot), 1), alpha=rho)


def combine(current, compensated):
    """Average the current entry with every valid compensated one.

    Args:
        current: ``(2, C)``, the current batch's ``[μ_t, ν_t]`` (always kept: ``ν_t − μ_t²`` is a
            variance).
        compensated: ``(n, 2, C)`` from :func:`compensate`.

    Returns:
        ``(stats, coef, valid)``: ``stats`` ``(2, C)`` = ``[μ̄, S]`` (mean of the kept μ and ν), ``coef``
        ``(C,)`` = 1/(number of kept entries, the current one included): the current entry's share,
        ``valid`` ``(n, C)`` the past entries kept (official rule: compensated ``ν − μ² ≥ 0``; empty slots
        never are). Each kept past entry's share is ``valid·coef``.
    """
    mean, sq = compensated.unbind(1)
    valid = torch.addcmul(sq, mean, mean, value=-1) >= 0
    total = (compensated * valid.unsqueeze(1)).sum(0) + current
    coef = torch.reciprocal(valid.sum(0, dtype=current.dtype) + 1)
    return total * coef, coef, valid


def window_row(mean_t, sq_t, weight_t, sq_grad, mean_grad, dtype):
    """The current entry as one window row (see the module docstring for the layout)."""
    parts = (mean_t, sq_t, weight_t.reshape(-1), sq_grad.reshape(-1), mean_grad.reshape(-1))
    return torch.cat([p.to(dtype) for p in parts])


def push_row_(window, head, row, valid):
    """Write ``row`` over the oldest slot (a ring: order is irrelevant to a mean) if ``valid``.

    ``valid`` (0-dim bool tensor) False keeps the slot's content and the ring position, without reading
    the flag on the host: the slot is rewritten with its own content.
    """
    write_row_if_(window, head, row, valid)
    head.add_(valid).remainder_(window.shape[0])


def keep_newest_(window, head, size, num_features):
    """Empty every slot but the ``size`` newest (``two_stage=False`` while the window grows)."""
    n = window.shape[0]
    slots = torch.arange(n, device=head.device)
    old = ((head - 1 - slots).remainder(n) >= size).view(n, 1)       # age 0 = the newest entry
    empty = torch.zeros_like(window[:1])
    empty[:, num_features:2 * num_features] = EMPTY_SQ
    window.copy_(torch.where(old, empty, window))


class StepCommit:
    """What one training step writes into a layer's state — running statistics, window entry, counter of
    unusable steps — held until the step's backward has seen its gradient.

    :meth:`apply` writes it only if the step's statistics (``check``) and the gradient statistic it is given
    are finite: a mixed-precision overflow step, which a GradScaler skips, then enters no average, exactly as
    a step with non-finite activations. Every write is a device-side ``where``, never a host read.
    """

    __slots__ = ('check', 'num_nonfinite', 'running', 'targets', 'factor', 'window', 'head', 'row', 'keep',
                 'num_features', 'usable', 'num_batches')

    def __init__(self, check, num_nonfinite, running=(), targets=(), factor=0.0, window=None, head=None, row=None,
                 keep=None, num_features=0, usable=None, num_batches=None):
        self.check, self.num_nonfinite, self.usable = check, num_nonfinite, usable
        # a refused step is taken back from this counter (the cumulative average's count)
        self.num_batches = num_batches
        self.running, self.targets, self.factor = list(running), list(targets), factor
        self.window, self.head, self.row, self.keep, self.num_features = window, head, row, keep, num_features

    def apply(self, grad_stat=None):
        total = self.check.sum() if grad_stat is None else self.check.sum() + grad_stat.sum()
        ok = total * 0 == 0        # NaN for any ±Inf or NaN among them
        refused = ok.logical_not()
        self.num_nonfinite.add_(refused)
        if self.num_batches is not None:
            self.num_batches.sub_(refused.to(self.num_batches.dtype))
        if self.running:
            mean, var = (torch.where(ok, t.to(r.dtype), r) for r, t in zip(self.running, self.targets))
            lerp_running_stats_(*self.running, mean, var, self.factor)
        if self.window is not None:
            # ``usable``: e.g. a synced layer's global batch was not empty
            push_row_(self.window, self.head, self.row, ok if self.usable is None else ok & self.usable)
            if self.keep is not None:
                keep_newest_(self.window, self.head, self.keep, self.num_features)
