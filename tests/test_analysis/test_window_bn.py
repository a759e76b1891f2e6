"""WindowBatchNorm2d (the autograd re-implementation) against CrossIterationBatchNorm2d, and its
``grad_through_window`` gradient against finite differences (float64)."""
import pytest
import torch
import torch.nn as nn

from cbn_mmdet.analysis.window_bn import WindowBatchNorm2d
from cbn_mmdet.ops import CrossIterationBatchNorm2d, bind_cbn_to_conv

DT = torch.float64


def _data(iters, seed=5):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 3, 5, 5, generator=gen, dtype=DT) * 2 + 0.5 for _ in range(iters)]
    probes = [torch.randn(2, 4, 5, 5, generator=gen, dtype=DT) for _ in range(iters)]
    return xs, probes


@pytest.mark.parametrize('rho,burnin', [(1.0, 0), (0.0, 0), (1.0, 2)])
def test_matches_cross_iteration_bn(rho, burnin):
    torch.manual_seed(0)
    conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(DT)
    conv_b = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(DT)
    conv_b.load_state_dict(conv_a.state_dict())
    ours = CrossIterationBatchNorm2d(4, buffer_num=3, rho=rho, burnin=burnin).to(DT)
    bind_cbn_to_conv(ours, conv_a)
    ref = WindowBatchNorm2d(4, conv_b, buffer_num=3, rho=rho, burnin=burnin).to(DT)
    xs, probes = _data(8)
    for it, (x, probe) in enumerate(zip(xs, probes)):
        outs, grads = [], []
        for conv, norm in ((conv_a, ours), (conv_b, ref)):
            xin = x.clone().requires_grad_()
            out = norm(conv(xin))
            (out * probe).sum().backward()
            outs.append(out.detach())
            grads.append([xin.grad, conv.weight.grad, norm.weight.grad, norm.bias.grad])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-10, msg=f'output, iter {it}')
        for name, g0, g1 in zip(('input', 'conv weight', 'gamma', 'beta'), *grads):
            torch.testing.assert_close(g0, g1, rtol=1e-8, atol=1e-10, msg=f'{name} grad, iter {it}')
        torch.testing.assert_close(ours.running_var, ref.running_var)
        with torch.no_grad():
            for conv, norm in ((conv_a, ours), (conv_b, ref)):
                for p in (conv.weight, norm.weight, norm.bias):
                    p -= 0.05 * p.grad
                    p.grad = None


def _loss_after_history(weight_last, history_weights, xs, probe):
    """Replay the window with fixed past weights, then the last forward with ``weight_last``."""
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(DT)
    norm = WindowBatchNorm2d(4, conv, buffer_num=3, grad_through_window=True).to(DT)
    for weight, x in zip(history_weights, xs[:-1]):
        with torch.no_grad():
            conv.weight.copy_(weight)
        norm(conv(x))
    conv.weight = nn.Parameter(weight_last.clone())
    out = norm(conv(xs[-1]))
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
    torch.manual_seed(1)
    xs, probes = _data(4)
    grads = {}
    for full in (False, True):
        torch.manual_seed(2)
        conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(DT)
        norm = WindowBatchNorm2d(4, conv, buffer_num=3, grad_through_window=full).to(DT)
        for x in xs[:-1]:
            norm(conv(x))
            with torch.no_grad():
                conv.weight.mul_(1.05)
        out = norm(conv(xs[-1]))
        (out * probes[-1]).sum().backward()
        grads[full] = (out.detach(), conv.weight.grad)
    torch.testing.assert_close(grads[False][0], grads[True][0])          # same forward
    assert (grads[False][1] - grads[True][1]).abs().max() > 1e-3          # different weight gradient


def test_rejects_grouped_or_biased_conv():
    with pytest.raises(ValueError, match='groups=2'):
        WindowBatchNorm2d(4, nn.Conv2d(4, 4, 3, groups=2, bias=False))
    with pytest.raises(ValueError, match='bias=True'):
        WindowBatchNorm2d(4, nn.Conv2d(4, 4, 3))
