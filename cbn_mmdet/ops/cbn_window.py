"""The stateless core of CBN's cross-iteration window: layout, compensation, combination and the ring write.

The window of ``n = buffer_num`` past iterations lives in ONE tensor ``window`` of shape ``(n + 1, L)``, one
row per entry, so that writing an entry is a single ``index_copy_`` (not one guarded write per quantity)::

    row = [ μ (C) | ν (C) | W (C·K) | ∂ν/∂W (C·K) | ∂μ/∂W (groups·K_g) ]

with ``K = C_in/groups·kh·kw`` and ``K_g = K`` (the mean slope is per group, not per channel). Rows
``0 .. n−1`` are a ring of the past entries (``window_head`` is the oldest); row ``n`` is the *staging row*:
a training forward writes the current iteration's entry there, in place, as its parts are computed
(:class:`WindowViews` holds the views it writes through). So the current entry is one more row of the same
tensor, and every row — past and current — goes through the same compensation and the same average: the
current row's weight difference is exactly zero, so its compensated values are its own, and its validity
threshold is ``−inf`` (it is always kept; a variance rounded to ``−1e−12`` must not drop it). The step's
backward then copies the staging row over the oldest ring slot if the step is usable (:class:`StepCommit`).

An empty slot holds the *empty marker*: ``ν = −1`` and zeros elsewhere. A second moment is never
negative, so an empty slot fails the validity test ``ν − μ² ≥ 0`` that every entry takes anyway, and its
zero slopes keep its compensated values finite: no separate "filled" mask has to be read or written.

Every function here is a pure function of tensors (plus ``*_`` ones that write the tensors they are
given, and :func:`compensate` / :func:`combine`, which write their per-row vectors into a scratch when
given one), with a fixed sequence of operators whatever the window holds: no branch on tensor values, no
host read, so a step never synchronises with the device and the functions trace under
``torch.compile(fullgraph=True)``.
"""
import math

import torch

from ._bn_common import lerp_running_stats_, write_row_if_

__all__ = ['window_row_length', 'empty_window', 'window_views', 'compensated_scratch', 'WindowViews',
           'compensate', 'combine', 'window_slopes', 'keep_newest_', 'StepCommit', 'EMPTY_SQ']

# Second moment of an empty slot: impossible for real data (E[y²] >= 0), so the slot is always dropped.
EMPTY_SQ = -1.0


def window_row_length(num_features, weight_numel_per_channel, groups):
    """``L`` of a window row for a conv with ``C`` outputs, ``K`` weights per output and ``groups``."""
    c, k = num_features, weight_numel_per_channel
    return 2 * c + 2 * c * k + groups * k


def empty_window(num_rows, row_length, num_features, dtype=None, device=None):
    """A window of ``num_rows`` empty slots (see the module docstring)."""
    window = torch.zeros(num_rows, row_length, dtype=dtype, device=device)
    window[:, num_features:2 * num_features] = EMPTY_SQ
    return window


def window_views(window, num_features, groups):
    """Named views of the rows of ``window`` ``(r, L)``: ``mean``/``sq`` ``(r, C)``, ``weight``/``sq_grad``
    ``(r, C, K)``, ``mean_grad`` ``(r, groups, K)``, ``stats`` ``(r, 2, C)``; with ``groups == 1`` also the
    column views ``mean_col`` ``(r, C, 1)`` and ``mean_grad_col`` ``(r, K, 1)`` the batched product of
    :func:`compensate` takes. Views share the window's storage: writing them writes the window."""
    r, length = window.shape
    c = num_features
    k = (length - 2 * c) // (2 * c + groups) if length > 2 * c else 0
    a, b, d = 2 * c, 2 * c + c * k, 2 * c + 2 * c * k
    views = {'mean': window[:, :c], 'sq': window[:, c:a],
             'weight': window[:, a:b].view(r, c, k), 'sq_grad': window[:, b:d].view(r, c, k),
             'mean_grad': window[:, d:].view(r, groups, k), 'stats': window[:, :a].view(r, 2, c)}
    if groups == 1:
        views['mean_col'] = window[:, :c].unsqueeze(-1)
        views['mean_grad_col'] = window[:, d:].view(r, k, 1)
        views['mean_grad_rows'] = window[:, d:]
    return views


