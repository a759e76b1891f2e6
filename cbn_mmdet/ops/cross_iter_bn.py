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

from ._amp import autocast_off, compute_dtype
from ._bn_common import batch_mean_var, check_values_per_channel, empty_batch_output, momentum_factor
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
from .cbn_window import (
    EMPTY_SQ,
    StepCommit,
    WindowViews,
    combine,
    compensate,
    empty_window,
    window_row_length,
    window_slopes,
    window_views,
)
from .distributed import get_world_size, sync_weighted_mean

__all__ = ['CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d']

_OWNER = 'CrossIterationBatchNorm2d'
# Buffers a plain BN checkpoint lacks; see _load_from_state_dict for the policy.
_CBN_ONLY_BUFFERS = ('iter_count', 'num_fallbacks', 'num_nonfinite', 'window_head', 'window_filled', 'window_mean',
                     'window_sq', 'window_weight', 'window_mean_grad', 'window_sq_grad')
# What the checkpoint stores of the packed window (one tensor in memory, see cbn_window.py): the same
# keys as before the packing, so checkpoints of either layout load into both.
_WINDOW_KEYS = ('window_filled', 'window_mean', 'window_sq', 'window_weight', 'window_mean_grad', 'window_sq_grad')
# Window parts whose shape depends on the conv, unknown until the layer is bound.
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
        # The packed window (cbn_window.py): one row per past iteration (empty slots marked) and the
        # staging row of the current one. Not persistent: the checkpoint stores the past entries' named
        # parts (window_mean, ...; see _save_to_state_dict).
        self.register_buffer('window', empty_window(self.buffer_num + 1, 2 * num_features, num_features,
                                                    dtype=dtype, device=device), persistent=False)
        self._groups = 1              # the bound conv's groups (the layout of the mean slopes)
        self._views = None            # WindowViews of the window, rebuilt when a buffer is replaced
        self._pending_commit = None   # the last window step's StepCommit until its backward applies it
        self._grad_mode = False       # grad mode of the current window forward (read inside no_grad)
        self._keep_size = None        # two_stage=False: entries the window keeps after this step
        self._sample_now = None       # fast mode: (step, phase) of this step's sampling grid

        # Host-side mirror of iter_count: the burn-in decision must not read a device tensor.
        self._iter_shadow = 0
        self._binding = None          # (conv, hook handle); a plain attribute, not a submodule
        self._conv_input = None       # the bound conv's latest input, consumed by the next forward
        self._conv_output = None      # ... and its output: the next forward checks it is its input
        self._conv_name = None
        self._bind_error = None
        self._layer_name = None
        self._running_pack = self._head_pack = None   # see _pack_small_buffers
        self._pack_small_buffers()
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
        self._materialise(weight_shape, conv.groups)
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
        self._views = self._pending_commit = None
        self._pack_small_buffers()
        if self.buffer_num > 0 and self._binding is None:
            queue_for_binding(self)

    def __getstate__(self):
        # Views of the window and a pending step belong to this instance's tensors: a copy rebuilds its own.
        state = super().__getstate__() if hasattr(super(), '__getstate__') else self.__dict__
        return dict(state, _views=None, _pending_commit=None)

    def _apply(self, fn, *args, **kwargs):
        # ``.to()``/``.double()``/``.half()`` replace the buffers: a step still waiting for its backward would
        # write its entry into the old window. Same device: the pending step follows the new buffers. A
        # move to another device between a forward and its backward cannot complete that step (its graph
        # stays on the old device): its entry is not stored, and the layer says so.
        pending = self._pending_commit
        result = super()._apply(fn, *args, **kwargs)
        self._pack_small_buffers()    # the cast buffers, packed again (before any DDP wrapper collects them)
        if pending is not None and pending.pending:
            if pending.views.window.device == self._buffers['window'].device:
                running = (self.running_mean, self.running_var) if self.track_running_stats else ()
                pending.rebind(self._window_views(), self.num_nonfinite, running,
                               self.num_batches_tracked if pending.num_batches is not None else None,
                               running_pack=self._packed_running_stats())
            else:
                pending.pending = False
                self._pending_commit = None
                warnings.warn(f'{self._display_name()}: moved to another device between a training forward '
                              'and its backward; that step enters neither the window nor the running '
                              'statistics', stacklevel=2)
        return result

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
    def _pack_small_buffers(self):
        """Store ``running_mean``/``running_var`` as the two rows of one ``(2, C)`` tensor and
        ``window_head`` as element 0 of ``[head, 1, 0]``: the buffers stay what they were (same names,
        shapes, values, state dict), but a step's commit updates both running statistics with one
        ``where`` and one ``lerp_``, and advances the ring with one ``where`` (see ``StepCommit``).

        Run at construction, after every ``_apply`` (``.to()``, ``.half()``, which replace buffers) and
        after unpickling (``pickle`` keeps the objects but not that they share memory); a buffer replaced
        otherwise (assigned, ``load_state_dict(assign=True)``) is noticed by an identity test, and the
        commit falls back to one ``where`` per tensor: slower, same values."""
        rm, rv = self._buffers.get('running_mean'), self._buffers.get('running_var')
        if rm is not None and rv is not None and not _shares_memory(self._packed_running_stats(), (rm, rv)) \
                and rm.shape == rv.shape and rm.dtype == rv.dtype and rm.device == rv.device:
            pack = torch.stack((rm, rv))
            rm, rv = pack.unbind(0)
            self._buffers['running_mean'], self._buffers['running_var'] = rm, rv
            self._running_pack = (pack, rm, rv)
        head = self._buffers.get('window_head')
        if head is not None and not _shares_memory(self._packed_head(), (head,)) and head.dim() == 0:
            pack = torch.stack((head, torch.ones_like(head), torch.zeros_like(head)))
            self._buffers['window_head'] = head = pack[0]
            self._head_pack = (pack, head)
            self._views = None

    def _packed_running_stats(self):
        """The ``(2, C)`` tensor whose rows are ``running_mean`` and ``running_var``, if they still are."""
        packed = getattr(self, '_running_pack', None)
        if packed is not None and self._buffers.get('running_mean') is packed[1] \
                and self._buffers.get('running_var') is packed[2]:
            return packed[0]
        return None

    def _packed_head(self):
        """``[window_head, 1, 0]``, if ``window_head`` is still its element 0."""
        packed = getattr(self, '_head_pack', None)
        if packed is not None and self._buffers.get('window_head') is packed[1]:
            return packed[0]
        return None

    def reset_window_rows(self):
        """Every row empty (the ring position is kept)."""
        self.window.zero_()
        self._window_views().rows['sq'].fill_(EMPTY_SQ)

    def reset_window(self):
        """Forget every past entry (the counter and running statistics are kept)."""
        self.reset_window_rows()
        self.window_head.zero_()

    def _window_views(self):
        """The :class:`~cbn_mmdet.ops.cbn_window.WindowViews` of the window buffer, made once per buffer:
        ``.to()``, ``.double()`` or a load replace the buffers, and an identity test (no dispatcher call)
        notices it."""
        window, head = self._buffers['window'], self._buffers['window_head']
        if window.dtype in (torch.float16, torch.bfloat16):
            # Statistics are float32 or wider (the current entry is averaged from its window row): a
            # module cast to half (.half(), .bfloat16()) keeps its window in float32.
            window = self._buffers['window'] = window.float()
        if self._views is None or not self._views.matches(window, head):
            self._views = WindowViews(window, head, self.num_features, self._groups, head_pack=self._packed_head())
        return self._views

    # Named parts of the stored entries (views: writing them writes the window).
    window_mean = property(lambda self: self._window_views().ring['mean'])
    window_sq = property(lambda self: self._window_views().ring['sq'])
    window_weight = property(lambda self: self._conv_shaped('weight'))
    window_mean_grad = property(lambda self: self._conv_shaped('mean_grad'))
    window_sq_grad = property(lambda self: self._conv_shaped('sq_grad'))

    @property
    def window_filled(self):
        """``(buffer_num,)`` bool: which slots hold an entry (a copy; empty slots have ν = −1)."""
        return self.window_sq[:, 0] >= 0 if self.num_features else self.window_sq.new_zeros(0, dtype=torch.bool)

    def _conv_shaped(self, name):
        # Before binding the conv-shaped parts do not exist yet: an empty tensor, as a checkpoint has it.
        return self._window_views().ring[name] if self.is_materialised else self.window.new_zeros(0)

    @property
    def is_materialised(self):
        """True once the window has its conv-shaped parts (the layer was bound or loaded bound)."""
        return self._buffers['window'].shape[1] > 2 * self.num_features

    def reset_running_stats(self):
        super().reset_running_stats()
        if 'window' in self._buffers:
            self.reset_window()
            self.iter_count.zero_()
            self.num_fallbacks.zero_()
            self.num_nonfinite.zero_()
            self._iter_shadow = 0

    def set_iteration(self, value):
        """Set the training-forward counter (used by hooks and tests)."""
        self.iter_count.fill_(int(value))
        self._iter_shadow = int(value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The window's named parts: views (an in-place update of the state dict, as EMA does, writes
        # the window), window_filled a fresh bool tensor.
        parts = {'window_filled': self.window_filled, 'window_mean': self.window_mean, 'window_sq': self.window_sq,
                 'window_weight': self.window_weight, 'window_mean_grad': self.window_mean_grad,
                 'window_sq_grad': self.window_sq_grad}
        for name in _WINDOW_KEYS:
            destination[prefix + name] = parts[name] if keep_vars else parts[name].detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get('version', None)
        window = {name: state_dict.pop(prefix + name) for name in _WINDOW_KEYS if prefix + name in state_dict}
        for name in _CONV_SHAPED_BUFFERS:
            if (version is None or version < 3) and name in window and window[name].dim() == 5:
                # Layout of version <= 2: weight-shaped (n, C_out, C_in/g, kh, kw) entries; now (n, C, K).
                window[name] = window[name].flatten(2)
        absent = [name for name in _CBN_ONLY_BUFFERS if prefix + name not in state_dict and name not in window]
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
        elif len(window) < len(_WINDOW_KEYS):
            missing_keys.extend(prefix + name for name in _WINDOW_KEYS if name not in window)
        else:
            self._load_window(window, prefix, error_msgs)
        self._iter_shadow = int(self.iter_count)

    def _load_window(self, parts, prefix, error_msgs):
        n, c = self.buffer_num, self.num_features
        for name in ('window_mean', 'window_sq', 'window_filled'):
            expected = (n, c) if name != 'window_filled' else (n,)
            if tuple(parts[name].shape) != expected:
                error_msgs.append(f'size mismatch for {prefix}{name}: copying a param with shape '
                                  f'{tuple(parts[name].shape)} from checkpoint, the shape in current model is '
                                  f'{expected}.')
                return
        weight, mean_grad = parts['window_weight'], parts['window_mean_grad']
        if weight.numel() > 0:
            sq_shape = tuple(parts['window_sq_grad'].shape)
            if weight.dim() != 3 or mean_grad.dim() != 3 or sq_shape != tuple(weight.shape):
                error_msgs.append(f'{prefix}window_weight/window_mean_grad/window_sq_grad: inconsistent shapes '
                                  f'{tuple(weight.shape)}, {tuple(mean_grad.shape)}, {sq_shape}')
                return
            try:
                self._materialise_layout(weight.shape[2], mean_grad.shape[1])
            except RuntimeError as exc:
                error_msgs.append(str(exc))
                return
        with torch.no_grad():
            filled = parts['window_filled'].to(device=self.window.device, dtype=torch.bool)
            self.reset_window_rows()       # (window_head was loaded by the base class: kept)
            if not bool(filled.any()):
                return   # nothing stored (an unbound layer's checkpoint has no slopes to load either)
            if not self.is_materialised:
                error_msgs.append(f'{prefix}window_weight: the checkpoint has filled window slots but no '
                                  'weights/slopes for them')
                return
            for name, view in (('window_mean', self.window_mean), ('window_sq', self.window_sq),
                               ('window_weight', self.window_weight), ('window_mean_grad', self.window_mean_grad),
                               ('window_sq_grad', self.window_sq_grad)):
                view.copy_(parts[name])
            empty = empty_window(1, self.window.shape[1], c, dtype=self.window.dtype, device=self.window.device)
            ring = self._window_views().ring_rows
            ring.copy_(torch.where(filled.view(n, 1), ring, empty))

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
        return momentum_factor(self.momentum, self.num_batches_tracked, self.running_mean.dtype)

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
        path, conv_input = self._begin_training_step(x, weight)
        if path == 'eval':
            return self._eval_forward(x)
        if path == 'empty':
            return self._empty_output(x)   # (a synced rank must still join the collectives: not 'empty')
        if path == 'plain':
            return self._plain_forward(x, update=True)
        return self._window_forward(x, weight, conv_input)

    @torch.compiler.disable
    def _begin_training_step(self, x, weight):
        """The host-side bookkeeping of a training forward: counters, the bound conv's captured tensors,
        the path of this step (``'eval'`` for ``frozen``, ``'empty'``, ``'plain'``, ``'window'``).

        Excluded from ``torch.compile`` graphs: the Python counter changes every step, and a graph that
        read it would be recompiled every step; the path is one of four values (one graph each).
        """
        self._keep_size = None
        if self.frozen:
            # Official FROZEN: normalise with the running statistics and leave them (and the window)
            # alone; the forward counter still counts, like the official one.
            self.iter_count.add_(1)
            self._iter_shadow += 1
            self._conv_input = self._conv_output = None
            return 'eval', None
        # Both counters in one multi-tensor kernel; iter_count counts every training forward, like the
        # official counter.
        torch._foreach_add_([self.num_batches_tracked, self.iter_count], 1)
        self._iter_shadow += 1
        conv_input, self._conv_input = self._conv_input, None
        conv_output, self._conv_output = self._conv_output, None
        if weight is None:
            self._check_fed_by_conv(x, conv_output)
        if x.shape[0] == 0 and not self._synced():
            return 'empty', None
        if not self._use_window(x):
            return 'plain', None
        if not self.two_stage and self._window_size_now() < self.buffer_num:
            self._keep_size = self._window_size_now()
        if self._sample_step is not None:
            self._sample_now = self._sample_grid(x.shape[2:])
        return 'window', conv_input

    def _empty_output(self, x):
        return empty_batch_output(x, self.weight, self.bias)

    def _eval_forward(self, x):
        dtype = compute_dtype(x.dtype)
        with autocast_off(x.device.type):
            out = self._normalise(x.to(dtype), self.running_mean.to(dtype), self.running_var.to(dtype))
        return out.to(x.dtype)

    # Statistics ---------------------------------------------------------------
    def _synced(self):
        return self.sync and get_world_size(self.process_group) > 1

    def _batch_moments(self, x):
        """Current mean, biased variance (float32+) and element count (global ones under ``sync``)."""
        count = x.shape[0] * x.shape[2] * x.shape[3]
        dtype = compute_dtype(x.dtype)
        if self._synced():
            # Sums over max(count, 1) rather than means: an empty rank's zeros stay in the graph, so
            # its backward joins the gradient all-reduce like every other rank's.
            xs = x.to(dtype)
            mean = xs.sum((0, 2, 3)) / max(count, 1)
            sq = (xs * xs).sum((0, 2, 3)) / max(count, 1)
            (mean, sq), total = sync_weighted_mean((mean, sq), count, group=self.process_group)
            return mean, sq - mean * mean, total
        mean, var = batch_mean_var(x)     # BN's one-pass (Welford) kernel, float32+ statistics
        return mean, var, count

    def _step_commit(self, check, mean, biased_var, count, views=None, usable=None, targets=None):
        """What this training step writes (running statistics, window entry), as a :class:`StepCommit`.

        ``check``: the statistics whose finiteness decides (with the gradient's, when applied in backward)
        whether the step enters anything; ``views``: the window's views when the staging row holds an
        entry to store (then the whole entry is checked, and ``check`` is not needed); ``targets``: the
        views' ``(2, C)`` targets when the forward wrote them (``finish_entry_``).
        """
        running, factor = (), 0.0
        if self.track_running_stats:
            factor = self._momentum_factor()
            if targets is not None:
                running = (self.running_mean, self.running_var)
            elif isinstance(count, torch.Tensor):
                # Global count of a synced batch (a tensor: no host sync). An empty global batch
                # leaves the statistics untouched; a single value gives a zero variance.
                factor = (count > 0).to(mean.dtype) * factor
                unbiased = biased_var * (count / (count - 1).clamp_min(1))
            else:
                unbiased = biased_var * (count / (count - 1))
            if targets is None:
                running, targets = (self.running_mean, self.running_var), (mean, unbiased)
        return StepCommit(check, self.num_nonfinite, running, () if targets is None else targets, factor,
                          views=views, keep=self._keep_size if views is not None else None, usable=usable,
                          num_batches=self.num_batches_tracked if self.momentum is None else None,
                          running_pack=self._packed_running_stats())

    def _check_count(self, x):
        if not self._synced():   # (a synced layer's count is global, checked on the device)
            check_values_per_channel(x.shape, self._display_name())

    def _affine_params(self, dtype):
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return weight, bias

    def _plain_forward(self, x, update):
        self._grad_mode = torch.is_grad_enabled()
        synced = self._synced()
        with autocast_off(x.device.type):
            if synced:
                mean, var, count = self._batch_moments(x)
            else:
                with torch.no_grad():   # cbn_normalise differentiates through the moments itself
                    mean, var, count = self._batch_moments(x)
            self._check_count(x)
            commit = None
            if update:
                with torch.no_grad():
                    commit = self._step_commit(torch.stack((mean.detach(), var.detach())), mean.detach(),
                                               var.detach(), count)
                if synced or not (self._grad_mode and x.requires_grad):
                    commit.apply()     # no backward of ours will see this step's gradient
                    commit = None
                self._join_slope_all_reduce(mean.dtype, x.device)
            if x.shape[0] == 0 and not synced:
                return self._empty_output(x)
            if self.unbiased_plain_var:
                factor = count / ((count - 1).clamp_min(1) if torch.is_tensor(count) else count - 1)
            else:
                factor = 1.0
            if synced:
                out = self._normalise(x.to(mean.dtype), mean, var * factor)
                return out.to(x.dtype)
            return cbn_normalise(x, *self._affine_params(mean.dtype), mean, var * factor, count,
                                 var_factor=factor, eps=self.eps, eps_inside_sqrt=self.eps_inside_sqrt,
                                 commit=commit)

    def _join_slope_all_reduce(self, dtype, device):
        """A synced rank on the plain path joins the window path's all-reduce of ∂μ/∂W, ∂ν/∂W with
        zeros of weight 0: the collectives of a forward never depend on rank-local state (burn-in
        counter, ``requires_grad``, an empty batch), so ranks on different paths cannot deadlock."""
        if not (self._synced() and self.buffer_num > 0 and self.is_materialised):
            return
        zeros = (torch.zeros(self.window_mean_grad.shape[1:], dtype=dtype, device=device),
                 torch.zeros(self.window_sq_grad.shape[1:], dtype=dtype, device=device))
        sync_weighted_mean(zeros, 0, group=self.process_group)

    def _window_forward(self, x, weight, conv_input):
        self._grad_mode = torch.is_grad_enabled()
        if self._synced():
            return self._synced_window_forward(x, weight, conv_input)
        with autocast_off(x.device.type):
            # grad_through_window: the weight the conv applies, with its graph (a WS conv's standardized
            # weight is recomputed here, so not under no_grad: it would lose the graph to the raw weight)
            live = self._live_weight(weight) if self._wants_window_gradient() else None
            with torch.no_grad():   # cbn_normalise differentiates through the moments itself
                mean_t, var_t, count = self._batch_moments(x)
                self._check_count(x)
                views = self._staging_views(weight, conv_input)
                # the current entry goes into the staging row as its parts are computed: μ_t, var_t, W_t,
                # ∂μ/∂W, ∂ν/∂W (and the running statistics' targets), then ν_t = var_t + μ_t²
                self._statistic_grads(x, weight, conv_input, views, mean_t, var_t)
                views.finish_entry_(mean_t, count / (count - 1))
                mean, sq, coef, _ = self._window_average(views, with_shares=False)
                slopes = self._ring_slopes(views) if live is not None else None
                # Written at this step's backward, once its gradient is known to be finite.
                commit = self._pending_commit = self._step_commit(None, mean_t, var_t, count, views=views,
                                                                  targets=views.targets)
            if x.shape[0] == 0:
                return self._empty_output(x)
            return cbn_normalise(x, *self._affine_params(mean.dtype), mean, torch.addcmul(sq, mean, mean, value=-1),
                                 count, coef=coef, eps=self.eps, eps_inside_sqrt=self.eps_inside_sqrt, commit=commit,
                                 window_slopes=slopes, conv_weight=live)

    def _synced_window_forward(self, x, weight, conv_input):
        """SyncCBN's window step: the statistics are global (one all-reduce, differentiable) and the
        normalisation goes through autograd; a synced empty rank normalises its empty input too, so that
        its backward still joins the all-reduce of the statistics' gradients."""
        with autocast_off(x.device.type):
            mean_t, var_t, count = self._batch_moments(x)
            sq_t = var_t + mean_t * mean_t
            views = self._staging_views(weight, conv_input)
            weight_t, mean_grad, sq_grad = self._statistic_grads(x, weight, conv_input)
            (mean_grad, sq_grad), _ = sync_weighted_mean(
                (mean_grad, sq_grad), x.shape[0] * x.shape[2] * x.shape[3], group=self.process_group)
            with torch.no_grad():
                current = (mean_t.detach(), sq_t.detach())
                views.write_staging_(mean=current[0], sq=current[1], weight=weight_t, mean_grad=mean_grad,
                                     sq_grad=sq_grad)
                mean, sq, coef, shares = self._window_average(views, with_shares=self._wants_window_gradient())
                past = torch.stack((mean - coef * current[0], sq - coef * current[1]))
                slopes = self._window_slopes(shares[:self.buffer_num]) if self._wants_window_gradient() else None
                # Applied now: the entry is global (the same on every rank); a rank-local check of the
                # gradient would let the ranks' windows part.
                self._step_commit(None, mean_t.detach(), var_t.detach(), count, views=views,
                                  usable=count > 0).apply()
            past_mean, past_sq = self._attach_window_gradient(past.unbind(0), slopes, weight)
            mean = coef * mean_t + past_mean
            var = (coef * sq_t + past_sq - mean * mean).clamp_min(0)
            out = self._normalise(x.to(mean.dtype), mean, var)
        return out.to(x.dtype)

    def _window_average(self, views, with_shares):
        """The window average of this step (the staging row holds the current entry): see ``combine``."""
        scratch = views.compensated
        mean, sq = compensate(views.rows, views.staging_weight, self.rho, out=scratch)
        return combine(mean, sq, views.threshold, scratch=scratch, with_shares=with_shares)

    def _staging_views(self, weight, conv_input):
        """The window's views, the layer materialised for the conv it is given; a step still waiting for
        its backward gets its own copy of the staging row before this step overwrites it."""
        if weight is not None and (conv_input is None or self.bound_conv is None):
            self._materialise(weight.shape, weight.shape[0])   # explicit weight: a slope row per channel
        if self._pending_commit is not None:
            self._pending_commit.own_row()
            self._pending_commit = None
        return self._window_views()

    def _wants_window_gradient(self):
        # Read under no_grad: whether the caller's grad mode (outside the statistics block) is on.
        return self.grad_through_window and self._grad_mode

    def _statistic_grads(self, x, weight, conv_input, views=None, mean_t=None, var_t=None):
        """W_t (detached), dμ/dW and dν/dW of the current iteration.

        With ``views`` (and the current mean and variance ``mean_t``, ``var_t``) they are written into
        the staging row together with μ_t and var_t (into ``sq``; and both into the running statistics'
        targets), and nothing is returned; without, ``(W_t, dμ/dW, dν/dW)`` (dν/dW in W's shape). The
        slopes are computed from the conv's input and output in their own dtype (half under autocast: the
        large tensors are not copied to float32) and stored in the window's dtype.
        """
        conv = self.bound_conv
        if conv is not None and conv_input is not None:
            weight_t = (self._conv_weight(conv) if weight is None else weight).detach()
            with torch.no_grad():
                inp = conv_input.to(x.dtype)
                expected = conv_output_size(inp.shape[2:], conv.kernel_size, conv.stride, conv.padding,
                                            conv.dilation)
                if inp.shape[0] != x.shape[0] or tuple(x.shape[2:]) != expected:
                    raise CBNBindError(
                        f'{self._display_name()}: input {tuple(x.shape)} is not the output of its bound '
                        f'conv (conv input {tuple(inp.shape)}); is the norm really fed by that conv?')
                # C_in·kh·kw values = (groups, K) in the window row, whatever shape the kernel gives
                mean_grad = mean_input_patch(inp, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                             raw=True)
                geometry = (weight_t.shape, conv.stride, conv.padding, conv.dilation, conv.groups)
                out = None
                if views is not None:   # μ_t, var_t, W_t, dμ/dW in one multi-tensor copy; dν/dW in place
                    views.write_staging_(mean=mean_t, sq=var_t, weight=weight_t, mean_grad=mean_grad,
                                         target_mean=mean_t, target_var=var_t)
                    out = views.stage('sq_grad', weight_t.shape)
                if self._sample_step is None:
                    sq_grad = second_moment_weight_grad(inp, x.detach(), *geometry, out=out)
                else:
                    step, phase = self._sample_now
                    sq_grad = sampled_second_moment_weight_grad(inp, x.detach(), *geometry, step=step,
                                                                phase=phase, out=out)
            return None if views is not None else (weight_t, mean_grad, sq_grad)
        if weight is None:
            raise CBNBindError(f'{self._display_name()}: the bound conv did not run before this layer '
                               '(no conv input captured); pass forward(x, weight) or fix the binding')
        if self.sync:
            raise CBNBindError(f'{self._display_name()}: sync=True needs a bound conv (closed-form '
                               'statistic gradients); bind it with cbn_mmdet.ops.bind_cbn_to_conv')
        # Explicit weight, no conv input: the official way, through autograd (slower, same values).
        dtype = compute_dtype(x.dtype)
        with torch.enable_grad():
            xs = x.to(dtype)
            stats = (xs.mean((0, 2, 3)), (xs * xs).mean((0, 2, 3)))
            grads = [torch.autograd.grad(stat.sum(), weight, retain_graph=True, allow_unused=True)[0]
                     for stat in stats]
        if grads[0] is None:
            raise CBNBindError(f'{self._display_name()}: the input does not depend on the weight passed '
                               'to forward(x, weight)')
        # One row per output channel: the compact (groups, K) layout with groups = C_out.
        weight_t, mean_grad, sq_grad = weight.detach(), grads[0].detach(), grads[1].detach()
        if views is None:
            return weight_t, mean_grad, sq_grad
        views.write_staging_(mean=mean_t, sq=var_t, weight=weight_t, mean_grad=mean_grad, sq_grad=sq_grad,
                             target_mean=mean_t, target_var=var_t)
        return None

    def _sample_grid(self, out_size):
        """``(step, phase)`` of the fast mode for an output map ``out_size``: the grid is clamped to the
        map, and its offset cycles over the grid with the training-forward counter (host side)."""
        rh, rw = (min(r, max(int(n), 1)) for r, n in zip(self._sample_step, out_size))
        a, b = divmod(self._iter_shadow % (rh * rw), rw)
        return (rh, rw), (a, b)

    def _window_slopes(self, shares):
        """``grad_through_window`` (synced path): ``(2, C, K)``, dA/dW_t and dB/dW_t of the window terms.

        A = Σ_τ w_τ·(μ_τ + ρ·(W_t − W_τ)·∂μ_τ/∂W) with w_τ = kept_τ / n is linear in W_t, so
        dA_c/dW_t[c] = ρ·Σ_τ w_τ,c·∂μ_τ/∂W[g(c)] (same for B with ∂ν_τ/∂W), over the stored entries
        (``shares`` ``(n, C)``; the current entry's gradient is the closed form of the normalisation).
        """
        return torch.stack(window_slopes(self._window_views().ring, shares * self.rho))

    def _ring_slopes(self, views):
        """``grad_through_window`` (``cbn_normalise``'s ``window_slopes``): ``−ρ·Σ_τ kept_τ,c·∂μ_τ/∂W`` and
        ``−ρ·Σ_τ kept_τ,c·∂ν_τ/∂W`` over the stored entries, each ``(C, K)``: the window terms' slopes
        without their factor ``c`` and sign, which the backward folds into its per-channel factors."""
        scratch = views.compensated
        torch.mul(scratch['valid_ring'], -self.rho, out=scratch['ring_weights'])
        return window_slopes(views.ring, scratch['ring_weights'], scratch['ring_weights_t'],
                             scratch['ring_weights_col'])

    def _live_weight(self, weight):
        """The weight the bound conv convolves with (the one the window terms' gradient goes to), or None
        when it takes no gradient."""
        live = weight if weight is not None else self._conv_weight(self.bound_conv)
        return live if live.requires_grad else None

    def _attach_window_gradient(self, stats, slopes, weight):
        """Add ``(W − W.detach())·d[μ̄, S]/dW`` (exactly zero) to ``stats`` (``(μ̄, S)``): it attaches the
        window terms' gradient w.r.t. the live conv weight without re-running the window."""
        live = self._live_weight(weight)
        if slopes is None or live is None:
            return stats
        w = live.to(slopes.dtype).reshape(slopes.shape[1], -1)
        return (torch.stack(stats) + ((w - w.detach()) * slopes).sum(-1)).unbind(0)

    def _compensated_window(self, weight_t, dtype):
        """Every stored entry moved to ``weight_t`` in ``dtype``: ``(μ_τ(W_t), ν_τ(W_t))``, each ``(n, C)``."""
        views = window_views(self._window_views().ring_rows.to(dtype), self.num_features, self._groups)
        return compensate(views, weight_t.to(dtype), self.rho)

    def _materialise(self, weight_shape, groups):
        """Give the window its conv-shaped parts (at binding, before any copy of the model is taken)."""
        self._materialise_layout(math.prod(weight_shape[1:]), groups)

    def _materialise_layout(self, k, groups):
        c = self.num_features
        length = window_row_length(c, k, groups)
        window = self._buffers['window']
        if window.shape[1] == length and self._groups == groups:
            return
        if self.is_materialised:
            raise RuntimeError(f'{self._display_name()}: window_weight has shape {tuple(self.window_weight.shape)} '
                               f'and window_mean_grad {tuple(self.window_mean_grad.shape)} but the conv needs '
                               f'({self.buffer_num}, {c}, {k}) and ({self.buffer_num}, {groups}, {k}); was a '
                               'checkpoint of another model loaded?')
        self._groups = groups
        self._buffers['window'] = empty_window(self.buffer_num + 1, length, c, dtype=window.dtype,
                                               device=window.device)
        self._views = None


def _shares_memory(pack, views):
    """Whether ``views`` are still the leading elements of ``pack``'s rows (``pack`` may be None)."""
    if pack is None:
        return False
    step = pack.stride(0) * pack.element_size()
    return all(v.device == pack.device and v.data_ptr() == pack.data_ptr() + i * step for i, v in enumerate(views))


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
