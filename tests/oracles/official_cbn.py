"""A literal re-implementation of the official CBatchNorm2d *training* semantics.

Written from the official step list (docs/papers.md, "Official behaviour we match"), deliberately
naive: Python lists for the window (newest first), two ``torch.autograd.grad`` calls per iteration
for dμ/dW and dν/dW, per-entry loops, no guard for an empty window.
It is the oracle our layer must match to float64 precision, and (as :class:`OfficialCBNModule`, in
float32) the "official algorithm" that ``tools/benchmark_norm.py`` and ``tools/benchmark_model.py`` time
next to ours: the benchmark library takes it as an injected factory and never imports this package.
"""
import torch
import torch.nn as nn


class OfficialCBNReference:

    def __init__(self, num_features, eps=1e-5, momentum=0.1, buffer_num=0, rho=1.0, burnin=0,
                 dtype=torch.float64, grad_through_window=False, two_stage=True, frozen=False):
        # grad_through_window: NOT official; the compensation uses the live weight so that autograd
        # differentiates through it (the oracle of our opt-in option of the same name).
        self.grad_through_window = grad_through_window
        self.c = num_features
        self.eps, self.momentum = eps, momentum
        self.buffer_num, self.rho, self.burnin = buffer_num, rho, burnin
        # Official: buffer_num is the live window size, max_buffer_num the configured one; FROZEN
        # normalises with the running statistics and does not update them.
        self.max_buffer_num, self.two_stage, self.frozen = buffer_num, two_stage, frozen
        self.count = 0
        self.entries = []     # [(mu, nu, dmu_dw, dnu_dw, weight)], newest first
        self.running_mean = torch.zeros(num_features, dtype=dtype)
        self.running_var = torch.ones(num_features, dtype=dtype)

    @staticmethod
    def _per_channel(x):
        return x.transpose(0, 1).reshape(x.shape[1], -1)

    def __call__(self, x, weight, gamma, beta):
        if self.burnin > 0:
            self.count += 1
            # official _update_buffer_num (only called when burnin > 0: burnin = 0 keeps the full window)
            if self.two_stage:
                self.buffer_num = self.max_buffer_num if self.count > self.burnin else 0
            else:
                self.buffer_num = int(self.max_buffer_num * min(self.count / self.burnin, 1.0))
        if self.frozen:
            shape = (1, -1, 1, 1)
            x_hat = (x - self.running_mean.view(shape)) / (self.running_var.sqrt().view(shape) + self.eps)
            return x_hat * gamma.view(shape) + beta.view(shape)
        use_window = self.buffer_num > 0 and x.requires_grad
        flat = self._per_channel(x)
        cur_mean = flat.mean(1)
        cur_unbiased_var = flat.var(1)          # Tensor.var: unbiased by default
        if use_window:
            mu = flat.mean(1)
            nu = (flat * flat).mean(1)
            ones = torch.ones_like(mu)
            dmu = torch.autograd.grad(mu, weight, ones, retain_graph=True)[0]
            dnu = torch.autograd.grad(nu, weight, ones, retain_graph=True)[0]
            mus, nus = [mu], [nu]
            w_now = weight if self.grad_through_window else weight.detach()
            for (p_mu, p_nu, p_dmu, p_dnu, p_w) in self.entries:
                delta = w_now - p_w
                mus.append(p_mu + self.rho * (delta * p_dmu).sum(dim=(1, 2, 3)))
                nus.append(p_nu + self.rho * (delta * p_dnu).sum(dim=(1, 2, 3)))
            mus, nus = torch.stack(mus), torch.stack(nus)
            valid = (nus - mus ** 2 >= 0).to(x.dtype)
            n = valid.sum(0)
            mean = (valid * mus).sum(0) / n
            var = (valid * nus).sum(0) / n - mean ** 2
            self.entries.insert(0, (mu.detach(), nu.detach(), dmu.detach(), dnu.detach(), w_now.detach().clone()))
            self.entries = self.entries[:self.buffer_num]
        else:
            mean, var = cur_mean, cur_unbiased_var
        m = self.momentum
        self.running_mean = (1 - m) * self.running_mean + m * cur_mean.detach()
        self.running_var = (1 - m) * self.running_var + m * cur_unbiased_var.detach()
        shape = (1, -1, 1, 1)
        x_hat = (x - mean.view(shape)) / (var.sqrt().view(shape) + self.eps)
        return x_hat * gamma.view(shape) + beta.view(shape)


class OfficialCBNModule(nn.Module):
    """:class:`OfficialCBNReference` as a module with its own affine parameters, called like the official
    layer: ``forward(x, conv_weight)``. Training forward only (the benchmarks train); the eval forward is
    the official one, ``(x - running_mean) / (sqrt(running_var) + eps)``.

    Args:
        num_features (int): channels ``C``.
        buffer_num (int): past iterations kept. Default: 3.
        dtype (torch.dtype): of the running statistics. Default: float32.
        **kwargs: ``eps``, ``momentum``, ``rho``, ``burnin``, ... of :class:`OfficialCBNReference`.
    """

    def __init__(self, num_features, buffer_num=3, dtype=torch.float32, **kwargs):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, dtype=dtype))
        self.reference = OfficialCBNReference(num_features, buffer_num=buffer_num, dtype=dtype, **kwargs)

    def state_tensors(self):
        """The tensors the layer keeps between steps: running statistics and the Python-list window."""
        ref = self.reference
        return [ref.running_mean, ref.running_var] + [t for entry in ref.entries for t in entry]

    def forward(self, x, weight):
        ref = self.reference
        if not self.training:
            shape = (1, -1, 1, 1)
            x_hat = (x - ref.running_mean.view(shape)) / (ref.running_var.sqrt().view(shape) + ref.eps)
            return x_hat * self.weight.view(shape) + self.bias.view(shape)
        return ref(x, weight, self.weight, self.bias)
