"""Cross-Iteration Batch Normalization (CBN).

Zhuliang Yao, Yue Cao, Shuxin Zheng, Gao Huang, Stephen Lin. "Cross-Iteration Batch Normalization".
CVPR 2021, arXiv:2002.05712.

Small batches give noisy BN statistics. CBN averages the statistics of the current and the
``buffer_num`` previous iterations; the past ones were computed with older conv weights, so each is
first moved to the current weight by a first-order Taylor step in the layer's *own* conv weight::

    μ_τ(W_t) ≈ μ_τ + ρ·Σ_k (W_t − W_τ)[c, k] · ∂μ_τ/∂W[c, k]        (same for ν = E[y²])

Defaults reproduce the official implementation's choices (so numbers compare with the paper's), with
its defects fixed; see ``docs/cbn.md`` for every deviation. The statistic gradients are closed-form
(``cbn_stat_grads``): no ``torch.autograd.grad`` in the training path of a bound layer.

BibTeX::

    @inproceedings{yao2021cbn, title={Cross-Iteration Batch Normalization}, author={Yao, Zhuliang and
      Cao, Yue and Zheng, Shuxin and Huang, Gao and Lin, Stephen}, booktitle={CVPR}, year={2021}}
"""
import math
import numbers
import warnings

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._validate import (
    check_eps,
    check_finite,
    check_input_dim,
    check_non_negative_int,
    check_positive_int,
    check_unit_interval,
)
from .cbn_binding import CBNBindError, queue_for_binding
from .cbn_normalise import cbn_normalise
from .cbn_stat_grads import (
    conv_output_size,
    mean_input_patch,
    sampled_second_moment_weight_grad,
    second_moment_weight_grad,
)
from .distributed import get_world_size, sync_weighted_mean

__all__ = ['CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d']

_OWNER = 'CrossIterationBatchNorm2d'
# Buffers a plain BN checkpoint lacks; see _load_from_state_dict for the policy.
_CBN_ONLY_BUFFERS = ('iter_count', 'num_fallbacks', 'num_nonfinite', 'window_head', 'window_filled', 'window_mean',
                     'window_sq', 'window_weight', 'window_mean_grad', 'window_sq_grad')
# Buffers whose shape depends on the conv, unknown until the layer is bound (materialised lazily).
_CONV_SHAPED_BUFFERS = ('window_weight', 'window_mean_grad', 'window_sq_grad')


