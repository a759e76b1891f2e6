"""CBN computed the way the official layer computes it: the timing reference, not a layer to train with.

The official ``CBatchNorm2d`` (Howal/Cross-iterationBatchNorm) takes the conv weight in its forward and,
per layer and per iteration, obtains ∂μ/∂W and ∂ν/∂W with two ``torch.autograd.grad`` calls (each a full
conv weight-gradient), keeps the window in Python lists (newest first), compensates every entry with
broadcasted products over the whole weight, and normalises through autograd in a ``(C, N·H·W)`` layout
(a transposed copy of the input, transposed back at the end). This module repeats that sequence of
operations (its semantics: docs/papers.md, "Official behaviour we match") so that the
benchmark times the official *implementation* of the algorithm next to ours on the same machine. It is
deliberately not registered anywhere.
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
        c = x.shape[1]
        flat = x.transpose(0, 1)
        shape_t = flat.shape
        flat = flat.contiguous().view(c, -1)                 # (C, N·H·W), a copy (official layout)
        if self.training and self.burnin > 0:
            self.count += 1
        use_window = (self.training and self.buffer_num > 0 and x.requires_grad
                      and (self.burnin == 0 or self.count > self.burnin))
        if use_window:
            cur_mu = flat.mean(dim=1)
            cur_meanx2 = torch.pow(flat, 2).mean(dim=1)
            cur_var = flat.var(dim=1)                        # unbiased: the running statistics
            ones = torch.ones_like(cur_mu)
            dmudw = torch.autograd.grad(cur_mu, weight, ones, retain_graph=True)[0]
            dmeanx2dw = torch.autograd.grad(cur_meanx2, weight, ones, retain_graph=True)[0]
            w_now = weight.detach()
            mu_all = torch.stack([cur_mu] + [
                mu + (self.rho * d * (w_now - w_old)).sum(1).sum(1).sum(1)
                for mu, d, w_old in zip(self.pre_mu, self.pre_dmudw, self.pre_weight)])
            meanx2_all = torch.stack([cur_meanx2] + [
                meanx2 + (self.rho * d * (w_now - w_old)).sum(1).sum(1).sum(1)
                for meanx2, d, w_old in zip(self.pre_meanx2, self.pre_dmeanx2dw, self.pre_weight)])
            var_all = meanx2_all - torch.pow(mu_all, 2)
            kept_mu, kept_meanx2 = mu_all.clone(), meanx2_all.clone()
            kept_mu[var_all < 0] = 0
            kept_meanx2[var_all < 0] = 0
            count = (var_all >= 0).sum(dim=0).float()
            mean = kept_mu.sum(dim=0) / count
            var = kept_meanx2.sum(dim=0) / count - torch.pow(mean, 2)
            keep = self.buffer_num - 1
            self.pre_mu = [cur_mu.detach()] + self.pre_mu[:keep]
            self.pre_meanx2 = [cur_meanx2.detach()] + self.pre_meanx2[:keep]
            self.pre_dmudw = [dmudw.detach()] + self.pre_dmudw[:keep]
            self.pre_dmeanx2dw = [dmeanx2dw.detach()] + self.pre_dmeanx2dw[:keep]
            self.pre_weight = [w_now.clone()] + self.pre_weight[:keep]
        else:
            mean = cur_mu = flat.mean(dim=1)
            var = cur_var = flat.var(dim=1)
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * cur_mu.detach())
                self.running_var.mul_(1 - m).add_(m * cur_var.detach())
        out = flat - mean.view(-1, 1)
        out = out / (var.view(-1, 1) ** 0.5 + self.eps)
        out = self.weight.view(-1, 1) * out + self.bias.view(-1, 1)
        return out.view(shape_t).transpose(0, 1)
