"""Tests of cbn_mmdet.ops.weight_std_conv against hand-written oracles (a Python loop and mmcv's
``conv_ws_2d`` formula written out here, since mmcv is not importable in the test environment)."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbn_mmdet.ops.weight_std_conv import CenteredConv2d, WeightStandardizedConv2d, weight_center, weight_standardize


def loop_standardize(weight, eps=1e-5):
    """Oracle: one output channel at a time, sums written out (unbiased variance, eps on the std)."""
    rows = []
    for w in weight:
        values = w.reshape(-1)
        n = values.numel()
        mean = values.sum() / n
        var = ((values - mean) ** 2).sum() / (n - 1)
        rows.append((w - mean) / (var.sqrt() + eps))
    return torch.stack(rows)


def mmcv_conv_ws_weight(weight, eps=1e-5):
    """mmcv 2.x ``conv_ws_2d``'s weight transform, copied as a formula."""
    c_in = weight.size(0)
    weight_flat = weight.view(c_in, -1)
    mean = weight_flat.mean(dim=1, keepdim=True).view(c_in, 1, 1, 1)
    std = weight_flat.std(dim=1, keepdim=True).view(c_in, 1, 1, 1)
    return (weight - mean) / (std + eps)


def loop_center(weight):
    return torch.stack([w - w.reshape(-1).sum() / w.numel() for w in weight])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- functional


@pytest.mark.parametrize('shape', [(4, 3, 3, 3), (6, 2, 1, 1), (5, 1, 3, 3), (3, 4, 2)])
def test_weight_standardize_matches_loop_and_mmcv(shape):
    w = torch.randn(shape, dtype=torch.float64) * 3 + 1
    out = weight_standardize(w, eps=1e-5)
    torch.testing.assert_close(out, loop_standardize(w))
    if w.dim() == 4:
        torch.testing.assert_close(out, mmcv_conv_ws_weight(w))


def test_weight_standardize_statistics():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    out = weight_standardize(w, eps=1e-12).flatten(1)
    torch.testing.assert_close(out.mean(1), torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(out.std(1), torch.ones(8, dtype=torch.float64))


def test_weight_standardize_eps_is_outside_the_root():
    w = torch.tensor([[1.0, 3.0]], dtype=torch.float64)  # mean 2, unbiased std sqrt(2)
    out = weight_standardize(w, eps=0.5)
    expected = torch.tensor([[-1.0, 1.0]], dtype=torch.float64) / (math.sqrt(2.0) + 0.5)
    torch.testing.assert_close(out, expected)


def test_weight_standardize_gradcheck():
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: weight_standardize(t, 1e-3), (w,))
    # The gradient also agrees with the loop oracle's autograd gradient.
    grad = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(weight_standardize(w), w, grad)
    (g_ref,) = torch.autograd.grad(loop_standardize(w), w, grad)
    torch.testing.assert_close(g_ours, g_ref)


def test_weight_center_matches_loop():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) + 2
    out = weight_center(w)
    torch.testing.assert_close(out, loop_center(w))
    torch.testing.assert_close(out.flatten(1).mean(1), torch.zeros(5, dtype=torch.float64))


def test_functional_keeps_dtype_and_computes_in_fp32():
    w = torch.randn(4, 3, 3, 3).bfloat16()
    out = weight_standardize(w)
    assert out.dtype == torch.bfloat16
    # Computed in float32 then rounded once: within one bf16 rounding of the float64 oracle.
    torch.testing.assert_close(out.double(), loop_standardize(w.double()), atol=1e-2, rtol=8e-3)
    assert weight_center(w).dtype == torch.bfloat16


def test_functional_errors():
    with pytest.raises(ValueError, match=r'fan-in\), got weight of shape \(4, 1, 1, 1\)'):
        weight_standardize(torch.randn(4, 1, 1, 1))
    with pytest.raises(ValueError, match=r'eps must be > 0, got -1'):
        weight_standardize(torch.randn(4, 2, 1, 1), eps=-1)
    with pytest.raises(TypeError, match=r'eps must be a real number'):
        weight_standardize(torch.randn(4, 2, 1, 1), eps='1e-5')
    with pytest.raises(ValueError, match=r'at least 2 dims'):
        weight_standardize(torch.randn(4))
    with pytest.raises(TypeError, match=r'weight must be a torch.Tensor, got list'):
        weight_center([1.0, 2.0])


# ----------------------------------------------------------------------------- modules

MODULES = [
    (WeightStandardizedConv2d, loop_standardize),
    (CenteredConv2d, loop_center),
]