class CrossIterationBatchNorm2d(_BatchNorm):
    r"""Cross-iteration batch normalization over a 4D input, bound to the conv that produces it.

    Training, window path (``buffer_num > 0``, burn-in over, input requires grad): with the current
    batch statistics :math:`\mu_t, \nu_t` and the compensated past entries, every entry whose
    :math:`\nu - \mu^2 < 0` is dropped, :math:`\bar\mu` = mean of the kept :math:`\mu`,
    :math:`\bar\sigma^2` = mean of the kept :math:`\nu` − :math:`\bar\mu^2`, and

    .. math:: y = \gamma \frac{x - \bar\mu}{\sqrt{\bar\sigma^2} + \epsilon} + \beta

    Gradients flow through :math:`\mu_t, \nu_t` only. Plain path (burn-in, ``buffer_num=0``): the
    current batch's mean and *unbiased* variance (the official choice). Both paths update
    ``running_mean``/``running_var`` with the current batch's mean and unbiased variance; eval uses them.

    Args:
        num_features (int): channels ``C``.
        eps (float): added to the standard deviation (official), or to the variance with
            ``eps_inside_sqrt=True`` (torch BN). Default: 1e-5.
        momentum (float | None): running-statistics momentum, torch convention
            (``None``: cumulative average). Default: 0.1.
        affine (bool): learnable per-channel γ, β. Default: True.
        track_running_stats (bool): keep running statistics for eval. Default: True.
        buffer_num (int): past iterations kept; the window is ``buffer_num + 1``. Default: 0 (plain).
        rho (float): scale of the Taylor compensation (0 = naive cross-iteration averaging). Default: 1.
        burnin (int): plain-BN training forwards before the window is used, counted per layer and per
            call like the official code. Epoch-based burn-in: ``cbn_mmdet.engine.CBNBurnInHook``.
        sync (bool): average statistics and their weight-gradients over ``process_group`` before the
            compensation (SyncCBN). Default: False.
        process_group: the group for ``sync``; ``None`` is the default group.
        eps_inside_sqrt (bool): normalise by ``sqrt(var + eps)`` like torch BN. Default: False (official).
        unbiased_plain_var (bool): the plain path normalises with the unbiased variance (official).
            ``False`` uses the biased variance like torch BN. Default: True.
        grad_through_window (bool): opt-in, beyond the paper. The official backward treats the
            compensated past statistics as constants although they depend on the current conv weight
            (linearly, through the Taylor step); ``True`` lets the gradient flow through that
            dependence into the conv weight (same forward; exact gradient of the compensated
            estimate). ``docs/fidelity.md`` shows it fixes CBN's training at batch 1-2. Default: False.
        stat_grad_sample (float | None): opt-in fast mode, beyond the paper. ``None`` (default): the exact
            ``∂ν/∂W`` (one extra conv weight-gradient per layer per step). A fraction in (0, 1]: estimate it
            from about that fraction of the output positions, a strided grid ``rh × rw`` with
            ``rh·rw = round(1/stat_grad_sample)`` whose offset cycles over the grid from step to step
            (``0.25``: every other row and column, 4× cheaper). Only the slope used to compensate *past*
            entries is estimated; the current statistics, ``∂μ/∂W`` and all gradients stay exact. See
            ``docs/cbn.md`` ("Fast mode") for when the added error is negligible.
        two_stage (bool): official option. True: no window during the burn-in, the full window after it.
            False: ``int(buffer_num · min(iter / burnin, 1))`` past entries, growing over the burn-in
            (``burnin=0``: the full window from the start). Default: True.
        frozen (bool): official ``FROZEN``: training normalises with the running statistics and updates
            neither them nor the window. Default: False.

    Shape:
        - Input: ``(N, C, H, W)``; ``N = 0`` gives an empty output. Output: same shape.

    Example:
        >>> conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        >>> cbn = CrossIterationBatchNorm2d(32, buffer_num=3, burnin=0)
        >>> bind_cbn_to_conv(cbn, conv)   # or forward(x, weight) with the conv weight
        >>> y = cbn(conv(torch.randn(2, 16, 8, 8, requires_grad=True)))
    """

    _abbr_ = 'bn'   # so BN checkpoints (``...bn.weight``) load into CBN models
    # 3: window_weight / window_sq_grad stored flat as (buffer_num, C, K) (5-D before; still loadable).
    _version = 3

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 buffer_num=0, rho=1.0, burnin=0, sync=False, process_group=None,
                 eps_inside_sqrt=False, unbiased_plain_var=True, stat_grad_sample=None,
                 grad_through_window=False, two_stage=True, frozen=False, device=None,
                 dtype=None):
        num_features = check_positive_int('num_features', num_features, _OWNER)
        eps = check_eps(eps, _OWNER)
        momentum = check_unit_interval('momentum', momentum, _OWNER, allow_none=True)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.buffer_num = check_non_negative_int('buffer_num', buffer_num, _OWNER)
        self.rho = check_finite('rho', rho, _OWNER)
        self.burnin = check_non_negative_int('burnin', burnin, _OWNER)
        self.sync = bool(sync)
        self.process_group = process_group
        self.eps_inside_sqrt = bool(eps_inside_sqrt)
        self.unbiased_plain_var = bool(unbiased_plain_var)
        self.grad_through_window = bool(grad_through_window)
        self.two_stage = _check_bool('two_stage', two_stage)
        self.frozen = _check_bool('frozen', frozen)
        if self.frozen and not track_running_stats:
            raise ValueError(f'{_OWNER}: frozen=True normalises with the running statistics, so it needs '
                             f'track_running_stats=True, got track_running_stats={track_running_stats!r}')
        self.stat_grad_sample = _check_sample_fraction(stat_grad_sample)
        self._sample_step = _sample_step(self.stat_grad_sample)
        # Switched off during an epoch-based burn-in by CBNBurnInHook (re-derived from the epoch each
        # epoch, so it needs no checkpointing).
        self.window_enabled = True

        factory = dict(device=device)
        self.register_buffer('iter_count', torch.zeros((), dtype=torch.long, **factory))
        self.register_buffer('num_fallbacks', torch.zeros((), dtype=torch.long, **factory))
        # Training steps whose batch statistics were NaN/Inf: such a step updates neither the running
        # statistics nor the window (NormHealthHook reports it by layer name and iteration).
        self.register_buffer('num_nonfinite', torch.zeros((), dtype=torch.long, **factory))
        self.register_buffer('window_head', torch.zeros((), dtype=torch.long, **factory))
        self.register_buffer('window_filled', torch.zeros(self.buffer_num, dtype=torch.bool, **factory))
        fdtype = dict(device=device, dtype=dtype)
        self.register_buffer('window_mean', torch.zeros(self.buffer_num, num_features, **fdtype))
        self.register_buffer('window_sq', torch.zeros(self.buffer_num, num_features, **fdtype))
        for name in _CONV_SHAPED_BUFFERS:
            self.register_buffer(name, torch.zeros(0, **fdtype))

        # Host-side mirror of iter_count: the burn-in decision must not read a device tensor.
        self._iter_shadow = 0
        self._binding = None          # (conv, hook handle); a plain attribute, not a submodule
        self._conv_input = None       # the bound conv's latest input, consumed by the next forward
        self._conv_output = None      # ... and its output: the next forward checks it is its input
        self._conv_name = None
        self._bind_error = None
        self._layer_name = None
        self._last_past_kept = None   # per-entry weights of the last window step (grad_through_window)
        if self.buffer_num > 0:
            queue_for_binding(self)

    # ------------------------------------------------------------------ binding
    @property
    def needs_conv(self):
        return self.buffer_num > 0

    @property
    def is_bound(self):
        return self._binding is not None

    @property
    def bound_conv(self):
        return None if self._binding is None else self._binding[0]

    def _display_name(self):
        return f"CBN layer '{self._layer_name}'" if self._layer_name else 'CBN layer'

    def record_bind_error(self, message):
        self._bind_error = message

    def bind_conv(self, conv, name=None, conv_name=None):
        """Bind to ``conv`` (an ``nn.Conv2d`` whose output this layer normalises)."""
        if name is not None:
            self._layer_name = name
        self._conv_name = conv_name
        who = self._display_name()
        if not isinstance(conv, nn.Conv2d):
            raise CBNBindError(f'{who}: expected an nn.Conv2d producer, got {type(conv).__name__}')
        if conv.out_channels != self.num_features:
            raise CBNBindError(f'{who}: conv out_channels={conv.out_channels} != num_features='
                               f'{self.num_features}')
        if isinstance(conv.padding, str) or conv.padding_mode != 'zeros':
            raise CBNBindError(f'{who}: conv padding={conv.padding!r}, padding_mode='
                               f'{conv.padding_mode!r} unsupported (need explicit zero padding)')
        if type(conv).forward is not nn.Conv2d.forward and not hasattr(conv, 'cbn_effective_weight') \
                and type(conv).__name__ in ('ConvWS2d', 'ConvAWS2d'):
            raise CBNBindError(f'{who}: {type(conv).__name__} transforms its weight; use '
                               f"conv_cfg=dict(type='WSConv') (it exposes the weight it convolves with)")
        if self._binding is not None:
            for handle in self._binding[1:]:
                handle.remove()
        # Final buffer shapes now, before any copy of the model (EMA, deepcopy) is taken.
        weight_shape = conv.weight.shape
        self._materialise(weight_shape, conv.groups, math.prod(weight_shape[1:]))
        self._binding = (conv, conv.register_forward_pre_hook(self._capture_conv_input),
                         conv.register_forward_hook(self._capture_conv_output))
        self._bind_error = None

    def unbind(self):
        """Detach from the bound conv (its hooks are removed); the layer needs a new binding to train."""
        if self._binding is not None:
            for handle in self._binding[1:]:
                handle.remove()
        self._binding = None
        self._conv_input = self._conv_output = None

    def __setstate__(self, state):
        # A copy (deepcopy, pickle, torch.save) of a layer still waiting for its conv is queued again:
        # queue membership is global state, not the layer's. A bound copy carries its binding (the
        # copied conv and the copied hooks; see _binding).
        super().__setstate__(state)
        if self.buffer_num > 0 and self._binding is None:
            queue_for_binding(self)

    def _capture_conv_input(self, conv, args):
        if self.training and self.buffer_num > 0 and torch.is_grad_enabled():
            self._conv_input = args[0]

    def _capture_conv_output(self, conv, args, output):
        if self.training and self.buffer_num > 0 and torch.is_grad_enabled():
            self._conv_output = output

    def _check_fed_by_conv(self, x, conv_output):
        """The input must be the bound conv's latest output (a mis-bound layer, e.g. ``bn2`` bound to
        ``conv1``, would otherwise compensate with the wrong weight and the wrong statistic slopes)."""
        if conv_output is not None and conv_output is not x:
            conv = self._conv_name or type(self.bound_conv).__name__
            raise CBNBindError(f"{self._display_name()}: its input is not the output of its bound conv '{conv}' "
                               f'(conv output {tuple(conv_output.shape)}, norm input {tuple(x.shape)}); the conv '
                               'finder bound the wrong conv: bind it with bind_cbn_to_conv')

    def _conv_weight(self, conv):
        getter = getattr(conv, 'cbn_effective_weight', None)
        return getter() if getter is not None else conv.weight

    # ------------------------------------------------------------------ state
    def reset_window(self):
        """Forget every past entry (the counter and running statistics are kept)."""
        self.window_filled.zero_()
        self.window_head.zero_()

    def reset_running_stats(self):
        super().reset_running_stats()
        if hasattr(self, 'window_filled'):
            self.reset_window()
            self.iter_count.zero_()
            self.num_fallbacks.zero_()
            self.num_nonfinite.zero_()
            self._iter_shadow = 0

    def set_iteration(self, value):
        """Set the training-forward counter (used by hooks and tests)."""
        self.iter_count.fill_(int(value))
        self._iter_shadow = int(value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get('version', None)
        for name in _CONV_SHAPED_BUFFERS:
            key = prefix + name
            if (version is None or version < 3) and key in state_dict and state_dict[key].dim() == 5:
                # Layout of version <= 2: weight-shaped (n, C_out, C_in/g, kh, kw) entries; now (n, C, K).
                state_dict[key] = state_dict[key].flatten(2)
            if key in state_dict and self._buffers[name].numel() == 0:
                self._buffers[name].resize_(state_dict[key].shape)   # in place: DDP keeps its handle
        absent = [name for name in _CBN_ONLY_BUFFERS if prefix + name not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(absent) == len(_CBN_ONLY_BUFFERS) and prefix + 'running_mean' in state_dict:
            # Policy for a plain-BN checkpoint (e.g. fine-tuning a BN model with CBN): BN's parameters
            # and running statistics load; the window starts empty and the counter at 0, so burn-in and
            # the window restart exactly as in a fresh run. Warn so it is never silent.
            for name in absent:
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)
            self.reset_window()
            self.iter_count.zero_()
            warnings.warn(f"{prefix.rstrip('.') or _OWNER}: loaded a BN checkpoint into CBN; the "
                          'cross-iteration window starts empty and the iteration counter at 0',
                          stacklevel=2)
        self._iter_shadow = int(self.iter_count)

    def extra_repr(self):
        text = (super().extra_repr() + f', buffer_num={self.buffer_num}, rho={self.rho}, '
                f'burnin={self.burnin}, sync={self.sync}, eps_inside_sqrt={self.eps_inside_sqrt}')
        if self.stat_grad_sample is not None:
            text += f', stat_grad_sample={self.stat_grad_sample}'
        if self.grad_through_window:
            text += ', grad_through_window=True'
        if not self.two_stage:
            text += ', two_stage=False'
        if self.frozen:
            text += ', frozen=True'
        return text

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, input):
        check_input_dim(input, (4,), self._display_name())

    def _momentum_factor(self):
        if self.momentum is None:
            # A tensor: reading the counter on the host would synchronise every training step.
            return 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
        return self.momentum

    def _normalise(self, x, mean, var):
        if self.eps_inside_sqrt:
            inv_std = torch.rsqrt(var + self.eps)
        else:
            inv_std = 1.0 / (var.sqrt() + self.eps)
        scale = inv_std if self.weight is None else inv_std * self.weight.to(inv_std.dtype)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(shift.dtype)
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))

    def _window_size_now(self):
        """Past entries the window may hold at this training forward (host-side, from the counter).

        ``two_stage`` (official default): none during the burn-in, ``buffer_num`` after it.
        ``two_stage=False`` (official option): ``int(buffer_num · min(iter / burnin, 1))``, growing
        linearly over the burn-in; with ``burnin = 0`` (where the official code would divide by zero) the
        full window from the start.
        """
        if self.burnin == 0:
            return self.buffer_num
        if self.two_stage:
            return self.buffer_num if self._iter_shadow > self.burnin else 0
        return int(self.buffer_num * min(self._iter_shadow / self.burnin, 1.0))

    def _use_window(self, x):
        if self.buffer_num == 0 or not self.window_enabled or self._window_size_now() == 0:
            return False
        return x.requires_grad and torch.is_grad_enabled()

    def _keep_newest(self, size):
        """Forget all but the ``size`` newest entries (``two_stage=False`` while the window grows)."""
        if size >= self.buffer_num:
            return
        slots = torch.arange(self.buffer_num, device=self.window_head.device)
        age = (self.window_head - 1 - slots).remainder(self.buffer_num)      # 0 = the newest entry
        self.window_filled.logical_and_(age < size)

    def forward(self, x, weight=None):
        self._check_input_dim(x)
        if not (self.training or not self.track_running_stats):
            self._conv_input = self._conv_output = None
            return self._eval_forward(x)
        if not self.training:   # eval without running stats: batch statistics, nothing updated
            return self._plain_forward(x, update=False)

        if self.buffer_num > 0 and weight is None and self._binding is None:
            raise CBNBindError(self._bind_error or
                               f'{self._display_name()} has buffer_num={self.buffer_num} but no conv: '
                               'bind it (cbn_mmdet.ops.bind_cbn_to_conv) or call forward(x, weight)')
        if self.frozen:
            # Official FROZEN: normalise with the running statistics and leave them (and the window)
            # alone; the forward counter still counts, like the official one.
            self.iter_count.add_(1)
            self._iter_shadow += 1
            self._conv_input = self._conv_output = None
            return self._eval_forward(x)
        self.num_batches_tracked.add_(1)
        self.iter_count.add_(1)     # every training forward, like the official counter
        self._iter_shadow += 1
        conv_input, self._conv_input = self._conv_input, None
        conv_output, self._conv_output = self._conv_output, None
        if weight is None:
            self._check_fed_by_conv(x, conv_output)
        if x.shape[0] == 0 and not self._synced():
            return self._empty_output(x)   # a synced rank must still join the collectives
        if not self._use_window(x):
            return self._plain_forward(x, update=True)
        return self._window_forward(x, weight, conv_input)

    def _empty_output(self, x):
        # Keep the graph connected to γ/β so that DDP sees every parameter used; x's dtype like a
        # non-empty batch (under autocast γ is float32 and would promote the product).
        out = x * 0 if self.weight is None else x * self.weight.view(1, -1, 1, 1)
        out = out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)

    def _eval_forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            out = self._normalise(x.to(dtype), self.running_mean.to(dtype), self.running_var.to(dtype))
        return out.to(x.dtype)

    # Statistics ---------------------------------------------------------------
    def _synced(self):
        return self.sync and get_world_size(self.process_group) > 1

    def _batch_moments(self, x):
        """Current mean, biased variance and element count (global ones under ``sync``)."""
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if self._synced():
            # Sums over max(count, 1) rather than means: an empty rank's zeros stay in the graph, so
            # its backward joins the gradient all-reduce like every other rank's.
            mean = x.sum((0, 2, 3)) / max(count, 1)
            sq = (x * x).sum((0, 2, 3)) / max(count, 1)
            (mean, sq), total = sync_weighted_mean((mean, sq), count, group=self.process_group)
            return mean, sq - mean * mean, total
        if x.device.type in ('cpu', 'cuda') and count > 0 and not torch.is_grad_enabled():
            # BN's own (Welford) statistics kernel: ~3x faster than var_mean on CPU, no graph needed.
            mean, var = torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)
        else:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return mean, var, count

    def _update_running_stats(self, mean, biased_var, count):
        """Update running statistics; return a 0-dim bool tensor: were the batch statistics finite?

        A non-finite step (NaN/Inf in the input) leaves the statistics untouched and is counted in
        ``num_nonfinite`` — all without reading the flag on the host.
        """
        with torch.no_grad():
            # x·0 == 0 exactly for finite x (NaN for ±Inf and NaN): one test for both statistics, in
            # fewer ops than isfinite (which is several kernels per call).
            finite = ((mean + biased_var) * 0 == 0).all()
            self.num_nonfinite.add_(finite.logical_not())
            if not self.track_running_stats:
                return finite
            factor = self._momentum_factor()
            if isinstance(count, torch.Tensor):
                # Global count of a synced batch (a tensor: no host sync). An empty global batch
                # leaves the statistics untouched; a single value gives a zero variance.
                factor = (count > 0).to(mean.dtype) * factor
                unbiased = biased_var * (count / (count - 1).clamp_min(1))
            else:
                unbiased = biased_var * (count / (count - 1))
            if isinstance(factor, torch.Tensor):
                factor = factor.to(self.running_mean.dtype)
            for running, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
                running.copy_(torch.where(finite, running.lerp(batch.to(running.dtype), factor), running))
        return finite

    def _check_count(self, count):
        if isinstance(count, int) and count <= 1:
            raise ValueError(f'{self._display_name()}: expected more than 1 value per channel when '
                             f'training, got {count}')

    def _affine_params(self, dtype):
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return weight, bias

    def _plain_forward(self, x, update):
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(dtype)
            if self._synced():
                mean, var, count = self._batch_moments(xs)
            else:
                with torch.no_grad():   # cbn_normalise differentiates through the moments itself
                    mean, var, count = self._batch_moments(xs)
            self._check_count(count)
            if update:
                self._update_running_stats(mean.detach(), var.detach(), count)
                self._join_slope_all_reduce(dtype, xs.device)
            if x.shape[0] == 0 and not self._synced():
                return self._empty_output(x)
            if self.unbiased_plain_var:
                factor = count / ((count - 1).clamp_min(1) if torch.is_tensor(count) else count - 1)
            else:
                factor = 1.0
            if self._synced():
                out = self._normalise(xs, mean, var * factor)
            else:
                out = cbn_normalise(xs, *self._affine_params(dtype), mean, var, count, var_factor=factor,
                                    eps=self.eps, eps_inside_sqrt=self.eps_inside_sqrt)
        return out.to(x.dtype)

    def _join_slope_all_reduce(self, dtype, device):
        """A synced rank on the plain path joins the window path's all-reduce of ∂μ/∂W, ∂ν/∂W with
        zeros of weight 0: the collectives of a forward never depend on rank-local state (burn-in
        counter, ``requires_grad``, an empty batch), so ranks on different paths cannot deadlock."""
        if not (self._synced() and self.buffer_num > 0 and self.window_weight.numel() > 0):
            return
        zeros = (torch.zeros(self.window_mean_grad.shape[1:], dtype=dtype, device=device),
                 torch.zeros(self.window_sq_grad.shape[1:], dtype=dtype, device=device))
        sync_weighted_mean(zeros, 0, group=self.process_group)

    def _window_forward(self, x, weight, conv_input):
        dtype = torch.promote_types(x.dtype, torch.float32)
        synced = self._synced()
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(dtype)
            if synced:
                mean_t, var_t, count = self._batch_moments(xs)
            else:
                with torch.no_grad():   # cbn_normalise differentiates through the moments itself
                    mean_t, var_t, count = self._batch_moments(xs)
            self._check_count(count)
            sq_t = var_t + mean_t * mean_t
            weight_t, mean_grad, sq_grad, groups = self._statistic_grads(xs, weight, conv_input)
            self._materialise(weight_t.shape, groups, mean_grad.shape[-1])   # explicit-weight path
            if synced:
                (mean_grad, sq_grad), _ = sync_weighted_mean(
                    (mean_grad, sq_grad), x.shape[0] * x.shape[2] * x.shape[3], group=self.process_group)
            with torch.no_grad():
                coef, past_mean, past_sq = self._window_coefficients(mean_t.detach(), sq_t.detach(),
                                                                     weight_t.to(dtype))
            if self.grad_through_window and torch.is_grad_enabled():
                past_mean, past_sq = self._attach_window_gradient(past_mean, past_sq, weight, dtype)
            finite = self._update_running_stats(mean_t.detach(), var_t.detach(), count)
            valid = finite & (count > 0) if isinstance(count, torch.Tensor) else finite
            self._push(weight_t, mean_t.detach(), sq_t.detach(), mean_grad, sq_grad, groups, valid=valid)
            if not self.two_stage:
                self._keep_newest(self._window_size_now())
            if synced:
                # A synced empty rank normalises its empty input too, so that its backward still joins
                # the all-reduce of the statistics' gradients.
                mean = coef * mean_t + past_mean
                var = (coef * sq_t + past_sq - mean * mean).clamp_min(0)
                out = self._normalise(xs, mean, var)
            elif x.shape[0] == 0:
                return self._empty_output(x)
            else:
                out = cbn_normalise(xs, *self._affine_params(dtype), mean_t, var_t, count, coef=coef,
                                    past_mean=past_mean, past_sq=past_sq, eps=self.eps,
                                    eps_inside_sqrt=self.eps_inside_sqrt)
        return out.to(x.dtype)

    def _statistic_grads(self, xs, weight, conv_input):
        """(W_t, dμ/dW as (groups, K), dν/dW as W's shape, groups) for the current iteration."""
        conv = self.bound_conv
        if conv is not None and conv_input is not None:
            weight_t = (self._conv_weight(conv) if weight is None else weight).detach()
            with torch.no_grad():
                inp = conv_input.to(xs.dtype)
                expected = conv_output_size(inp.shape[2:], conv.kernel_size, conv.stride, conv.padding,
                                            conv.dilation)
                if inp.shape[0] != xs.shape[0] or tuple(xs.shape[2:]) != expected:
                    raise CBNBindError(
                        f'{self._display_name()}: input {tuple(xs.shape)} is not the output of its bound '
                        f'conv (conv input {tuple(inp.shape)}); is the norm really fed by that conv?')
                patch = mean_input_patch(inp, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
                mean_grad = patch.reshape(conv.groups, -1)
                geometry = (weight_t.shape, conv.stride, conv.padding, conv.dilation, conv.groups)
                if self._sample_step is None:
                    sq_grad = second_moment_weight_grad(inp, xs.detach(), *geometry)
                else:
                    step, phase = self._sample_grid(xs.shape[2:])
                    sq_grad = sampled_second_moment_weight_grad(inp, xs.detach(), *geometry, step=step,
                                                                phase=phase)
            return weight_t, mean_grad, sq_grad, conv.groups
        if weight is None:
            raise CBNBindError(f'{self._display_name()}: the bound conv did not run before this layer '
                               '(no conv input captured); pass forward(x, weight) or fix the binding')
        if self.sync:
            raise CBNBindError(f'{self._display_name()}: sync=True needs a bound conv (closed-form '
                               'statistic gradients); bind it with cbn_mmdet.ops.bind_cbn_to_conv')
        # Explicit weight, no conv input: the official way, through autograd (slower, same values).
        stats = (xs.mean((0, 2, 3)), (xs * xs).mean((0, 2, 3)))
        grads = [torch.autograd.grad(stat.sum(), weight, retain_graph=True, allow_unused=True)[0]
                 for stat in stats]
        if grads[0] is None:
            raise CBNBindError(f'{self._display_name()}: the input does not depend on the weight passed '
                               'to forward(x, weight)')
        # One row per output channel: the compact (groups, K) layout with groups = C_out.
        return weight.detach(), grads[0].detach().flatten(1), grads[1].detach(), weight.shape[0]

    @torch.no_grad()
    def _window_coefficients(self, mean_t, sq_t, weight_t):
        """Compensate the window to ``weight_t``; return ``(c, A, B)`` with μ̄ = c·μ_t + A, S = c·ν_t + B.

        Entries (the current one included) whose compensated ν − μ² < 0 are dropped; n counts the kept
        ones, c = kept_t / n, A and B are the kept past sums over n. Every step runs the same fixed
        sequence of batched ops (an empty slot is masked, not skipped): no branch on the window's state.
        """
        kept_t = (sq_t - mean_t * mean_t >= 0).to(mean_t.dtype)
        past_mean, past_sq = self._compensated_window(weight_t, mean_t.dtype)
        past_ok = self.window_filled.view(-1, 1) & (past_sq - past_mean * past_mean >= 0)
        # where, not a product: an unfilled slot may hold anything (NaN of a skipped step included).
        zero = mean_t.new_zeros(())
        kept = kept_t + past_ok.sum(0)
        past_mean_sum = torch.where(past_ok, past_mean, zero).sum(0)
        past_sq_sum = torch.where(past_ok, past_sq, zero).sum(0)
        # Guard (official: 0/0 = NaN): no valid entry -> the current batch alone, and count the event.
        none_kept = kept == 0
        self.num_fallbacks.add_(none_kept.any())
        kept_t = kept_t.masked_fill(none_kept, 1.0)
        kept = kept.masked_fill(none_kept, 1.0)
        if self.grad_through_window:   # only that option reads the per-entry shares
            self._last_past_kept = past_ok / kept
        return kept_t / kept, past_mean_sum / kept, past_sq_sum / kept

    def _sample_grid(self, out_size):
        """``(step, phase)`` of the fast mode for an output map ``out_size``: the grid is clamped to the
        map, and its offset cycles over the grid with the training-forward counter (host side)."""
        rh, rw = (min(r, max(int(n), 1)) for r, n in zip(self._sample_step, out_size))
        a, b = divmod(self._iter_shadow % (rh * rw), rw)
        return (rh, rw), (a, b)

    def _attach_window_gradient(self, past_mean, past_sq, weight, dtype):
        """``grad_through_window``: give A, B their gradient w.r.t. the live conv weight (values unchanged).

        A = Σ_τ w_τ·(μ_τ + ρ·(W_t − W_τ)·∂μ_τ/∂W) with w_τ = kept_τ / n is linear in W_t, so
        dA_c/dW_t[c] = ρ·Σ_τ w_τ,c·∂μ_τ/∂W[g(c)] (same for B with ∂ν_τ/∂W). Adding
        ``(W − W.detach())·dA/dW`` (exactly zero) attaches that gradient without re-running the window.
        """
        shares = getattr(self, '_last_past_kept', None)
        if shares is None:
            return past_mean, past_sq
        live = weight if weight is not None else self._conv_weight(self.bound_conv)
        if not live.requires_grad:
            return past_mean, past_sq
        n, c = shares.shape
        with torch.no_grad():
            mean_grad = self.window_mean_grad.to(dtype)                          # (n, groups, K)
            groups = mean_grad.shape[1]
            share_g = shares.view(n, groups, c // groups)
            d_mean = self.rho * torch.einsum('ngo,ngk->gok', share_g, mean_grad).reshape(c, -1)
            d_sq = self.rho * torch.einsum('nc,nck->ck', shares, self.window_sq_grad.to(dtype))
        w = live.to(dtype).reshape(c, -1)
        zero = w - w.detach()
        return past_mean + (zero * d_mean).sum(-1), past_sq + (zero * d_sq).sum(-1)

    def _compensated_window(self, weight_t, dtype):
        """Every stored entry moved to ``weight_t``: ``(μ_τ(W_t), ν_τ(W_t))``, each ``(n, C)``.

        The weight difference ``W_t − W_τ`` is formed first and then contracted with the stored slopes:
        subtracting two large products ``Σ W_t·g − Σ W_τ·g`` instead would lose the (small) offset to
        cancellation, badly so under TF32 matmuls.
        """
        n, c = self.window_mean.shape
        delta = weight_t.to(dtype).reshape(1, c, -1) - self.window_weight.to(dtype)       # (n, C, K)
        mean_grad = self.window_mean_grad.to(dtype)                                      # (n, groups, K)
        groups = mean_grad.shape[1]
        # Σ_k ΔW[c, k]·∂μ_τ/∂W[g(c), k]: one batched matrix-vector product over (entry, group).
        mean_dot = torch.bmm(delta.view(n * groups, c // groups, -1), mean_grad.view(n * groups, -1, 1))
        sq_dot = (delta * self.window_sq_grad.to(dtype)).sum(-1)                          # (n, C)
        return (torch.add(self.window_mean.to(dtype), mean_dot.view(n, c), alpha=self.rho),
                torch.add(self.window_sq.to(dtype), sq_dot, alpha=self.rho))

    @torch.no_grad()
    def _push(self, weight_t, mean_t, sq_t, mean_grad, sq_grad, groups, valid=None):
        """Write the current entry over the oldest slot (a ring: order is irrelevant to a mean).

        ``valid`` (a 0-dim bool tensor) is False for a step whose statistics are unusable (non-finite,
        or an empty global batch under sync): the slot keeps its content and the ring does not advance,
        without reading the flag on the host.
        """
        c = self.num_features
        slot = self.window_head.view(1)
        for name, value in (('window_weight', weight_t.reshape(c, -1)), ('window_mean_grad', mean_grad),
                            ('window_sq_grad', sq_grad.reshape(c, -1)), ('window_mean', mean_t),
                            ('window_sq', sq_t)):
            buf = self._buffers[name]
            value = value.to(buf.dtype).unsqueeze(0)
            if valid is not None:   # keep the slot's old content unless valid, without a host read
                value = torch.where(valid, value, buf.index_select(0, slot))
            buf.index_copy_(0, slot, value)
        if valid is None:
            self.window_filled.index_fill_(0, slot, True)
            self.window_head.add_(1).remainder_(self.buffer_num)
        else:
            self.window_filled.index_copy_(0, slot, self.window_filled.index_select(0, slot) | valid.view(1))
            self.window_head.add_(valid).remainder_(self.buffer_num)

    def _conv_buffer_shapes(self, weight_shape, groups, patch_len):
        # Flat (entry, channel, K) layouts: 3-D, so .to(memory_format=channels_last) leaves them alone.
        k = math.prod(weight_shape[1:])
        return {'window_weight': (self.buffer_num, weight_shape[0], k),
                'window_mean_grad': (self.buffer_num, groups, patch_len),
                'window_sq_grad': (self.buffer_num, weight_shape[0], k)}

    def _materialise(self, weight_shape, groups, patch_len):
        """Give the conv-shaped buffers their final shapes (in place: DDP and copies keep their handles)."""
        for name, shape in self._conv_buffer_shapes(weight_shape, groups, patch_len).items():
            buf = self._buffers[name]
            if buf.numel() == 0:
                try:
                    buf.resize_(shape).zero_()
                except RuntimeError:   # storage from torch.load / a pickle is not resizable: replace it
                    self._buffers[name] = buf.new_zeros(shape)
            elif tuple(buf.shape) != shape:
                raise RuntimeError(f'{self._display_name()}: {name} has shape {tuple(buf.shape)} but the '
                                   f'conv needs {shape}; was a checkpoint of another model loaded?')


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f'{_OWNER}: {name} must be a bool, got {value!r} ({type(value).__name__})')
    return value


def _check_sample_fraction(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{_OWNER}: stat_grad_sample must be None or a float in (0, 1], got {value!r} '
                        f'({type(value).__name__})')
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f'{_OWNER}: stat_grad_sample must be None or a float in (0, 1], got {value!r}')
    return float(value)


def _sample_step(fraction):
    """``(rh, rw)`` with ``rh·rw = round(1/fraction)``, as square as possible; ``None`` = exact."""
    if fraction is None:
        return None
    total = max(1, round(1.0 / fraction))
    rh = max(d for d in range(1, math.isqrt(total) + 1) if total % d == 0)
    return rh, total // rh


class SyncCrossIterationBatchNorm2d(CrossIterationBatchNorm2d, _BatchNorm):
    """CBN whose statistics and statistic-gradients are averaged over a process group (``sync=True``).

    The combination the official code could not run: the current μ, ν, dμ/dW and dν/dW are
    count-weighted means over all ranks (one all-reduce) before the window is compensated, so every rank
    keeps the same window. ``_BatchNorm`` is listed as a direct base so that mmengine's ``init_cfg``
    (which matches direct base names) treats it as a BN. Same arguments as
    :class:`CrossIterationBatchNorm2d`; ``sync`` defaults to True.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 sync=True, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, sync=sync, **kwargs)
