"""Moving Average Batch Normalization (MABN).

Yan, Wan, Zhang, Zhang, Wei, Sun, "Towards Stabilizing Batch Statistics in Backward Propagation of
Batch Normalization", ICLR 2020 (official code: megvii-model/MABN).

Small batches make three batch statistics noisy: the forward second moment and the two backward
statistics of BN. MABN drops mean-centring (the preceding conv is centred instead, see
:class:`~cbn_mmdet.ops.weight_std_conv.CenteredConv2d`), normalises by the second moment only,
and replaces the forward statistic ``E[x^2]`` and the backward statistic ``E[g * z]`` by simple
moving averages (SMA) over the last ``K = real_B / B`` iterations, kept in buffers. The semantics
below follow the official ``MABN2d`` to the detail, with all state in buffers (so it survives a
checkpoint and resume).

Training forward, at counter value ``t`` (incremented before use, first forward: ``t = 1``)::

    x2 = mean(x^2) over (N, H, W);  buffer_x2[t % K] = x2
    var = x2                        if t <= K or t < warmup_iters   (warm-up)
        = mean(buffer_x2, rows)     otherwise
    z = x / sqrt(var + eps)
    r = sqrt(var + eps) / sqrt(running_var + eps), then
        r = 1                       if t <= max(1000, warmup_iters)
        r = clip(r, 1/5, 5)         otherwise
    y = gamma * r * z + beta
    running_var = momentum * running_var + (1 - momentum) * var     (momentum weights the OLD value)

Backward (its own rule, NOT the gradient of the forward once the SMA is in use)::

    g = grad_y * gamma * r;  gz = mean(g * z) over (N, H, W);  buffer_gz[t % K] = gz
    gz_stat = gz if warm-up else mean(buffer_gz, rows)
    grad_x = (g - z * gz_stat) / sqrt(var + eps);  grad_gamma = sum(grad_y * r * z);  grad_beta = sum(grad_y)

``r`` is always treated as a constant (as in batch renormalization). While ``r`` is forced to 1
and the current statistics are used (warm-up, or any step with ``K = 1``) the rule *is* the exact
gradient of the forward. With the moving averages the exact gradient would be
``(g - z * gz / K) / sqrt(var + eps)`` (past rows are constants); MABN instead substitutes the past
``gz`` rows for the missing terms.

Eval: ``y = gamma * x / sqrt(running_var + eps) + beta``.

BibTeX::

    @inproceedings{yan2020mabn,
      title={Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization},
      author={Yan, Junjie and Wan, Ruosi and Zhang, Xiangyu and Zhang, Wei and Wei, Yichen and Sun, Jian},
      booktitle={ICLR}, year={2020}}
"""
import warnings

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ._amp import autocast_off, compute_dtype
from ._bn_common import empty_batch_output, write_row_if_
from ._validate import (
    check_divides,
    check_eps,
    check_input_dim,
    check_non_negative_int,
    check_positive_int,
    check_unit_interval,
)

__all__ = ['MovingAverageBNFunction', 'moving_average_bn', 'MovingAverageBatchNorm2d']

# The official code lets the renormalisation factor r act only after this many iterations (or after
# warm-up, whichever is later), whatever the schedule: kept as is.
R_FREE_ITERS = 1000
R_CLIP = (1.0 / 5.0, 5.0)


def _channel(v):
    return v.view(1, -1, 1, 1)


def _in_warmup(iters, num_rows, warmup_iters):
    """Bool tensor: use the current statistic (not the SMA). A tensor, not a Python bool, so a
    CUDA step never syncs on the counter."""
    return (iters <= num_rows) | (iters < warmup_iters)


def _finite(t):
    # t·0 == 0 exactly for finite t: a 0-dim bool tensor, never read on the host.
    return (t * 0 == 0).all()


def _loss_scale(scaler, dtype):
    """The loss scale a GradScaler multiplied this backward's gradients by (a device tensor), or None."""
    scale = None if scaler is None or not getattr(scaler, '_enabled', True) else getattr(scaler, '_scale', None)
    return None if scale is None else scale.to(dtype).view(())