def compensated_scratch(num_rows, num_features, dtype=None, device=None):
    """The per-step scratch of :func:`compensate` and :func:`combine` for a window of ``num_rows`` rows:

    * ``stats`` ``(r, C, 3)`` = ``[μ, ν, 1]`` of every compensated row and channel, with the views
      ``mean``/``sq`` ``(r, C)`` and ``mean_col`` ``(r, C, 1)`` that :func:`compensate` writes (the ones
      are written here, once); ``stats_by_channel`` ``(C, r, 3)`` is the same memory per channel:
      :func:`combine` takes both sums and the count of kept rows from it in ONE batched product
      ``valid_by_channel @ stats_by_channel`` (per channel ``(1, r) @ (r, 3)``), not a product and a sum;
    * ``valid`` ``(r, C)``: 1 where :func:`combine` kept a row, else 0, stored channel-major so that
      ``valid_by_channel`` ``(C, 1, r)`` is a view of it (``valid_ring``: the rows but the last, the stored
      entries); ``ring_weights`` ``(r − 1, C)`` with its views ``ring_weights_t`` ``(C, r − 1)`` and
      ``ring_weights_col`` ``(r − 1, C, 1)``, the weights :func:`window_slopes` takes;
    * ``sums`` ``(3, C)``, where the product goes (``sums_by_channel`` ``(C, 1, 3)``, its view in the
      product's shape), and its rows ``sum_parts``; ``ones`` ``(C,)``.

    Every operand is a view with a unit stride in one of its last two dimensions, so a GPU's batched
    matrix product takes it as it is (no copy). Made once per window; rewritten every step and only read
    within that step's forward (what a step keeps for its backward is computed from it, never a view of it).
    """
    stats = torch.empty(num_rows, num_features, 3, dtype=dtype, device=device)
    stats[..., 2] = 1
    sums = torch.empty(3, num_features, dtype=dtype, device=device)
    valid_by_channel = torch.empty(num_features, num_rows, dtype=dtype, device=device)
    valid = valid_by_channel.t()
    ring_weights = torch.empty(num_rows - 1, num_features, dtype=dtype, device=device)
    return {'stats': stats, 'stats_by_channel': stats.transpose(0, 1), 'mean': stats[..., 0], 'sq': stats[..., 1],
            'mean_col': stats[..., :1], 'sums': sums, 'sums_by_channel': sums.t().unsqueeze(1),
            'sum_parts': sums.unbind(0), 'ones': torch.ones(num_features, dtype=dtype, device=device),
            'valid': valid, 'valid_by_channel': valid_by_channel.unsqueeze(1), 'valid_ring': valid[:-1],
            'ring_weights': ring_weights, 'ring_weights_t': ring_weights.t(),
            'ring_weights_col': ring_weights.unsqueeze(-1)}


