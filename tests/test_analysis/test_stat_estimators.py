"""What one iteration leaves in a CBN window, its Taylor step and the error metrics of
cbn_mmdet.analysis against hand-computed values and autograd (float64). The window estimates
themselves come from the real layer: ``test_cbn_probe.py``."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cbn_mmdet.analysis.stat_estimators import compensate, exact_entry, mean_error, record_entry, var_error

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
