"""CBN's opt-in fast mode (``stat_grad_sample``): ∂ν/∂W estimated from a strided subset of output positions."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cbn_mmdet.ops.cbn_binding import bind_cbn_to_conv
from cbn_mmdet.ops.cbn_stat_grads import sampled_second_moment_weight_grad, second_moment_weight_grad
from cbn_mmdet.ops.cross_iter_bn import CrossIterationBatchNorm2d

DT = torch.float64


def _bound(sample, cin=3, cout=4, k=3, padding=1, seed=0, **kwargs):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False).to(DT)
    cbn = CrossIterationBatchNorm2d(cout, buffer_num=3, stat_grad_sample=sample, **kwargs).to(DT)
    bind_cbn_to_conv(cbn, conv)
    return conv, cbn


def _train(conv, cbn, steps=6, seed=1, n=2, hw=8):
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(steps):
        x = torch.randn(n, conv.in_channels, hw, hw, generator=gen, dtype=DT).requires_grad_()
        out = cbn(conv(x))
        (out * torch.randn(out.shape, generator=gen, dtype=DT)).sum().backward()
        with torch.no_grad():
            conv.weight -= 0.1 * conv.weight.grad
            conv.weight.grad = None
        outs.append(out.detach())
    return outs


def _grid(size_out, size_in, k, s, p, d, r, a):
    """Sampled output indices along one dimension, from the definition in the docstring: o = a + i·r whose
    receptive field needs no more bottom padding than p − a·s; an empty grid falls back to a = 0."""
    for phase in (a, 0):
        pad = max(p - phase * s, 0)
        rows = [o for o in range(phase, size_out, r) if o * s - p + (k - 1) * d <= size_in - 1 + pad]
        if rows:
            return rows
    return []


def _brute_force(x, y, weight_shape, stride, padding, dilation, groups, step, phase):
    """2·mean over the sampled output positions of y_c · x_patch, by unfold (the definition)."""
    n, cout, ho, wo = y.shape
    kh, kw = weight_shape[2:]
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)   # (N, Cin·kh·kw, Ho·Wo)
    mask = torch.zeros(ho, wo, dtype=torch.bool)
    rows = _grid(ho, x.shape[2], kh, stride, padding, dilation, step[0], phase[0])
    columns = _grid(wo, x.shape[3], kw, stride, padding, dilation, step[1], phase[1])
    mask[torch.tensor(rows).view(-1, 1), torch.tensor(columns).view(1, -1)] = True
    cols, ys = cols[..., mask.flatten()], y.flatten(2)[..., mask.flatten()]
    m = n * ys.shape[-1]
    cin_g, cout_g = x.shape[1] // groups, cout // groups
    out = []
    for g in range(groups):
        c = cols.view(n, x.shape[1], kh * kw, -1)[:, g * cin_g:(g + 1) * cin_g].reshape(n, cin_g * kh * kw, -1)
        out.append(2.0 * torch.einsum('nop,nkp->ok', ys[:, g * cout_g:(g + 1) * cout_g], c) / m)
    return torch.cat(out).view(weight_shape)


def test_default_mode_unchanged():
    conv_a, cbn_a = _bound(None)
    conv_b, cbn_b = copy.deepcopy(conv_a), CrossIterationBatchNorm2d(4, buffer_num=3).to(DT)
    cbn_b.load_state_dict(cbn_a.state_dict())
    bind_cbn_to_conv(cbn_b, conv_b)
    conv_c, cbn_c = _bound(1.0)          # round(1/1) = 1: the exact gradient
    assert cbn_a.stat_grad_sample is None and 'stat_grad_sample' not in repr(cbn_a)
    for out_a, out_b, out_c in zip(_train(conv_a, cbn_a), _train(conv_b, cbn_b), _train(conv_c, cbn_c)):
        assert torch.equal(out_a, out_b) and torch.equal(out_a, out_c)
    assert torch.equal(cbn_a.window_sq_grad, cbn_c.window_sq_grad)


@pytest.mark.parametrize('geometry', [
    dict(k=3, stride=1, padding=1, dilation=1, groups=1), dict(k=1, stride=1, padding=0, dilation=1, groups=1),
    dict(k=3, stride=2, padding=1, dilation=1, groups=1), dict(k=3, stride=1, padding=2, dilation=2, groups=1),
    dict(k=3, stride=1, padding=1, dilation=1, groups=2), dict(k=1, stride=2, padding=0, dilation=1, groups=1),
    dict(k=5, stride=1, padding=1, dilation=1, groups=1)])
@pytest.mark.parametrize('step,phase', [((2, 2), (0, 0)), ((2, 2), (1, 1)), ((1, 3), (0, 2)), ((2, 5), (1, 3)),
                                        ((3, 3), (2, 2))])
def test_sampled_gradient_is_the_mean_over_the_sampled_positions(geometry, step, phase):
    torch.manual_seed(0)
    k, stride, padding, dilation, groups = (geometry[key] for key in ('k', 'stride', 'padding', 'dilation', 'groups'))
    x = torch.randn(2, 4, 11, 10, dtype=DT)
    weight = torch.randn(6, 4 // groups, k, k, dtype=DT)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    got = sampled_second_moment_weight_grad(x, y, weight.shape, stride, padding, dilation, groups, step, phase)
    want = _brute_force(x, y, weight.shape, stride, padding, dilation, groups, step, phase)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_phases_average_to_the_exact_gradient():
    """Where every phase samples equally many positions (1x1, no padding, even sizes), cycling through
    the phases averages to the exact gradient."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 6, dtype=DT)
    weight = torch.randn(5, 3, 1, 1, dtype=DT)
    y = F.conv2d(x, weight)
    exact = second_moment_weight_grad(x, y, weight.shape)
    phases = [(a, b) for a in range(2) for b in range(2)]
    mean = sum(sampled_second_moment_weight_grad(x, y, weight.shape, step=(2, 2), phase=p)
               for p in phases) / len(phases)
    torch.testing.assert_close(mean, exact, rtol=1e-10, atol=1e-12)


