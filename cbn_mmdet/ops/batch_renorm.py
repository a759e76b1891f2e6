"""Batch Renormalization (BRN).

Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models",
NeurIPS 2017 (arXiv 1702.03275).

BN normalises a training batch with its own statistics and the eval batch with the running ones; at
small batch the two differ. BRN corrects the training output towards what the running statistics
would give, with a per-channel affine correction that is a *constant* for the backward pass.

Training forward, at counter value ``t`` (incremented before use, first forward: ``t = 1``)::

    mu_B = mean(x),  sigma_B = sqrt(var_B(x) + eps)          (biased variance, over N, H, W)
    sigma = sqrt(running_var + eps)                          (running statistics BEFORE this step)
    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max(t), r_max(t)))
    d = stop_gradient(clip((mu_B - running_mean) / sigma, -d_max(t), d_max(t)))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
    running_mean = lerp(running_mean, mu_B, momentum)
    running_var  = lerp(running_var, var_B * n / (n - 1), momentum)      (n = N * H * W)

Clipping schedule (the paper: ``r_max`` 1 -> 3, ``d_max`` 0 -> 5, relaxed linearly after a warm-up)::

    p_r(t) = clip((t - warmup_iters) / max(r_ramp_iters, 1), 0, 1);  r_max(t) = 1 + (r_max - 1) * p_r(t)
    p_d(t) = clip((t - warmup_iters) / max(d_ramp_iters, 1), 0, 1);  d_max(t) = d_max * p_d(t)

so the first ``warmup_iters`` training steps have ``r = 1, d = 0``: BRN is exactly BN there. The
paper's ImageNet schedule is ``r_max = 1`` for 5k steps, reaching 3 at 40k and ``d_max = 5`` at 25k,
i.e. ``warmup_iters=5000, r_ramp_iters=35000, d_ramp_iters=20000`` (the defaults).

Eval: ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta`` (plain BN eval).

Two choices of ours, both documented in ``docs/norm_layers.md``:

* the paper keeps a running ``sigma`` updated by a moving average of ``sigma_B``; we keep torch's
  ``running_var`` (the unbiased batch variance, lerped) and take ``sigma = sqrt(running_var + eps)``,
  so BN checkpoints load, a conv + BRN folds like conv + BN, and the warm-up matches ``nn.BatchNorm2d``
  in its running statistics too;
* ``momentum`` is torch's convention (the weight of the NEW value) with the paper's slow default
  0.01 (the paper found a higher update rate than Inception's, 0.01, beneficial for BRN: the running
  statistics are used in training, so they must follow the weights).

BibTeX::

    @inproceedings{ioffe2017brn,
      title={Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models},
      author={Ioffe, Sergey}, booktitle={NeurIPS}, year={2017}}
"""
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ._amp import autocast_off, compute_dtype
from ._bn_common import check_values_per_channel
from ._validate import (
    check_eps,
    check_finite,
    check_input_dim,
    check_non_negative_int,
    check_positive_int,
    check_unit_interval,
)

__all__ = ['batch_renorm', 'renorm_limits', 'BatchRenorm2d']


def _channel(v):
    return v.view(1, -1, 1, 1)


def renorm_limits(iters, r_max, d_max, warmup_iters, r_ramp_iters, d_ramp_iters, dtype=torch.float32):
    """``(r_max(t), d_max(t))`` as scalar tensors of ``dtype`` for the counter tensor ``iters`` (computed on
    its device: no host sync)."""
    steps = (iters - warmup_iters).to(dtype)
    p_r = (steps / max(r_ramp_iters, 1)).clamp(0.0, 1.0)
    p_d = (steps / max(d_ramp_iters, 1)).clamp(0.0, 1.0)
    return 1.0 + (r_max - 1.0) * p_r, d_max * p_d


