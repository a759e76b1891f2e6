"""The ``cbn_fullgrad`` rows of the small-batch study: the real CBN layer with ``grad_through_window``;
its weight gradient is the exact gradient of its forward (finite differences, float64), unlike CBN's."""
import pytest
import torch
import torch.nn as nn

from cbn_mmdet.analysis.nets import make_conv_norm
from cbn_mmdet.ops import CrossIterationBatchNorm2d

DT = torch.float64


def _data(iters, seed=5):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 3, 5, 5, generator=gen, dtype=DT) * 2 + 0.5 for _ in range(iters)]
    probes = [torch.randn(2, 4, 5, 5, generator=gen, dtype=DT) for _ in range(iters)]
    return xs, probes


def _pair(full):
    conv, norm = make_conv_norm('cbn_fullgrad' if full else 'cbn', 3, 4, cbn_buffer=3, cbn_burnin=0)
    return conv.to(DT), norm.to(DT)


def test_cbn_fullgrad_is_the_real_layer_with_grad_through_window():
    conv, norm = make_conv_norm('cbn_fullgrad', 3, 4, cbn_buffer=3)
    assert type(norm) is CrossIterationBatchNorm2d and norm.grad_through_window and norm.rho == 1.0
    assert norm.bound_conv is conv
    _, naive = make_conv_norm('naive', 3, 4, cbn_buffer=3)
    assert naive.rho == 0.0 and not naive.grad_through_window


def _loss_after_history(weight_last, history_weights, xs, probe):
    """Replay the window with fixed past weights, then the last forward with ``weight_last``."""
    conv, norm = _pair(full=True)
    for weight, x in zip(history_weights, xs[:-1]):
        with torch.no_grad():
            conv.weight.copy_(weight)
        norm(conv(x.requires_grad_())).sum().backward()     # each step enters the window at its backward
    assert int(norm.window_filled.sum()) == len(history_weights)
    with torch.no_grad():
        conv.weight.copy_(weight_last)
    out = norm(conv(xs[-1].requires_grad_()))
    return (out * probe).sum(), conv.weight


def test_grad_through_window_is_the_exact_gradient_of_the_forward():
    torch.manual_seed(1)
    xs, probes = _data(4)
    history = [torch.randn(4, 3, 3, 3, dtype=DT) * (1 + 0.1 * i) for i in range(3)]
    weight = history[-1] + 0.05 * torch.randn(4, 3, 3, 3, dtype=DT)
    loss, param = _loss_after_history(weight, history, xs, probes[-1])
    grad, = torch.autograd.grad(loss, param)
    for seed in range(3):
        direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
        h = 1e-6
        plus = _loss_after_history(weight + h * direction, history, xs, probes[-1])[0].item()
        minus = _loss_after_history(weight - h * direction, history, xs, probes[-1])[0].item()
        assert (grad * direction).sum().item() == pytest.approx((plus - minus) / (2 * h), rel=1e-5, abs=1e-7)


def test_cbn_gradient_differs_from_exact_gradient_once_the_window_fills():
    """CBN's backward treats the compensated past entries as constants: not the forward's gradient."""
    xs, probes = _data(4)
    grads = {}
    for full in (False, True):
        torch.manual_seed(2)
        conv, norm = _pair(full)
        for x in xs[:-1]:
            norm(conv(x.clone().requires_grad_())).sum().backward()    # a step enters the window at its backward
            with torch.no_grad():
                conv.weight.mul_(1.05)
                conv.weight.grad = None
        out = norm(conv(xs[-1].clone().requires_grad_()))
        (out * probes[-1]).sum().backward()
        grads[full] = (out.detach(), conv.weight.grad)
    torch.testing.assert_close(grads[False][0], grads[True][0])          # same forward
    assert (grads[False][1] - grads[True][1]).abs().max() > 1e-3          # different weight gradient


def test_make_conv_norm_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of"):
        make_conv_norm('cbnn', 3, 4)
    assert isinstance(make_conv_norm('bn', 3, 4)[1], nn.BatchNorm2d)