def test_sampled_estimate_is_close_on_smooth_inputs():
    torch.manual_seed(0)
    # spatially smooth input: low-resolution noise, bilinearly upsampled
    x = F.interpolate(torch.randn(2, 16, 8, 8, dtype=DT), size=(48, 48), mode='bilinear', align_corners=False)
    weight = torch.randn(16, 16, 3, 3, dtype=DT) / 12
    y = F.conv2d(x, weight, padding=1)
    exact = second_moment_weight_grad(x, y, weight.shape, 1, 1)
    white = torch.randn_like(x)
    exact_white = second_moment_weight_grad(white, F.conv2d(white, weight, padding=1), weight.shape, 1, 1)
    for phase in ((0, 0), (1, 0), (1, 1)):
        est = sampled_second_moment_weight_grad(x, y, weight.shape, 1, 1, step=(2, 2), phase=phase)
        error = (est - exact).norm() / exact.norm()       # ~0.045 here
        est_white = sampled_second_moment_weight_grad(white, F.conv2d(white, weight, padding=1), weight.shape,
                                                      1, 1, step=(2, 2), phase=phase)
        error_white = (est_white - exact_white).norm() / exact_white.norm()     # ~0.3: noise has no structure
        assert error < 0.1 and error < error_white / 3


def test_layer_fast_mode_close_to_exact_on_the_same_trajectory():
    conv, cbn_e = _bound(None)
    cbn_f = CrossIterationBatchNorm2d(4, buffer_num=3, stat_grad_sample=0.25).to(DT)
    cbn_f.load_state_dict(cbn_e.state_dict())
    bind_cbn_to_conv(cbn_f, conv)          # both layers see the same conv, inputs and weights
    assert cbn_f._sample_step == (2, 2) and 'stat_grad_sample=0.25' in repr(cbn_f)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = F.interpolate(torch.randn(2, 3, 6, 6, generator=gen, dtype=DT), size=(12, 12), mode='bilinear',
                          align_corners=False).requires_grad_()
        y = conv(x)
        out_e, out_f = cbn_e(y), cbn_f(y)
        # exact drives SGD; the fast layer's backward runs too (with a zero gradient): a training step
        # enters a CBN's state at its backward
        ((out_e * torch.randn(out_e.shape, generator=gen, dtype=DT)).sum() + 0 * out_f.sum()).backward()
        with torch.no_grad():   # a step of 1% of |W|, so that the Taylor compensation is meaningful
            conv.weight -= 0.01 * conv.weight.norm() * conv.weight.grad / conv.weight.grad.norm()
            conv.weight.grad = None
        assert torch.isfinite(out_f).all()
        torch.testing.assert_close(out_f, out_e, rtol=0.03, atol=0.03)   # max |diff| here ~0.01
    assert int(cbn_f.window_filled.sum()) == 3
    # the current statistics and dμ/dW are exact; only the stored dν/dW is an estimate
    torch.testing.assert_close(cbn_f.window_mean_grad, cbn_e.window_mean_grad)
    torch.testing.assert_close(cbn_f.window_sq, cbn_e.window_sq)
    assert not torch.equal(cbn_f.window_sq_grad, cbn_e.window_sq_grad)
    assert not torch.equal(out_f, out_e)


def test_sample_grid_is_clamped_to_small_maps():
    conv, cbn = _bound(0.1, k=1, padding=0)          # round(1/0.1) = 10 -> a 2 x 5 grid
    assert cbn._sample_step == (2, 5)
    _train(conv, cbn, hw=3, steps=5)                 # 3x3 maps: grid clamped to 2 x 3
    assert torch.isfinite(cbn.window_sq_grad).all() and int(cbn.window_filled.sum()) == 3


@pytest.mark.parametrize('value,error', [(0, ValueError), (0.0, ValueError), (-0.25, ValueError),
                                         (1.5, ValueError), (float('nan'), ValueError), (float('inf'), ValueError),
                                         ('0.25', TypeError), (True, TypeError)])
def test_bad_values_raise(value, error):
    with pytest.raises(error, match=r'stat_grad_sample must be None or a float in \(0, 1\], got'):
        CrossIterationBatchNorm2d(4, buffer_num=2, stat_grad_sample=value)