class WindowViews:
    """Every view a layer takes of its window ``(n + 1, L)`` and ring position, made once per buffer.

    * ``ring``: :func:`window_views` of rows ``0 .. n−1`` (the stored entries: state dict, reset, load);
    * ``rows``: :func:`window_views` of all ``n + 1`` rows (what a step compensates and averages);
    * ``threshold``: ``(n + 1, 1)``, the validity bound of each row's compensated variance: 0 for the
      ring, ``−inf`` for the staging row (the current entry is always kept);
    * :meth:`stage`: views of the staging row's parts, in the shape of the tensor written into them
      (cached by shape), so that the forward writes each part with one operator and no reshape;
    * ``head``: the ring position as a 1-element index (``index_copy_`` takes no 0-dim index), and
      ``staging_index`` the staging row's;
    * ``staging_weight``: the staging row's ``W_t`` ``(C, K)``, what the rows are compensated to;
    * ``compensated``: the :func:`compensated_scratch` a step's :func:`compensate` writes into;
    * ``targets``: ``(2, C)``, the step's running-statistics targets ``[μ_t, var_t·M/(M−1)]``, written
      with the entry (the parts ``target_mean``/``target_var`` of :meth:`stage`): packed so that the
      commit chooses both with one ``where`` when the running statistics are packed too;
    * with ``head_pack`` (the ring position stored as ``[head, 1, 0]``, see :class:`StepCommit`):
      ``step_if_ok`` ``[n, 0, 1]`` and ``step`` ``(3,)`` with its views ``step_source`` ``(1,)``,
      ``step_refused`` and ``step_advance``.

    A view is a dispatcher call; taking them once keeps them out of every step.
    """

    def __init__(self, window, head, num_features, groups, head_pack=None):
        self.window, self.head_buffer = window, head
        n = window.shape[0] - 1
        self.num_entries, self.num_features = n, num_features
        self.ring = window_views(window[:n], num_features, groups)
        self.rows = window_views(window, num_features, groups)
        self.ring_rows = window[:n]
        self.staging = window[n:]                                  # (1, L)
        self.staging_stats = self.rows['stats'][n]                 # (2, C): the step's [μ_t, ν_t]
        self.threshold = torch.zeros(n + 1, 1, dtype=window.dtype, device=window.device)
        self.threshold[n] = float('-inf')
        self.head = head.view(1)
        self.staging_index = torch.full((1,), n, dtype=head.dtype, device=head.device)
        self._parts = {name: view[n] for name, view in self.rows.items()}
        self.staging_weight = self._parts['weight']
        self.compensated = compensated_scratch(n + 1, num_features, dtype=window.dtype, device=window.device)
        self.targets = torch.empty(2, num_features, dtype=window.dtype, device=window.device)
        self._parts['target_mean'], self._parts['target_var'] = self.targets.unbind(0)
        self.step_table = head_pack
        if head_pack is not None:
            self.step_if_ok = torch.zeros(3, dtype=head.dtype, device=head.device)
            self.step_if_ok[0], self.step_if_ok[2] = n, 1      # (fills: no host data copied to the device)
            self.step = torch.empty(3, dtype=head.dtype, device=head.device)
            self.step_source = self.step[:1]
            self.step_refused, self.step_advance = self.step.unbind(0)[1:]
        self._shaped = {}

    def matches(self, window, head):
        return window is self.window and head is self.head_buffer

    def stage(self, name, shape):
        """The staging row's part ``name`` viewed as ``shape`` (same number of elements)."""
        key = (name, tuple(shape))
        view = self._shaped.get(key)
        if view is None:
            view = self._shaped[key] = self._parts[name].reshape(shape)
        return view

    def write_staging_(self, **parts):
        """Copy tensors into the staging row's parts of those names (``mean``, ``sq``, ``weight``,
        ``mean_grad``, ``sq_grad``), any dtype and shape of the right size: one multi-tensor copy."""
        tensors = list(parts.values())
        torch._foreach_copy_([self.stage(name, t.shape) for name, t in parts.items()], tensors)

    def finish_entry_(self, mean, unbiased_factor):
        """Once :meth:`write_staging_` has put ``var_t`` into the parts ``sq`` and ``target_var``: the
        second moment ``ν_t = var_t + μ_t²`` and the running variance's target ``var_t·M/(M−1)``
        (``unbiased_factor``), in place, one multi-tensor kernel."""
        target = self._parts['target_var']
        torch._foreach_addcmul_([self.stage('sq', mean.shape), target], [mean, target],
                                [mean, self.compensated['ones']], [1.0, unbiased_factor - 1.0])


