"""Batch-Channel Normalization (BCN).

Qiao, Wang, Liu, Shen, Yuille, "Rethinking Normalization and Elimination Singularity in Neural
Networks", arXiv 1911.09738 (the paper that introduces BCN; the later version of the Weight
Standardization paper, arXiv 1903.10520, describes it too). BCN is batch normalization per channel
followed by group (channel) normalization, then an affine; it is meant to follow a weight-standardized
conv (:class:`~cbn_mmdet.ops.weight_std_conv.WeightStandardizedConv2d`).

BibTeX::

    @article{qiao2019bcn,
      title={Rethinking Normalization and Elimination Singularity in Neural Networks},
      author={Qiao, Siyuan and Wang, Huiyu and Liu, Chenxi and Shen, Wei and Yuille, Alan},
      journal={arXiv preprint arXiv:1911.09738}, year={2019}}
"""

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ._amp import autocast_off, compute_dtype
from ._bn_common import (
    batch_mean_var,
    check_values_per_channel,
    empty_batch_output,
    lerp_running_stats_,
    momentum_factor,
)
from ._validate import check_divides, check_eps, check_input_dim, check_positive_int, check_unit_interval

__all__ = ['BatchChannelNorm2d']


class BatchChannelNorm2d(_BatchNorm):
    r"""Batch-Channel Normalization over a 4D input.

    .. math::
        \hat x = \mathrm{BN}(x) = \frac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}}, \qquad
        y = \gamma_c \cdot \mathrm{GN}_G(\hat x) + \beta_c

    where ``BN`` is batch normalization *without* affine (batch statistics in training, running
    statistics in eval; running statistics updated exactly as ``torch.nn.BatchNorm2d``: the biased
    variance normalises, the unbiased one enters ``running_var``), ``GN_G`` is group normalization
    over ``num_groups`` groups without affine (same ``eps``), and ``gamma``/``beta`` are
    per-channel (``weight``/``bias`` of shape ``(C,)``).

    ``estimate_stats=True`` is the paper's micro-batch mode: in training the running statistics are
    first updated with the current batch statistics (``momentum``), then the input is normalised
    with the *updated* running statistics, treated as constants (no gradient flows through them),
    as the released ``EstBN``: the current batch contributes (weight ``momentum``) to the statistic
    it is normalised with, and the estimate replaces the noisy micro-batch statistics, whose
    gradient it does not have. ``estimate_mode`` chooses the variance update:

    * ``'official'`` (default, the released ``EstBN``, which produced the paper's numbers):
      ``running_var ← (1−m)·running_var + m·mean((x − running_mean_old)²)``, the *biased* second
      moment about the *previous* running mean (so it includes the shift of the mean), then
      ``running_mean ← (1−m)·running_mean + m·mean(x)``;
    * ``'unbiased'``: torch BN's update, the unbiased batch variance about the batch mean.

    Unlike ``EstBN`` we still count ``num_batches_tracked`` (so ``momentum=None``, a cumulative
    average, works, and the buffer is a torch BN's); the update itself does not depend on it.

    The released classification code differs in where the affines sit: it uses
    ``nn.BatchNorm2d(C)`` (with its own per-channel affine), then group normalization without
    affine, then a per-*group* affine (``(1, G, 1)`` parameters). We keep a single per-channel
    affine at the end instead, so a BN checkpoint's ``weight``, ``bias``, ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` load unchanged (same keys, same shapes), and
    BN-aware tooling (``norm_eval``, ``init_cfg`` with ``layer='_BatchNorm'``, weight-decay rules)
    treats the layer as a BN. At initialisation (identity affines) both variants compute the same
    function; the released one can additionally learn a per-channel scale *before* the group
    normalisation, which ours cannot.

    In eval only the batch-normalisation part is a fixed per-channel affine map; the group
    normalisation depends on the sample. mmcv's own conv+BN folds (``fuse_conv_bn``,
    ``efficient_conv_bn_eval``) would replace the whole layer by its BN part; ``cbn_mmdet.deploy``
    folds the BN part and keeps a ``GroupNorm`` (see its guard for mmcv's paths).

    Args:
        num_features (int): number of channels ``C``.
        eps (float): added to the variances of both normalisations. Default: 1e-5.
        momentum (float | None): running-statistics momentum (torch convention: weight of the new
            value); ``None`` for a cumulative average. Default: 0.1.
        affine (bool): learn the per-channel ``weight``/``bias``. Default: True.
        track_running_stats (bool): keep running statistics (else batch statistics are used in
            eval as well). Default: True.
        num_groups (int, keyword-only): groups of the channel normalization; must divide
            ``num_features``. Default: 32.
        estimate_stats (bool, keyword-only): normalise with the updated running statistics in
            training (micro-batch mode); needs ``track_running_stats=True``. Default: False.
        estimate_mode (str, keyword-only): ``'official'`` or ``'unbiased'``, the running-variance
            update of ``estimate_stats`` (above; unused without it). Default: ``'official'``.

    Shape:
        - Input: ``(N, C, H, W)``; an empty input (``N = 0``) gives an empty output and leaves the
          running statistics untouched.
        - Output: same shape and dtype as the input (statistics in float32 for half inputs).

    Example:
        >>> norm = BatchChannelNorm2d(64, num_groups=32)
        >>> norm(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
    """

    _abbr_ = 'bn'
    ESTIMATE_MODES = ('official', 'unbiased')

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 num_groups=32, estimate_stats=False, estimate_mode='official'):
        owner = type(self).__name__
        num_features = check_positive_int('num_features', num_features, owner)
        eps = check_eps(eps, owner)
        momentum = check_unit_interval('momentum', momentum, owner, allow_none=True)
        num_groups = check_positive_int('num_groups', num_groups, owner)
        check_divides('num_groups', num_groups, 'num_features', num_features, owner)
        if not isinstance(estimate_stats, bool):
            raise TypeError(f'{owner}: estimate_stats must be a bool, got {estimate_stats!r} '
                            f'({type(estimate_stats).__name__})')
        if estimate_mode not in self.ESTIMATE_MODES:
            raise ValueError(f'{owner}: estimate_mode must be one of {self.ESTIMATE_MODES}, got {estimate_mode!r}')
        if estimate_stats and not track_running_stats:
            raise ValueError(f'{owner}: estimate_stats=True needs track_running_stats=True, got '
                             f'track_running_stats={track_running_stats!r}')
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.num_groups = num_groups
        self.estimate_stats = estimate_stats
        self.estimate_mode = estimate_mode

    def _check_input_dim(self, input):
        check_input_dim(input, (4,), type(self).__name__)

    def extra_repr(self):
        return (f'{super().extra_repr()}, num_groups={self.num_groups}, estimate_stats={self.estimate_stats}, '
                f'estimate_mode={self.estimate_mode!r}')

    def forward(self, input):
        self._check_input_dim(input)
        if input.numel() == 0:
            return self._empty_output(input)
        uses_batch_stats = self.training or self.running_mean is None
        if uses_batch_stats:
            check_values_per_channel(input.shape, type(self).__name__, when='using batch statistics')
        with autocast_off(input.device.type):
            x = input.to(compute_dtype(input.dtype))
            factor = self._momentum_factor()
            if self.training and self.estimate_stats:
                x = self._normalize_with_estimated_stats(x, factor)
            else:
                x = self._batch_normalize(x, uses_batch_stats, factor)
            # F.group_norm's weight/bias are per channel: the final affine comes with it for free.
            out = F.group_norm(x, self.num_groups, self._as(self.weight, x.dtype),
                               self._as(self.bias, x.dtype), self.eps)
        return out.to(input.dtype)

    @staticmethod
    def _as(tensor, dtype):
        return None if tensor is None else tensor.to(dtype)

    def _empty_output(self, input):
        return empty_batch_output(input, self.weight, self.bias)

    def _momentum_factor(self):
        """The running-statistics factor of this forward (as torch's ``_BatchNorm``)."""
        if not (self.training and self.track_running_stats):
            return 0.0  # unused: running statistics are not updated
        self.num_batches_tracked.add_(1)
        return momentum_factor(self.momentum, self.num_batches_tracked, self.running_mean.dtype)

    def _stats_in(self, dtype):
        """Running statistics in the compute dtype (copies only when the buffers differ)."""
        if self.running_mean is None:
            return None, None
        return self.running_mean.to(dtype), self.running_var.to(dtype)

    def _batch_normalize(self, x, uses_batch_stats, factor):
        if uses_batch_stats and isinstance(factor, torch.Tensor) and self.running_mean is not None:
            # momentum=None: F.batch_norm takes only a float factor; update with the device-side one.
            mean, var = batch_mean_var(x)
            count = x.numel() // x.shape[1]
            lerp_running_stats_(self.running_mean, self.running_var, mean, var * (count / max(count - 1, 1)), factor)
            return F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        mean, var = self._stats_in(x.dtype)
        out = F.batch_norm(x, mean, var, None, None, uses_batch_stats, factor, self.eps)
        if mean is not None and mean is not self.running_mean:
            # F.batch_norm updated the fp32 working copies in place; write them back.
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
        return out

    def _normalize_with_estimated_stats(self, x, factor):
        with torch.no_grad():
            if self.estimate_mode == 'official':
                mean = x.mean(dim=(0, 2, 3))
                old_mean = self.running_mean.to(x.dtype).view(1, -1, 1, 1)
                var = (x - old_mean).square().mean(dim=(0, 2, 3))
            else:
                var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
            lerp_running_stats_(self.running_mean, self.running_var, mean, var, factor)
        # Copies: a later forward updates the buffers in place, and this step's backward must
        # still see this step's values (autograd would otherwise fail its version check).
        mean = self.running_mean.to(x.dtype, copy=True)
        var = self.running_var.to(x.dtype, copy=True)
        return F.batch_norm(x, mean, var, None, None, False, 0.0, self.eps)
