"""Closed-form dμ/dW and dν/dW against torch.autograd on the conv itself (float64)."""
import pytest
import torch
import torch.nn.functional as F

from cbn_mmdet.ops.cbn_stat_grads import mean_input_patch, second_moment_weight_grad

GEOMETRIES = [  # kernel, stride, padding, dilation, groups
    (3, 1, 1, 1, 1), (1, 1, 0, 1, 1), (3, 2, 1, 1, 1), (3, 1, 2, 2, 1), (3, 2, 1, 1, 2), (7, 2, 3, 1, 1),
    ((3, 1), (2, 1), (1, 0), 1, 1), (1, 2, 0, 1, 1), (3, 1, 0, 1, 4),
]


@pytest.mark.parametrize('k,s,p,d,g', GEOMETRIES)
def test_against_autograd(k, s, p, d, g):
    torch.manual_seed(0)
    cin, cout = 4, 8
    kernel = (k, k) if isinstance(k, int) else k
    x = torch.randn(3, cin, 9, 10, dtype=torch.float64) + 0.3
    w = torch.randn(cout, cin // g, *kernel, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, None, s, p, d, g)
    mu, nu = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
    dmu = torch.autograd.grad(mu.sum(), w, retain_graph=True)[0]   # row c = dμ_c/dW_c
    dnu = torch.autograd.grad(nu.sum(), w)[0]
    patch = mean_input_patch(x, kernel, s, p, d)                   # (C_in, kh, kw), shared by channels
    per_channel = patch.view(g, cin // g, *kernel).repeat_interleave(cout // g, dim=0)
    torch.testing.assert_close(per_channel, dmu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second_moment_weight_grad(x, y.detach(), w.shape, s, p, d, g), dnu,
                               rtol=1e-12, atol=1e-12)


def test_empty_batch_gives_finite_zeros():
    x = torch.zeros(0, 2, 5, 5)
    y = torch.zeros(0, 3, 5, 5)
    assert torch.count_nonzero(second_moment_weight_grad(x, y, (3, 2, 3, 3), 1, 1)) == 0


def test_half_slopes_stay_in_range_on_a_large_map():
    """Under fp16 autocast the slopes are weight-gradients of half tensors, rounded to half: Σ y·x_patch
    over a large map exceeds half's 65504 before the 1/M scale (the unscaled kernel below overflows), and
    a constant 1/M output gradient is a subnormal half. Both are computed with a power-of-two prescale;
    oracle: the same functions in float64."""
    torch.manual_seed(0)
    x = (torch.randn(1, 2, 260, 260) + 2).half()
    weight = (torch.randn(3, 2, 3, 3) * 0.5).half()
    y = torch.nn.functional.conv2d(x, weight, padding=1)
    naive = torch.ops.aten.convolution_backward(y, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                [False, True, False])[1]
    assert not torch.isfinite(naive).all()            # what an unscaled half kernel returns here
    for fn, args in ((second_moment_weight_grad, (weight.shape, 1, 1)), (mean_input_patch, (3, 1, 1))):
        got = fn(x, y, *args) if fn is second_moment_weight_grad else fn(x, *args)
        ref = fn(x.double(), y.double(), *args) if fn is second_moment_weight_grad else fn(x.double(), *args)
        assert torch.isfinite(got).all()
        assert (got.double() - ref).abs().max() <= 2e-3 * ref.abs().max(), fn.__name__