class MovingAverageBNFunction(torch.autograd.Function):
    """One MABN training step; the backward is MABN's rule (see the module docstring).

    ``forward(ctx, x, weight, bias, running_var, buffer_x2, buffer_gz, iters, eps, momentum,
    warmup_iters, scaler, deferred)``: ``x`` 4D; ``weight``/``bias`` of shape ``(C,)`` or ``None``;
    ``iters`` a long scalar tensor holding the already-incremented counter; ``scaler`` a GradScaler whose
    loss scale the gradients carry, or None.

    What enters the moving averages (row ``iters % K`` of ``buffer_x2`` and ``buffer_gz``, and
    ``running_var``) is written once the step's gradients are known (``deferred``: in backward), and only
    if the step's statistic AND its gradient statistic are finite: an overflow step of mixed-precision
    training, which the GradScaler skips, leaves every average as it was. ``buffer_gz`` holds unscaled
    values (``gz / scale``): rows of steps with different loss scales average correctly, and the rule
    uses ``scale · mean(rows)``. Without a backward (``deferred=False``: no gradient required) the forward
    statistics are written in forward. Everything is computed in ``x``'s dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_var, buffer_x2, buffer_gz, iters, eps, momentum, warmup_iters,
                scaler, deferred):
        num_rows = buffer_x2.shape[0]
        row = iters % num_rows
        warm = _in_warmup(iters, num_rows, warmup_iters)

        x2 = x.square().mean(dim=(0, 2, 3))
        # The SMA with this step's x2 in row ``row``, without writing it yet.
        stored = buffer_x2.to(x.dtype)
        sma = (stored.sum(0) - stored.index_select(0, row.view(1)).view(-1) + x2) / num_rows
        var = torch.where(warm, x2, sma)
        std = (var + eps).sqrt()
        z = x / _channel(std)

        # r uses running_var BEFORE this step's update (official order).
        r = std / (running_var.to(x.dtype) + eps).sqrt()
        r_forced = iters <= max(R_FREE_ITERS, warmup_iters)
        r = torch.where(r_forced, torch.ones_like(r), r.clamp(*R_CLIP))
        new_running = running_var * momentum + var.to(running_var.dtype) * (1.0 - momentum)

        scale = r if weight is None else r * weight
        y = z * _channel(scale)
        if bias is not None:
            y = y + _channel(bias)

        forward_ok = _finite(x2)
        if deferred:
            ctx.commit = (running_var, new_running, buffer_x2, x2, forward_ok, iters)
        else:
            _commit_forward(running_var, new_running, buffer_x2, row, x2, forward_ok, iters)
            ctx.commit = None
        ctx.save_for_backward(z, std, r, weight)
        # buffer_gz is written in backward (and by later steps): kept on ctx, not saved, so that
        # autograd's version check does not reject the in-place row write.
        ctx.buffer_gz, ctx.scaler = buffer_gz, scaler
        ctx.row, ctx.warm = row, warm
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, std, r, weight = ctx.saved_tensors
        g = grad_y * _channel(r if weight is None else r * weight)
        gz = (g * z).mean(dim=(0, 2, 3))
        ok = _finite(gz)
        if ctx.commit is not None:
            running_var, new_running, buffer_x2, x2, forward_ok, iters = ctx.commit
            ok = ok & forward_ok
            _commit_forward(running_var, new_running, buffer_x2, ctx.row, x2, ok, iters)
            ctx.commit = None
        loss_scale = _loss_scale(ctx.scaler, gz.dtype)
        buffer_gz = ctx.buffer_gz
        write_row_if_(buffer_gz, ctx.row, gz if loss_scale is None else gz / loss_scale, ok)
        mean_gz = buffer_gz.to(gz.dtype).mean(dim=0)
        gz_stat = torch.where(ctx.warm, gz, mean_gz if loss_scale is None else mean_gz * loss_scale)

        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g - z * _channel(gz_stat)) / _channel(std)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (grad_y * z).sum(dim=(0, 2, 3)) * r
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _commit_forward(running_var, new_running, buffer_x2, row, x2, ok, iters):
    """Write the step's forward statistics into the averages if ``ok`` (0-dim bool), else take the step
    back from the counter, so that the next step uses this row and the run continues exactly as if the
    skipped batch had never been seen. No host read."""
    write_row_if_(buffer_x2, row, x2, ok)
    running_var.copy_(torch.where(ok, new_running, running_var))
    iters.sub_(ok.logical_not().to(iters.dtype))


def _check_state(x, running_var, buffer_x2, buffer_gz, iters):
    check_input_dim(x, (4,), 'moving_average_bn')
    num_channels = x.shape[1]
    if running_var.shape != (num_channels,):
        raise ValueError(f'moving_average_bn: running_var must have shape ({num_channels},), got '
                         f'{tuple(running_var.shape)}')
    for name, buf in (('buffer_x2', buffer_x2), ('buffer_gz', buffer_gz)):
        if buf.dim() != 2 or buf.shape[1] != num_channels or buf.shape[0] < 1:
            raise ValueError(f'moving_average_bn: {name} must have shape (K, {num_channels}) with K >= 1, '
                             f'got {tuple(buf.shape)}')
    if buffer_x2.shape != buffer_gz.shape:
        raise ValueError(f'moving_average_bn: buffer_x2 and buffer_gz shapes differ: '
                         f'{tuple(buffer_x2.shape)} vs {tuple(buffer_gz.shape)}')
    if iters.numel() != 1 or iters.dtype != torch.long:
        raise ValueError(f'moving_average_bn: iters must be a long scalar tensor, got dtype {iters.dtype}, '
                         f'shape {tuple(iters.shape)}')


def moving_average_bn(x, weight, bias, running_var, buffer_x2, buffer_gz, iters, eps=1e-5, momentum=0.98,
                      warmup_iters=100, grad_scaler=None):
    """Functional MABN training step (see the module docstring for the formulas).

    Args:
        x (Tensor): input ``(N, C, H, W)``, ``N * H * W >= 1``.
        weight, bias (Tensor | None): per-channel affine of shape ``(C,)``.
        running_var (Tensor): ``(C,)``, updated in place.
        buffer_x2, buffer_gz (Tensor): ``(K, C)`` SMA buffers; row ``iters % K`` is written (the
            first in this call, the second when the backward runs).
        iters (Tensor): long scalar, the counter of this step (already incremented, starts at 1).
        eps (float): added to the second moment. Default: 1e-5.
        momentum (float): weight of the OLD running_var. Default: 0.98.
        warmup_iters (int): iterations that use the current statistics. Default: 100.
        grad_scaler: the ``torch.amp.GradScaler`` whose loss scale the gradients carry (mixed precision),
            or None. Its scale is read on the device when the backward runs.

    A step's statistics enter the buffers only if they and the step's gradient statistic are finite
    (written in backward when a gradient is required, else in forward).

    Returns:
        Tensor: same shape and dtype as ``x``; statistics computed in at least float32.
    """
    _check_state(x, running_var, buffer_x2, buffer_gz, iters)
    dtype = compute_dtype(x.dtype)
    deferred = torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for p in (weight, bias)))
    with autocast_off(x.device.type):
        y = MovingAverageBNFunction.apply(
            x.to(dtype), None if weight is None else weight.to(dtype), None if bias is None else bias.to(dtype),
            running_var, buffer_x2, buffer_gz, iters.view(()), float(eps), float(momentum), int(warmup_iters),
            grad_scaler, deferred)
    return y.to(x.dtype)


class MovingAverageBatchNorm2d(_BatchNorm):
    r"""Moving Average Batch Normalization over a 4D input (official ``MABN2d`` semantics).

    See the module docstring for the training forward/backward; in eval

    .. math:: y = \gamma \cdot \frac{x}{\sqrt{\mathrm{running\_var} + \epsilon}} + \beta.

    The layer subclasses ``_BatchNorm`` and is abbreviated ``bn`` so that BN checkpoints load
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) and BN-aware
    tooling recognises it. ``running_mean`` is kept as an all-zero buffer: MABN subtracts no mean,
    and with a zero mean the eval output equals ``nn.BatchNorm2d`` eval with the same
    ``running_var``/``weight``/``bias`` (so a conv+BN fold stays correct). A non-zero
    ``running_mean`` loaded from a BN checkpoint is therefore reset to zero, with a warning.
    ``num_batches_tracked`` counts training steps alongside ``iters``.

    ``momentum`` follows the OFFICIAL convention, the opposite of torch: it weights the OLD value
    (``running_var = momentum * running_var + (1 - momentum) * var``, default 0.98).

    The moving averages need the backward to run once per training forward (the ``buffer_gz`` row
    of a step is written by its backward); a training forward without a backward leaves that row
    stale. An empty input (``N = 0``) is a no-op: no counter step, no buffer change.

    Args:
        num_features (int): number of channels ``C``.
        eps (float): added to the second moment. Default: 1e-5.
        momentum (float): weight of the OLD ``running_var`` in its update, in [0, 1]. Default: 0.98.
        affine (bool): learn the per-channel ``weight``/``bias``. Default: True.
        B (int, keyword-only, required): the per-GPU batch size.
        real_B (int, keyword-only, required): the batch size to emulate; a multiple of ``B``.
            The moving averages run over ``K = real_B // B`` iterations.
        warmup_iters (int, keyword-only): iterations that use the current batch statistics instead
            of the moving averages. Default: 100.

    Shape:
        - Input: ``(N, C, H, W)``.
        - Output: same shape and dtype as the input (statistics in float32 for half inputs).

    Example:
        >>> norm = MovingAverageBatchNorm2d(16, B=2, real_B=32)
        >>> norm(torch.randn(2, 16, 7, 7)).shape
        torch.Size([2, 16, 7, 7])
    """

    _abbr_ = 'bn'

    def __init__(self, num_features, eps=1e-5, momentum=0.98, affine=True, *, B, real_B, warmup_iters=100):
        owner = type(self).__name__
        num_features = check_positive_int('num_features', num_features, owner)
        eps = check_eps(eps, owner)
        momentum = check_unit_interval('momentum', momentum, owner)
        B = check_positive_int('B', B, owner)
        real_B = check_positive_int('real_B', real_B, owner)
        check_divides('B', B, 'real_B', real_B, owner)
        warmup_iters = check_non_negative_int('warmup_iters', warmup_iters, owner)
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        self.B, self.real_B, self.warmup_iters = B, real_B, warmup_iters
        num_rows = real_B // B
        self.register_buffer('iters', torch.zeros((), dtype=torch.long))
        self.register_buffer('buffer_x2', torch.zeros(num_rows, num_features))
        self.register_buffer('buffer_gz', torch.zeros(num_rows, num_features))
        self._grad_scaler = None

    def use_grad_scaler(self, scaler):
        """Train under ``scaler`` (a ``torch.amp.GradScaler``; None: no loss scaling).

        The backward statistic ``E[g·z]`` is averaged over steps: with a loss-scaled ``g`` each row would
        carry its step's scale, and a scale change (growth, or the halving after an overflow) would mix
        them. With the scaler known, rows are stored unscaled. ``cbn_mmdet``'s training entry attaches
        mmengine's ``AmpOptimWrapper`` scaler automatically; in a hand-written loop call this once.
        """
        self._grad_scaler = scaler

    def __getstate__(self):
        # The scaler belongs to the training loop, not to the layer: copies (EMA, deepcopy, pickle) drop it.
        state = self.__dict__.copy()
        state['_grad_scaler'] = None
        return state

    @property
    def buffer_size(self):
        """``K = real_B // B``: the number of iterations the moving averages run over."""
        return self.real_B // self.B

    def reset_running_stats(self):
        super().reset_running_stats()
        # _NormBase.__init__ calls this before our buffers exist.
        if getattr(self, 'iters', None) is not None:
            self.iters.zero_()
            self.buffer_x2.zero_()
            self.buffer_gz.zero_()

    def _check_input_dim(self, input):
        check_input_dim(input, (4,), type(self).__name__)

    def extra_repr(self):
        return f'{super().extra_repr()}, B={self.B}, real_B={self.real_B}, warmup_iters={self.warmup_iters}'

    def forward(self, input):
        self._check_input_dim(input)
        if input.numel() == 0:
            return self._empty_output(input)
        if not self.training:
            return self._eval_forward(input)
        self.iters.add_(1)
        self.num_batches_tracked.add_(1)
        return moving_average_bn(input, self.weight, self.bias, self.running_var, self.buffer_x2, self.buffer_gz,
                                 self.iters, eps=self.eps, momentum=self.momentum, warmup_iters=self.warmup_iters,
                                 grad_scaler=getattr(self, '_grad_scaler', None))

    def _eval_forward(self, input):
        dtype = compute_dtype(input.dtype)
        with autocast_off(input.device.type):
            scale = (self.running_var.to(dtype) + self.eps).rsqrt()
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)
            out = input.to(dtype) * _channel(scale)
            if self.bias is not None:
                out = out + _channel(self.bias.to(dtype))
        return out.to(input.dtype)

    def _empty_output(self, input):
        return empty_batch_output(input, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # MABN never subtracts a mean: keep running_mean at zero (see the class docstring).
        if bool(self.running_mean.any()):
            warnings.warn(f'{type(self).__name__}: the loaded running_mean is non-zero (a BN checkpoint?); '
                          'MABN subtracts no mean, so it is reset to zero', stacklevel=2)
            with torch.no_grad():
                self.running_mean.zero_()
