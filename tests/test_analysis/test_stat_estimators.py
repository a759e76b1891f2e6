"""The window estimators and error metrics of cbn_mmdet.analysis against hand-computed values,
autograd, and the real CrossIterationBatchNorm2d (float64)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cbn_mmdet.analysis.stat_estimators import (compensate, exact_entry, mean_error, record_entry, var_error,
                                                window_estimate)
from cbn_mmdet.ops import CrossIterationBatchNorm2d, bind_cbn_to_conv

DT = torch.float64


def _conv(cin=3, cout=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(kernel_size=3, padding=1, bias=False)
    args.update(kwargs)
    return nn.Conv2d(cin, cout, **args).to(DT)


def test_error_metrics_hand_computed():
    mean_true = torch.tensor([0.0, 1.0], dtype=DT)
    var_true = torch.tensor([4.0, 1.0], dtype=DT)
    # |1 - 0| / 2 = 0.5 and |1.5 - 1| / 1 = 0.5
    assert mean_error(torch.tensor([1.0, 1.5], dtype=DT), mean_true, var_true) == pytest.approx(0.5)
    # |5 - 4| / 4 = 0.25 and |0.5 - 1| / 1 = 0.5
    assert var_error(torch.tensor([5.0, 0.5], dtype=DT), var_true) == pytest.approx(0.375)
    assert mean_error(mean_true, mean_true, var_true) == 0.0
    assert var_error(var_true, var_true) == 0.0


@pytest.mark.parametrize('stride,padding', [(1, 1), (2, 0), (2, 1)])
def test_record_entry_gradients_match_autograd(stride, padding):
    conv = _conv(stride=stride, padding=padding)
    x = torch.randn(2, 3, 7, 7, dtype=DT)
    entry = record_entry(conv, x)
    weight = conv.weight.detach().clone().requires_grad_()
    y = F.conv2d(x, weight, None, stride, padding)
    mean_grad, = torch.autograd.grad(y.mean((0, 2, 3)).sum(), weight, retain_graph=True)
    sq_grad, = torch.autograd.grad((y * y).mean((0, 2, 3)).sum(), weight)
    for c in range(conv.out_channels):   # dμ_c/dW_c: the same mean patch for every channel
        torch.testing.assert_close(mean_grad[c].flatten(), entry.mean_grad)
    torch.testing.assert_close(sq_grad, entry.sq_grad)
    torch.testing.assert_close(entry.mean, y.mean((0, 2, 3)).detach())
    torch.testing.assert_close(entry.sq, (y * y).mean((0, 2, 3)).detach())


@pytest.mark.parametrize('rho_mean,rho_sq', [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0)])
def test_unchanged_weights_give_concatenated_batch_statistics(rho_mean, rho_sq):
    conv = _conv()
    batches = [torch.randn(2, 3, 5, 5, dtype=DT) + i for i in range(4)]
    entries = [record_entry(conv, x) for x in batches]
    mean, var = window_estimate(entries[-1], entries[:-1][::-1], rho_mean=rho_mean, rho_sq=rho_sq)
    y = conv(torch.cat(batches)).detach()
    var_ref, mean_ref = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)


def test_window_of_one_is_batch_norm():
    conv = _conv()
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    mean, var = window_estimate(record_entry(conv, x), [])
    var_ref, mean_ref = torch.var_mean(conv(x).detach(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)


def test_mean_compensation_is_exact_in_own_weight_second_moment_first_order():
    conv = _conv()
    x = torch.randn(3, 3, 6, 6, dtype=DT)
    entry = record_entry(conv, x)
    direction = torch.randn_like(conv.weight)
    residuals = []
    for step in (1e-1, 1e-2):
        weight_t = conv.weight.detach() + step * direction
        mean_exact, sq_exact = exact_entry(conv, x, weight_t)
        mean_comp, sq_comp = compensate(entry, weight_t)
        torch.testing.assert_close(mean_comp, mean_exact)      # μ is linear in W: the Taylor step is exact
        residuals.append(sq_exact - sq_comp)
    # ν is quadratic in W: the first-order step leaves exactly the quadratic term h²·DᵀE[pp^T]D >= 0
    assert (residuals[0] > 0).all()
    torch.testing.assert_close(residuals[1], 1e-2 * residuals[0], rtol=1e-6, atol=1e-12)


def _recover_used_statistics(y, out, eps):
    """(μ̄, σ̄²) a CBN layer with γ=1, β=0 used: out = (y − μ̄) / (σ̄ + eps), per channel a line."""
    yc = y - y.mean((0, 2, 3), keepdim=True)
    oc = out - out.mean((0, 2, 3), keepdim=True)
    slope = (yc * oc).sum((0, 2, 3)) / (yc * yc).sum((0, 2, 3))
    intercept = out.mean((0, 2, 3)) - slope * y.mean((0, 2, 3))
    std = 1.0 / slope - eps
    return -intercept / slope, std * std


@pytest.mark.parametrize('rho', [0.0, 1.0])
def test_estimators_match_cross_iteration_bn(rho):
    """Our torch-op estimate equals what the real layer normalises with, iteration after iteration."""
    conv = _conv(cin=3, cout=5)
    buffer_num = 3
    cbn = CrossIterationBatchNorm2d(5, buffer_num=buffer_num, rho=rho, burnin=0).to(DT)
    bind_cbn_to_conv(cbn, conv)
    gen = torch.Generator().manual_seed(3)
    entries = []
    for it in range(7):
        x = torch.randn(2, 3, 6, 6, generator=gen, dtype=DT) * 1.5 + 0.3
        y = conv(x)
        out = cbn(y)
        entries.insert(0, record_entry(conv, x))
        used_mean, used_var = _recover_used_statistics(y.detach(), out.detach(), cbn.eps)
        mean, var = window_estimate(entries[0], entries[1:buffer_num + 1], rho_mean=rho, rho_sq=rho)
        torch.testing.assert_close(used_mean, mean, rtol=1e-8, atol=1e-9, msg=f'mean, iteration {it}')
        torch.testing.assert_close(used_var, var, rtol=1e-7, atol=1e-9, msg=f'var, iteration {it}')
        with torch.no_grad():   # a training step's worth of weight change
            conv.weight.mul_(1 + 0.1 * torch.randn(conv.weight.shape, generator=gen, dtype=DT))
    assert int(cbn.num_fallbacks) == 0