def compensate(views, weight_t, rho, out=None):
    """Every row moved to the current weight by CBN's Taylor step: ``(mean, sq)``, each ``(r, C)``.

    ``μ_τ(W_t) = μ_τ + ρ·Σ_k (W_t − W_τ)[c, k]·∂μ_τ/∂W[g(c), k]`` (same for ν). The weight difference is
    formed first and then contracted with the stored slopes: subtracting two large products
    ``Σ W_t·g − Σ W_τ·g`` instead would lose the (small) offset to cancellation, badly so under TF32 (a
    TF32 product of the difference errs by ~1e-3 of the offset itself, not of the statistic). A row that
    stores ``W_t`` itself (the staging row) gets a zero difference: its own values, exactly.

    ``out``: a :func:`compensated_scratch` of the right size to write the rows into (the layer's own, so
    that a step allocates no per-row vectors and takes no view of fresh ones); the results are then its
    ``mean`` and ``sq``.
    """
    stored_w = views['weight']
    r, c, k = stored_w.shape
    # (``weight_t`` may be given as (C, K) already, e.g. the staging row's copy: no reshape then)
    delta = torch.sub(weight_t if weight_t.dim() == 2 else weight_t.reshape(c, k), stored_w)   # (r, C, K)
    if 'mean_grad_col' in views:    # one mean slope per row: a batched matrix-vector product
        if out is None:
            mean = torch.baddbmm(views['mean_col'], delta, views['mean_grad_col'], alpha=rho).view(r, c)
        else:
            torch.baddbmm(views['mean_col'], delta, views['mean_grad_col'], alpha=rho, out=out['mean_col'])
            mean = out['mean']
    else:
        mean_grad = views['mean_grad']
        groups = mean_grad.shape[1]
        dot = (delta.view(r, groups, c // groups, k) * mean_grad.unsqueeze(2)).sum(-1).view(r, c)
        mean = torch.add(views['mean'], dot, alpha=rho, out=None if out is None else out['mean'])
    # The (r, C, K) product reuses delta's memory when no graph needs delta: one |window|-sized temporary
    # per step instead of two (on a CPU each fresh large temporary also pays its page faults).
    product = delta.mul_(views['sq_grad']) if not delta.requires_grad else delta * views['sq_grad']
    sq = torch.add(views['sq'], product.sum(-1), alpha=rho, out=None if out is None else out['sq'])
    return mean, sq


def combine(mean, sq, threshold, scratch=None, with_shares=True):
    """Average the rows whose compensated variance passes ``threshold``.

    Args:
        mean, sq: ``(r, C)`` from :func:`compensate`.
        threshold: ``(r, 1)``; a row is kept where ``sq − mean² ≥ threshold`` (official rule for past
            entries: 0; the current entry: ``−inf``, always kept; empty slots never pass 0).
        scratch: the :func:`compensated_scratch` whose ``mean`` and ``sq`` these are: both sums and the
            count are then one batched matrix product into its ``sums``, and no tensor is stacked or split.
        with_shares: False when the caller does not need ``shares`` (returned as None: one op fewer).

    Returns:
        ``(mean_bar, sq_bar, coef, shares)``: the mean of the kept ``mean`` and ``sq`` ``(C,)`` each,
        ``coef`` ``(C,)`` = 1/(number of kept rows), and ``shares`` ``(r, C)``: each row's weight in the
        average (``coef`` where kept, 0 elsewhere).
    """
    variance = torch.addcmul(sq, mean, mean, value=-1)
    if scratch is None:
        valid = variance >= threshold
        ones = torch.ones_like(mean[0])
        sum_mean, sum_sq, count = (valid * torch.stack((mean, sq, ones.expand_as(mean)))).sum(1).unbind(0)
    else:         # the mask as 0/1 in the window's dtype, into the scratch (window_slopes reads it)
        valid = torch.ge(variance, threshold, out=scratch['valid'])
        ones = scratch['ones']
        # per channel, (1, r) kept-row mask times the (r, 3) rows [μ, ν, 1]: Σμ, Σν and the count at once
        torch.bmm(scratch['valid_by_channel'], scratch['stats_by_channel'], out=scratch['sums_by_channel'])
        sum_mean, sum_sq, count = scratch['sum_parts']
    # the two averages and 1/count, one multi-tensor kernel
    mean_bar, sq_bar, coef = torch._foreach_div([sum_mean, sum_sq, ones], [count, count, count])
    return mean_bar, sq_bar, coef, valid * coef if with_shares else None


def window_slopes(ring, weights, weights_t=None, weights_col=None):
    """Weighted sums over the stored entries of their slopes: ``(Σ_τ w_τ,c·∂μ_τ/∂W[g(c)], Σ_τ w_τ,c·∂ν_τ/∂W[c])``,
    each ``(C, K)``, for per-entry, per-channel weights ``weights`` ``(n, C)`` and the stored entries'
    :func:`window_views` ``ring``. ``weights_t``/``weights_col``: ``weights.t()`` and ``weights.unsqueeze(-1)``
    when the caller holds them already (views of a scratch: no view is taken per step)."""
    weights_t = weights.t() if weights_t is None else weights_t
    weights_col = weights.unsqueeze(-1) if weights_col is None else weights_col
    mean_grad = ring['mean_grad']                                             # (n, groups, K)
    n, groups, _ = mean_grad.shape
    if groups == 1:
        d_mean = torch.mm(weights_t, ring['mean_grad_rows'])
    else:
        c = weights.shape[1]
        d_mean = torch.einsum('ngo,ngk->gok', weights.view(n, groups, c // groups), mean_grad).reshape(c, -1)
    d_sq = (weights_col * ring['sq_grad']).sum(0)
    return d_mean, d_sq


def keep_newest_(ring, head, size, num_features):
    """Empty every ring slot but the ``size`` newest (``two_stage=False`` while the window grows)."""
    n = ring.shape[0]
    slots = torch.arange(n, device=head.device)
    old = ((head - 1 - slots).remainder(n) >= size).view(n, 1)       # age 0 = the newest entry
    empty = torch.zeros_like(ring[:1])
    empty[:, num_features:2 * num_features] = EMPTY_SQ
    ring.copy_(torch.where(old, empty, ring))


class StepCommit:
    """What one training step writes into a layer's state — running statistics, window entry, counter of
    unusable steps — held until the step's backward has seen its gradient.

    :meth:`apply` writes it only if the step's statistics (``check``: the whole window entry when there is
    one — a non-finite slope would poison every later compensation) and the gradient statistic it is
    given are finite: a mixed-precision overflow step, which a GradScaler skips, then enters no average,
    exactly as a step with non-finite activations. Every write is a device-side ``where``, never a host
    read.

    The window entry is the staging row (``views.staging``, written by the forward). A second training
    forward of the layer before this step's backward (a module called twice) would overwrite it: the layer
    calls :meth:`own_row` first, which gives the commit a copy of its row (and of its targets).

    Two layouts make the commit short; the layer keeps them (and the commit falls back to one ``where``
    per tensor when a buffer was replaced behind its back):

    * ``running_pack``: ``running_mean`` and ``running_var`` as the rows of one ``(2, C)`` tensor, and
      ``targets`` ``(2, C)`` likewise: one ``where`` and one ``lerp_`` update both;
    * the ring position stored as element 0 of ``[head, 1, 0]`` (``views.step_table``): the values of a
      refused step for (source row of the ring write, refusals, advance of the ring); ``views.step_if_ok``
      ``[n, 0, 1]`` holds an accepted step's. One ``where`` then gives all three, and the ring position and
      the refusal counter advance by them in one fused multi-tensor add of like dtypes.
    """

    __slots__ = ('check', 'num_nonfinite', 'running', 'targets', 'factor', 'views', 'row', 'keep', 'usable',
                 'num_batches', 'pending', 'running_pack')

    def __init__(self, check, num_nonfinite, running=(), targets=(), factor=0.0, views=None, keep=None,
                 usable=None, num_batches=None, running_pack=None):
        self.check, self.num_nonfinite, self.usable = check, num_nonfinite, usable
        # a refused step is taken back from this counter (the cumulative average's count)
        self.num_batches = num_batches
        self.running, self.factor = list(running), factor
        # a (2, C) tensor (the views' targets) or a pair of (C,) tensors
        self.targets = targets if isinstance(targets, torch.Tensor) else list(targets)
        self.running_pack = running_pack if self.running and isinstance(targets, torch.Tensor) else None
        self.views, self.keep = views, keep
        self.row = None if views is None else views.staging
        if views is not None:
            self.check = self.row
        self.pending = True

    def own_row(self):
        """Detach the entry from the staging row (before a later forward overwrites it)."""
        if self.pending and self.row is not None and self.row is self.views.staging:
            self.row = self.check = self.row.clone()
            if isinstance(self.targets, torch.Tensor) and self.targets is self.views.targets:
                self.targets = self.targets.clone()

    def rebind(self, views, num_nonfinite, running, num_batches, running_pack=None):
        """Point the commit at a layer's new buffers (the module was cast, e.g. ``.double()``, between the
        step's forward and its backward): the entry is copied out of the old window first, in the new
        window's dtype."""
        self.own_row()
        self.row = self.check = self.row.to(views.window.dtype)
        self.views, self.num_nonfinite, self.num_batches = views, num_nonfinite, num_batches
        if self.running:
            self.running = list(running)
            self.running_pack = running_pack if isinstance(self.targets, torch.Tensor) else None

    def apply(self, grad_stat=None):
        if not self.pending:    # applied already, or given up by the layer (see rebind's caller)
            return
        self.pending = False
        # ±Inf or NaN anywhere in the statistics or the gradient statistic makes their L1 norm +Inf or
        # NaN; a norm is never −Inf, so one comparison is ``isfinite`` (four operators) here. Both norms
        # are one multi-tensor kernel.
        if grad_stat is None:
            total = torch.linalg.vector_norm(self.check, 1)
        else:
            total = torch.add(*torch._foreach_norm([self.check, grad_stat], 1))
        ok = total < math.inf
        views = self.views
        # the staging row into the ring, by the packed ring position (see the class docstring)
        packed_step = (views is not None and self.usable is None and self.row is views.staging
                       and views.step_table is not None)
        if packed_step:
            torch.where(ok, views.step_if_ok, views.step_table, out=views.step)
            refused = views.step_refused
        else:
            refused = ok.logical_not()
        if views is None:
            self.num_nonfinite.add_(refused)
        if self.num_batches is not None:
            self.num_batches.sub_(refused.to(self.num_batches.dtype))
        if self.running_pack is not None:
            pack, targets = self.running_pack, self.targets
            factor = self.factor.to(pack.dtype) if isinstance(self.factor, torch.Tensor) else self.factor
            pack.lerp_(torch.where(ok, targets if targets.dtype == pack.dtype else targets.to(pack.dtype), pack),
                       factor)
        elif self.running:
            mean, var = (torch.where(ok, t.to(r.dtype), r) for r, t in zip(self.running, self.targets))
            lerp_running_stats_(*self.running, mean, var, self.factor)
        if views is not None:
            head = views.head_buffer
            if packed_step:
                source = views.window.index_select(0, views.step_source)
                views.window.index_copy_(0, views.head, source)
                torch._foreach_add_([head, self.num_nonfinite], [views.step_advance, refused])
            else:
                # ``usable``: e.g. a synced layer's global batch was not empty
                write = ok if self.usable is None else ok & self.usable
                if self.row is views.staging:
                    # the ring slot takes the staging row, or its own content back: a choice of index, not
                    # a row-sized ``where`` (index_copy_ takes no source that overlaps its destination)
                    source = views.window.index_select(0, torch.where(write, views.staging_index, views.head))
                    views.window.index_copy_(0, views.head, source)
                else:
                    write_row_if_(views.window, views.head, self.row, write)
                # the ring advances where the entry was written; the refusal counter in the same kernel
                torch._foreach_add_([head, self.num_nonfinite], [write, refused])
            head.remainder_(views.num_entries)
            if self.keep is not None:
                keep_newest_(views.ring_rows, head, self.keep, views.num_features)