def batch_renorm(x, weight, bias, running_mean, running_var, r_limit, d_limit, eps=1e-5, momentum=0.01):
    """Functional BRN training step (see the module docstring for the formulas).

    Args:
        x (Tensor): input ``(N, C, H, W)`` with ``N * H * W >= 2``.
        weight, bias (Tensor | None): per-channel affine of shape ``(C,)``.
        running_mean, running_var (Tensor): ``(C,)``, read, then updated in place.
        r_limit, d_limit (Tensor): scalar clipping limits of this step (see :func:`renorm_limits`).
        eps (float): added to the variances. Default: 1e-5.
        momentum (float): weight of the NEW value in the running-statistic lerp. Default: 0.01.

    Returns:
        Tensor: same shape and dtype as ``x``; statistics in at least float32.
    """
    check_input_dim(x, (4,), 'batch_renorm')
    check_values_per_channel(x.shape, 'batch_renorm')
    count = x.numel() // x.size(1)
    dtype = compute_dtype(x.dtype)
    with autocast_off(x.device.type):
        xc = x.to(dtype)
        var, mean = torch.var_mean(xc, dim=(0, 2, 3), unbiased=False)
        inv_std = (var + eps).rsqrt()
        with torch.no_grad():
            stat_dtype = running_var.dtype
            sigma = (running_var.to(dtype) + eps).sqrt()
            r_limit = r_limit.to(dtype)
            d_limit = d_limit.to(dtype)
            r = torch.minimum(torch.maximum((var + eps).sqrt() / sigma, r_limit.reciprocal()), r_limit)
            d = torch.minimum(torch.maximum((mean - running_mean.to(dtype)) / sigma, -d_limit), d_limit)
            running_mean.lerp_(mean.to(stat_dtype), momentum)
            running_var.lerp_((var * (count / (count - 1))).to(stat_dtype), momentum)
        # y = x * scale + shift with scale = gamma r / sigma_B, shift = beta + gamma (d - mu_B r / sigma_B):
        # one pass over x; autograd differentiates mu_B and sigma_B, r and d are constants.
        scale = r * inv_std
        shift = d - mean * scale
        if weight is not None:
            w = weight.to(dtype)
            scale, shift = scale * w, shift * w
        if bias is not None:
            shift = shift + bias.to(dtype)
        y = torch.addcmul(_channel(shift), xc, _channel(scale))
    return y.to(x.dtype)


