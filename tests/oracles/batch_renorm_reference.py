"""Slow reference of Batch Renormalization written from the paper's equations (Ioffe 2017, Algorithm 1).

float64, one channel at a time, the clipping limits computed in plain Python from a Python counter,
``r`` and ``d`` detached (``stop_gradient`` in the paper) so that autograd through the reference gives
the paper's backward. The running variance follows the layer's documented choice (torch's unbiased
variance, lerped with the weight ``momentum`` of the new value); everything else is Algorithm 1.
"""
import math

import torch

__all__ = ['ReferenceBRN']


class ReferenceBRN:
    """Plain-Python state: ``running_mean``/``running_var`` lists, the step counter ``t``."""

    def __init__(self, channels, eps, momentum, r_max, d_max, warmup_iters, r_ramp_iters, d_ramp_iters):
        self.channels, self.eps, self.momentum = channels, eps, momentum
        self.r_final, self.d_final = r_max, d_max
        self.warmup, self.r_ramp, self.d_ramp = warmup_iters, r_ramp_iters, d_ramp_iters
        self.running_mean = [0.0] * channels
        self.running_var = [1.0] * channels
        self.t = 0
        self.clipped_r = []   # per step: was r clipped in any channel
        self.clipped_d = []

    def limits(self, t):
        """Piecewise-linear schedule: 1 / 0 up to the warm-up, the final values after the ramps."""
        if t <= self.warmup:
            return 1.0, 0.0
        r_max = self.r_final if t >= self.warmup + self.r_ramp else \
            1.0 + (self.r_final - 1.0) * (t - self.warmup) / self.r_ramp
        d_max = self.d_final if t >= self.warmup + self.d_ramp else self.d_final * (t - self.warmup) / self.d_ramp
        return r_max, d_max

    def train_step(self, x, gamma, beta):
        """``x`` (N, C, H, W) float64 with grad; ``gamma``/``beta`` (C,) float64 leaves (or None)."""
        self.t += 1
        r_max, d_max = self.limits(self.t)
        outs, any_r, any_d = [], False, False
        for c in range(self.channels):
            xc = x[:, c]
            n = xc.numel()
            mu = xc.sum() / n
            var = ((xc - mu) ** 2).sum() / n
            sigma_b = torch.sqrt(var + self.eps)
            sigma = math.sqrt(self.running_var[c] + self.eps)
            r_raw = float(sigma_b.detach()) / sigma
            d_raw = (float(mu.detach()) - self.running_mean[c]) / sigma
            r = min(max(r_raw, 1.0 / r_max), r_max)
            d = min(max(d_raw, -d_max), d_max)
            any_r |= r != r_raw
            any_d |= d != d_raw
            x_hat = (xc - mu) / sigma_b * r + d
            yc = x_hat
            if gamma is not None:
                yc = gamma[c] * x_hat + beta[c]
            outs.append(yc)
            unbiased = float(var.detach()) * n / (n - 1)
            self.running_mean[c] += self.momentum * (float(mu.detach()) - self.running_mean[c])
            self.running_var[c] += self.momentum * (unbiased - self.running_var[c])
        self.clipped_r.append(any_r)
        self.clipped_d.append(any_d)
        return torch.stack(outs, dim=1)

    def eval_forward(self, x, gamma, beta):
        outs = []
        for c in range(self.channels):
            yc = (x[:, c] - self.running_mean[c]) / math.sqrt(self.running_var[c] + self.eps)
            outs.append(yc if gamma is None else gamma[c] * yc + beta[c])
        return torch.stack(outs, dim=1)