@pytest.mark.parametrize('cls,oracle', MODULES)
@pytest.mark.parametrize('kwargs', [
    dict(stride=1, padding=1, groups=1, bias=True),
    dict(stride=2, padding=0, dilation=2, groups=2, bias=False),
    dict(stride=1, padding=1, groups=1, bias=True, padding_mode='reflect'),
])
def test_module_forward_backward_matches_oracle(cls, oracle, kwargs):
    conv = cls(4, 6, 3, **kwargs).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    out = conv(x)

    w_ref = conv.weight.detach().clone().requires_grad_(True)
    b_ref = None if conv.bias is None else conv.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    xin = x_ref
    pad = conv.padding
    if kwargs.get('padding_mode', 'zeros') != 'zeros':
        xin, pad = F.pad(x_ref, (pad[1], pad[1], pad[0], pad[0]), mode=conv.padding_mode), 0
    ref = F.conv2d(xin, oracle(w_ref), b_ref, conv.stride, pad, conv.dilation, conv.groups)
    torch.testing.assert_close(out, ref)

    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(conv.weight.grad, w_ref.grad)
    if b_ref is not None:
        torch.testing.assert_close(conv.bias.grad, b_ref.grad)


@pytest.mark.parametrize('cls,oracle', MODULES)
def test_effective_weight_is_the_one_used(cls, oracle):
    conv = cls(3, 4, 3, padding=1, bias=False)
    torch.testing.assert_close(conv.cbn_effective_weight(), oracle(conv.weight.detach()))
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.cbn_effective_weight(), None, 1, 1))


def test_ws_module_uses_ws_eps():
    conv = WeightStandardizedConv2d(2, 3, 1, ws_eps=0.25)
    torch.testing.assert_close(conv.cbn_effective_weight(), loop_standardize(conv.weight.detach(), eps=0.25))
    assert 'ws_eps=0.25' in repr(conv)


@pytest.mark.parametrize('cls', [WeightStandardizedConv2d, CenteredConv2d])
def test_empty_batch(cls):
    conv = cls(4, 6, 3, padding=1)
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    out = conv(x)
    assert out.shape == (0, 6, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.isfinite(conv.weight.grad).all() and (conv.weight.grad == 0).all()


@pytest.mark.parametrize('cls', [WeightStandardizedConv2d, CenteredConv2d])
def test_unbatched_input_like_conv2d(cls):
    conv = cls(4, 6, 3)
    x = torch.randn(4, 5, 5)
    torch.testing.assert_close(conv(x), conv(x[None])[0])


@pytest.mark.parametrize('cls', [WeightStandardizedConv2d, CenteredConv2d])
def test_autocast_bf16(cls):
    conv = cls(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = conv(x)
        weight = conv.cbn_effective_weight()
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert weight.dtype == torch.float32  # the statistics stay in float32 under autocast
    torch.testing.assert_close(out.float(), conv(x), atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize('cls', [WeightStandardizedConv2d, CenteredConv2d])
def test_state_dict_keys_and_round_trip(cls):
    conv = cls(4, 6, 3, padding=1)
    assert list(conv.state_dict()) == list(nn.Conv2d(4, 6, 3).state_dict()) == ['weight', 'bias']
    blob = io.BytesIO()
    torch.save(conv.state_dict(), blob)
    blob.seek(0)
    fresh = cls(4, 6, 3, padding=1)
    fresh.load_state_dict(torch.load(blob))
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(fresh(x), conv(x), atol=0, rtol=0)
    # A plain nn.Conv2d checkpoint loads strictly as well.
    fresh.load_state_dict(nn.Conv2d(4, 6, 3).state_dict())


@pytest.mark.parametrize('cls', [WeightStandardizedConv2d, CenteredConv2d])
def test_train_and_eval_agree(cls):
    conv = cls(4, 6, 3)
    x = torch.randn(2, 4, 5, 5)
    out_train = conv.train()(x)
    torch.testing.assert_close(conv.eval()(x), out_train, atol=0, rtol=0)


def test_is_a_conv2d():
    assert isinstance(WeightStandardizedConv2d(2, 2, 3), nn.Conv2d)
    assert isinstance(CenteredConv2d(2, 2, 3), nn.Conv2d)


def test_module_errors():
    with pytest.raises(ValueError, match=r'WeightStandardizedConv2d: ws_eps must be > 0, got -0.1'):
        WeightStandardizedConv2d(2, 2, 3, ws_eps=-0.1)
    with pytest.raises(TypeError, match=r'WeightStandardizedConv2d: ws_eps must be a real number'):
        WeightStandardizedConv2d(2, 2, 3, ws_eps=None)
    with pytest.raises(ValueError, match=r'WeightStandardizedConv2d: fan-in .* got in_channels=4, groups=4'):
        WeightStandardizedConv2d(4, 4, 1, groups=4)
    with pytest.raises(ValueError, match=r'CenteredConv2d: fan-in .* got in_channels=1, groups=1'):
        CenteredConv2d(1, 4, 1)


@pytest.mark.parametrize('cls', [WeightStandardizedConv2d, CenteredConv2d])
def test_wrong_rank_input(cls):
    conv = cls(4, 6, 3)
    with pytest.raises(ValueError, match=r'expected 3D or 4D input .* got 5D input'):
        conv(torch.randn(1, 4, 5, 5, 5))
    with pytest.raises(ValueError, match=r'got 2D input'):
        conv(torch.randn(4, 5))


# ----------------------------------------------------------------------------- eps inside the root


def loop_standardize_var_eps(weight, eps=1e-5):
    """Oracle of the BCN ImageNet code's WS: (W - mean) / sqrt(unbiased var + eps), sums written out."""
    rows = []
    for w in weight:
        values = w.reshape(-1)
        n = values.numel()
        mean = values.sum() / n
        var = ((values - mean) ** 2).sum() / (n - 1)
        rows.append((w - mean) / (var + eps).sqrt())
    return torch.stack(rows)


def test_weight_standardize_eps_inside_the_root():
    w = torch.tensor([[1.0, 3.0]], dtype=torch.float64)  # mean 2, unbiased var 2
    out = weight_standardize(w, eps=0.5, eps_inside_sqrt=True)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0]], dtype=torch.float64) / math.sqrt(2.5))
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.02
    torch.testing.assert_close(weight_standardize(w, eps_inside_sqrt=True), loop_standardize_var_eps(w))


