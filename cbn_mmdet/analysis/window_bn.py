"""A plain-autograd re-implementation of CBN's training forward, for diagnostics.

:class:`WindowBatchNorm2d` computes what ``CrossIterationBatchNorm2d`` computes (official semantics:
plain path with the unbiased variance during burn-in, window path with compensated past entries,
invalid entries dropped, ``eps`` added to the standard deviation, running statistics from the current
batch), but with ordinary torch ops and the window in a Python deque. The tests check that, with
``grad_through_window=False``, its outputs and every gradient equal the real layer's.

Its one extra switch is the point of having it: ``grad_through_window=True`` lets the gradient flow
through the Taylor compensation of the past entries, ``∂μ_τ(W_t)/∂W_t = ρ·∂μ_τ/∂W`` (and the same for
ν), which CBN (official and ours) treats as constants. With the compensation the window statistics
*do* move with ``W_t`` in the forward; the official backward ignores that. ``docs/fidelity.md`` uses
this switch to test whether that mismatch explains CBN's trouble at batch size 1.

Not a production layer: single process, ``groups=1`` bias-free convs only, nothing checkpointed.
"""
import collections

import torch
import torch.nn as nn

from ..ops import mean_input_patch, second_moment_weight_grad

__all__ = ['WindowBatchNorm2d']


class WindowBatchNorm2d(nn.Module):
    """CBN's training forward in autograd ops (see the module docstring).

    Args:
        num_features (int): channels ``C``.
        conv (nn.Conv2d): the conv producing this layer's input (a forward pre-hook records its input).
        buffer_num (int): past iterations kept. Default: 3.
        rho (float): compensation scale (0: naive averaging). Default: 1.
        burnin (int): plain training forwards before the window is used. Default: 0.
        eps (float): added to the standard deviation. Default: 1e-5.
        momentum (float): running-statistics momentum (torch convention). Default: 0.1.
        grad_through_window (bool): differentiate the compensated past entries w.r.t. the conv weight.
            Default: False (CBN's gradient).
    """

    def __init__(self, num_features, conv, *, buffer_num=3, rho=1.0, burnin=0, eps=1e-5, momentum=0.1,
                 grad_through_window=False):
        super().__init__()
        if conv.groups != 1 or conv.bias is not None:
            raise ValueError('WindowBatchNorm2d: needs a bias-free conv with groups=1, got '
                             f'groups={conv.groups}, bias={conv.bias is not None}')
        self.num_features = num_features
        self.buffer_num, self.rho, self.burnin = buffer_num, float(rho), burnin
        self.eps, self.momentum = eps, momentum
        self.grad_through_window = bool(grad_through_window)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.window = collections.deque(maxlen=max(buffer_num, 1))
        self.count = 0
        self._conv = (conv,)   # a tuple: not registered as a submodule
        self._conv_input = None
        conv.register_forward_pre_hook(self._capture)

    def _capture(self, conv, args):
        if self.training:
            self._conv_input = args[0]

    def _affine(self, x, mean, std):
        scale = self.weight / (std + self.eps)
        return x * scale.view(1, -1, 1, 1) + (self.bias - mean * scale).view(1, -1, 1, 1)

    def forward(self, y):
        if not self.training:
            return self._affine(y, self.running_mean, self.running_var.sqrt())
        self.count += 1
        conv_input, self._conv_input = self._conv_input, None
        m = y.shape[0] * y.shape[2] * y.shape[3]
        mean_t = y.mean((0, 2, 3))
        sq_t = (y * y).mean((0, 2, 3))
        var_t = sq_t - mean_t * mean_t
        with torch.no_grad():
            unbiased = var_t * m / (m - 1)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean_t)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
        if self.buffer_num == 0 or (self.burnin > 0 and self.count <= self.burnin):
            return self._affine(y, mean_t, (var_t * m / (m - 1)).clamp_min(0).sqrt())
        conv = self._conv[0]
        weight_t = conv.weight if self.grad_through_window else conv.weight.detach()
        means, sqs = [mean_t], [sq_t]
        for entry in self.window:
            delta = (weight_t - entry['weight']).flatten(1)
            means.append(entry['mean'] + self.rho * (delta @ entry['mean_grad']))
            sqs.append(entry['sq'] + self.rho * (delta * entry['sq_grad'].flatten(1)).sum(1))
        means, sqs = torch.stack(means), torch.stack(sqs)
        with torch.no_grad():
            keep = (sqs - means * means >= 0).to(y.dtype)
            none = keep.sum(0) == 0
            keep[0] = torch.where(none, torch.ones_like(keep[0]), keep[0])
            kept = keep.sum(0)
        mean = (keep * means).sum(0) / kept
        var = ((keep * sqs).sum(0) / kept - mean * mean).clamp_min(0)
        with torch.no_grad():
            x = conv_input.to(y.dtype)
            self.window.appendleft(dict(
                weight=conv.weight.detach().clone(), mean=mean_t.detach(), sq=sq_t.detach(),
                mean_grad=mean_input_patch(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation).flatten(),
                sq_grad=second_moment_weight_grad(x, y.detach(), conv.weight.shape, conv.stride, conv.padding,
                                                  conv.dilation)))
        return self._affine(y, mean, var.sqrt())
