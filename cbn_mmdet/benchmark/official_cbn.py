"""CBN computed the way the official layer computes it: the timing reference, not a layer to train with.

The official ``CBatchNorm2d`` (Howal/Cross-iterationBatchNorm) takes the conv weight in its forward and,
per layer and per iteration, obtains ∂μ/∂W and ∂ν/∂W with two ``torch.autograd.grad`` calls (each a full
conv weight-gradient), keeps the window in Python lists (newest first), compensates every entry in a
Python loop, and normalises with autograd through the batch statistics. This module repeats exactly that
algorithm (``shared/reference/algorithms.md``, "Its exact training forward") so that the benchmark can
time it next to ours on the same machine. It is deliberately not registered anywhere.
"""
import torch
import torch.nn as nn

__all__ = ['OfficialAlgorithmCBN']


class OfficialAlgorithmCBN(nn.Module):
    """The official training forward of CBN, for timing. ``forward(x, weight)`` like the official layer.

    Args:
        num_features (int): channels ``C``.
        buffer_num (int): past iterations kept (window ``buffer_num + 1``). Default: 3.
        rho (float): compensation scale. Default: 1.
        burnin (int): plain forwards before the window is used (official per-call counter). Default: 0.
        eps (float): added to the standard deviation (official). Default: 1e-5.
        momentum (float): running-statistics momentum. Default: 0.1.
    """

    def __init__(self, num_features, buffer_num=3, rho=1.0, burnin=0, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features = num_features
        self.buffer_num, self.rho, self.burnin = buffer_num, rho, burnin
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.count = 0
        # The official window: Python lists, newest first (not in state_dict, hence not persistent).
        self.pre_mu, self.pre_meanx2, self.pre_dmudw, self.pre_dmeanx2dw, self.pre_weight = [], [], [], [], []

    def forward(self, x, weight):
        if self.training and self.burnin > 0:
            self.count += 1
        use_window = (self.training and self.buffer_num > 0 and x.requires_grad
                      and (self.burnin == 0 or self.count > self.burnin))
        if not self.training:
            mean, var = self.running_mean, self.running_var
        elif use_window:
            cur_mu = x.mean((0, 2, 3))
            cur_meanx2 = (x * x).mean((0, 2, 3))
            ones = torch.ones_like(cur_mu)
            dmudw = torch.autograd.grad(cur_mu, weight, ones, retain_graph=True)[0]
            dmeanx2dw = torch.autograd.grad(cur_meanx2, weight, ones, retain_graph=True)[0]
            mu_all, meanx2_all = [cur_mu], [cur_meanx2]
            for mu, meanx2, dmu, dmeanx2, w_old in zip(self.pre_mu, self.pre_meanx2, self.pre_dmudw,
                                                     self.pre_dmeanx2dw, self.pre_weight):
                delta = weight.detach() - w_old
                mu_all.append(mu + self.rho * (dmu * delta).sum((1, 2, 3)))
                meanx2_all.append(meanx2 + self.rho * (dmeanx2 * delta).sum((1, 2, 3)))
            mu_all, meanx2_all = torch.stack(mu_all), torch.stack(meanx2_all)
            valid = (meanx2_all - mu_all ** 2 >= 0).to(x.dtype)
            count = valid.sum(0)
            mean = (valid * mu_all).sum(0) / count
            var = (valid * meanx2_all).sum(0) / count - mean ** 2
            self.pre_mu = ([cur_mu.detach()] + self.pre_mu)[:self.buffer_num]
            self.pre_meanx2 = ([cur_meanx2.detach()] + self.pre_meanx2)[:self.buffer_num]
            self.pre_dmudw = ([dmudw.detach()] + self.pre_dmudw)[:self.buffer_num]
            self.pre_dmeanx2dw = ([dmeanx2dw.detach()] + self.pre_dmeanx2dw)[:self.buffer_num]
            self.pre_weight = ([weight.detach().clone()] + self.pre_weight)[:self.buffer_num]
            self._update_running(x)
        else:
            mean, var = x.mean((0, 2, 3)), x.transpose(0, 1).reshape(x.shape[1], -1).var(1)
            self._update_running(x)
        shape = (1, -1, 1, 1)
        y = (x - mean.view(shape)) / (var.sqrt().view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)

    @torch.no_grad()
    def _update_running(self, x):
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
        m = self.momentum
        self.running_mean.mul_(1 - m).add_(m * flat.mean(1))
        self.running_var.mul_(1 - m).add_(m * flat.var(1))