@pytest.mark.parametrize('eps_inside_sqrt,oracle', [(False, loop_standardize), (True, loop_standardize_var_eps)])
def test_module_modes_match_their_oracle(eps_inside_sqrt, oracle):
    conv = WeightStandardizedConv2d(4, 6, 3, padding=1, eps_inside_sqrt=eps_inside_sqrt).double()
    with torch.no_grad():
        conv.weight.mul_(0.05)   # small filters: the two modes differ visibly here
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = F.conv2d(x, oracle(conv.weight.detach()), conv.bias.detach(), padding=1)
    torch.testing.assert_close(conv(x), expected)
    assert f'eps_inside_sqrt={eps_inside_sqrt}' in repr(conv)


def _mode_relative_difference(std):
    """Relative L2 difference of the conv output of the two WS modes at a per-filter std ``std``."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, 3, 3, generator=gen, dtype=torch.float64)
    weight = (weight - weight.flatten(1).mean(1).view(-1, 1, 1, 1))
    weight = weight / weight.flatten(1).std(1).view(-1, 1, 1, 1) * std
    x = torch.randn(2, 64, 8, 8, generator=gen, dtype=torch.float64)
    outs = [F.conv2d(x, weight_standardize(weight, 1e-5, mode)) for mode in (False, True)]
    return float((outs[0] - outs[1]).norm() / outs[1].norm())


@pytest.mark.parametrize('std,expected', [(0.03, 0.0052), (0.01, 0.0478)])
def test_mode_difference_matches_the_documented_figure(std, expected):
    """docs/norm_layers.md quotes these; hand derivation: with s = std, the outputs differ by the ratio
    of the two divisors, sqrt(s² + eps) / (s + eps) = 1.0052 at s = 0.03 and 1.0478 at s = 0.01."""
    ratio = math.sqrt(std ** 2 + 1e-5) / (std + 1e-5)
    assert abs(_mode_relative_difference(std) - (ratio - 1)) < 1e-6
    assert abs((ratio - 1) - expected) < 5e-5


def test_eps_inside_sqrt_must_be_bool():
    with pytest.raises(TypeError, match='WeightStandardizedConv2d: eps_inside_sqrt must be a bool'):
        WeightStandardizedConv2d(2, 3, 3, eps_inside_sqrt=1)


@pytest.mark.parametrize('eps', [0, 0.0, -1e-5])
def test_ws_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match=r'^WeightStandardizedConv2d: ws_eps must be > 0, got'):
        WeightStandardizedConv2d(2, 3, 3, ws_eps=eps)
    with pytest.raises(ValueError, match=r'^weight_standardize: eps must be > 0, got'):
        weight_standardize(torch.randn(3, 2, 3, 3), eps=eps)


def test_ws_refuses_a_foreign_weight():
    """mmcv's efficient_conv_bn_eval calls conv._conv_forward(x, weight * s, b): re-standardising that
    would drop s, so the WS conv must refuse it (never silently compute something else)."""
    conv = WeightStandardizedConv2d(2, 3, 3)
    with pytest.raises(RuntimeError, match='efficient_conv_bn_eval'):
        conv._conv_forward(torch.randn(1, 2, 4, 4), conv.weight * 2, conv.bias)


def test_centred_conv_commutes_with_a_channel_scale():
    """Why CenConv folds exactly through mmcv: centring the scaled weight equals scaling the centred one."""
    conv = CenteredConv2d(3, 4, 3, bias=False).double()
    scale = torch.rand(4, 1, 1, 1, dtype=torch.float64) + 0.5
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = conv._conv_forward(x, conv.weight * scale, None)
    torch.testing.assert_close(out, F.conv2d(x, loop_center(conv.weight.detach()) * scale))
