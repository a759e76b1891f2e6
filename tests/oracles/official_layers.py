"""The authors' layers as their released code defines them, written from their behaviour (docs/papers.md,
docs/reproduce_coco.md), with the released parameter names and shapes, so that a synthetic checkpoint of
exactly the released layout loads into them strictly. They are the oracles of the converter tests: a
converted layer of ours must compute what these compute from the original state.

Only what the converter tests need is defined: every layer's eval forward (the WS conv has no state
beyond its weight, so its forward is the same in both modes).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialWSConv2d(nn.Conv2d):
    """BCN authors' WS conv: ``(W − mean) / sqrt(var_unbiased + 1e-5)`` per output channel, then conv."""

    def forward(self, x):
        weight = self.weight
        flat = weight.reshape(weight.size(0), -1)
        centred = flat - flat.mean(dim=1, keepdim=True)
        std = torch.sqrt(centred.var(dim=1) + 1e-5)    # unbiased variance, eps INSIDE the root
        weight = (centred / std[:, None]).reshape_as(weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class OfficialBCN(nn.Module):
    """BCN authors' classification BCN: an affine BN (``pbn``, its own running statistics), then a
    normalisation over ``num_groups`` groups per sample without affine (biased variance, same eps),
    then a per-GROUP affine of shape ``(1, G, 1)``."""

    _abbr_ = 'bn'

    def __init__(self, num_features, eps=1e-5, num_groups=32, **unused):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.pbn = nn.BatchNorm2d(num_features, eps=eps)
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1))

    def forward(self, x):
        out = self.pbn(x)
        n = x.size(0)
        grouped = out.reshape(n, self.num_groups, -1)
        mean = grouped.mean(dim=2, keepdim=True)
        var = grouped.var(dim=2, unbiased=False, keepdim=True)
        grouped = (grouped - mean) / torch.sqrt(var + self.eps)
        return (grouped * self.weight + self.bias).reshape_as(x)


class OfficialMABN2d(nn.Module):
    """Official MABN2d's state layout and eval forward ``γ·x / sqrt(running_var + eps) + β`` (no mean).

    Parameters and ``running_var`` are ``(1, C, 1, 1)``; ``buffer_x2``/``buffer_gz`` hold ``real_B / B``
    rows; ``iters`` is a one-element counter; there is no ``running_mean``."""

    def __init__(self, channels, B=2, real_B=32, eps=1e-5, momentum=0.98, warmup_iters=100):
        super().__init__()
        self.eps = eps
        rows = real_B // B
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer('running_var', torch.ones(1, channels, 1, 1))
        self.register_buffer('iters', torch.zeros(1, dtype=torch.long))
        self.register_buffer('buffer_x2', torch.zeros(rows, channels))
        self.register_buffer('buffer_gz', torch.zeros(rows, channels))

    def forward(self, x):
        assert not self.training, 'oracle of the eval forward only'
        return self.weight * x / torch.sqrt(self.running_var + self.eps) + self.bias


def official_cbn_eval(x, weight, bias, running_mean, running_var, eps=1e-5):
    """Official CBatchNorm2d in eval: ``γ·(x − running_mean) / (sqrt(running_var) + eps) + β``."""
    shape = (1, -1, 1, 1)
    return (weight.view(shape) * (x - running_mean.view(shape)) / (running_var.sqrt().view(shape) + eps)
            + bias.view(shape))