class BatchRenorm2d(_BatchNorm):
    r"""Batch Renormalization over a 4D input (Ioffe 2017), with the paper's clipping schedule.

    See the module docstring for the training forward and the schedule; in eval

    .. math:: y = \gamma \cdot \frac{x - \mathrm{running\_mean}}{\sqrt{\mathrm{running\_var} + \epsilon}}
              + \beta.

    A direct ``_BatchNorm`` subclass abbreviated ``bn``: BN checkpoints load, and BN-aware tooling
    (``norm_eval``, ``norm_decay_mult``, the conv + BN fold, which is exact since eval is BN's)
    recognises it. The schedule's counter is the buffer ``iters`` (saved with the model, so a resumed
    run continues the schedule); ``num_batches_tracked`` counts alongside it. An empty input
    (``N = 0``) is a no-op: no counter step, no statistic change.

    Args:
        num_features (int): number of channels ``C``.
        eps (float): added to the variances, > 0. Default: 1e-5.
        momentum (float): weight of the NEW value in the running-statistic updates (torch's
            convention), in [0, 1]. Default: 0.01 (the paper's slow average).
        affine (bool): learn the per-channel ``weight``/``bias``. Default: True.
        r_max (float, keyword-only): final limit of ``r``, >= 1. Default: 3.
        d_max (float, keyword-only): final limit of ``|d|``, >= 0. Default: 5.
        warmup_iters (int, keyword-only): training steps with ``r = 1, d = 0`` (BN). Default: 5000.
        r_ramp_iters (int, keyword-only): steps after the warm-up over which ``r_max`` rises linearly
            from 1 to its final value (0: at once). Default: 35000.
        d_ramp_iters (int, keyword-only): the same for ``d_max`` from 0. Default: 20000.

    Shape:
        - Input: ``(N, C, H, W)``.
        - Output: same shape and dtype as the input (statistics in float32 for half inputs).

    Example:
        >>> norm = BatchRenorm2d(16, warmup_iters=100, r_ramp_iters=400, d_ramp_iters=250)
        >>> norm(torch.randn(2, 16, 7, 7)).shape
        torch.Size([2, 16, 7, 7])
    """

    _abbr_ = 'bn'

    def __init__(self, num_features, eps=1e-5, momentum=0.01, affine=True, *, r_max=3.0, d_max=5.0,
                 warmup_iters=5000, r_ramp_iters=35000, d_ramp_iters=20000):
        owner = type(self).__name__
        num_features = check_positive_int('num_features', num_features, owner)
        eps = check_eps(eps, owner)
        momentum = check_unit_interval('momentum', momentum, owner)
        r_max = check_finite('r_max', r_max, owner)
        if r_max < 1.0:
            raise ValueError(f'{owner}: r_max must be >= 1, got {r_max!r}')
        d_max = check_finite('d_max', d_max, owner)
        if d_max < 0.0:
            raise ValueError(f'{owner}: d_max must be >= 0, got {d_max!r}')
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        self.r_max, self.d_max = r_max, d_max
        self.warmup_iters = check_non_negative_int('warmup_iters', warmup_iters, owner)
        self.r_ramp_iters = check_non_negative_int('r_ramp_iters', r_ramp_iters, owner)
        self.d_ramp_iters = check_non_negative_int('d_ramp_iters', d_ramp_iters, owner)
        self.register_buffer('iters', torch.zeros((), dtype=torch.long))

    def reset_running_stats(self):
        super().reset_running_stats()
        # _NormBase.__init__ calls this before our buffer exists.
        if getattr(self, 'iters', None) is not None:
            self.iters.zero_()

    def _check_input_dim(self, input):
        check_input_dim(input, (4,), type(self).__name__)

    def extra_repr(self):
        return (f'{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_iters={self.warmup_iters}, '
                f'r_ramp_iters={self.r_ramp_iters}, d_ramp_iters={self.d_ramp_iters}')

    def current_limits(self):
        """``(r_max, d_max)`` (float32 tensors) the next training step would use."""
        return renorm_limits(self.iters + 1, self.r_max, self.d_max, self.warmup_iters, self.r_ramp_iters,
                             self.d_ramp_iters)

    def forward(self, input):
        self._check_input_dim(input)
        if input.numel() == 0:
            return self._empty_output(input)
        if not self.training:
            return self._eval_forward(input)
        check_values_per_channel(input.shape, type(self).__name__)
        self.iters.add_(1)
        self.num_batches_tracked.add_(1)
        r_limit, d_limit = renorm_limits(self.iters, self.r_max, self.d_max, self.warmup_iters, self.r_ramp_iters,
                                         self.d_ramp_iters, dtype=compute_dtype(input.dtype))
        return batch_renorm(input, self.weight, self.bias, self.running_mean, self.running_var, r_limit, d_limit,
                            eps=self.eps, momentum=self.momentum)

    def _eval_forward(self, input):
        dtype = compute_dtype(input.dtype)
        with autocast_off(input.device.type):
            weight = None if self.weight is None else self.weight.to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            out = F.batch_norm(input.to(dtype), self.running_mean.to(dtype), self.running_var.to(dtype), weight,
                               bias, False, 0.0, self.eps)
        return out.to(input.dtype)

    def _empty_output(self, input):
        # Routed through weight/bias so they still get (zero) gradients: DDP without
        # find_unused_parameters expects every parameter to take part.
        if self.weight is None:
            return input.clone()
        return input * _channel(self.weight.to(input.dtype)) + _channel(self.bias.to(input.dtype))
