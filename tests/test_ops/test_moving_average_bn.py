"""Tests of cbn_mmdet.ops.moving_average_bn against a slow oracle written here: the official MABN
semantics re-implemented with explicit Python per-iteration state, channel by channel, and the
backward by its hand formula (not autograd)."""
import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cbn_mmdet.ops.moving_average_bn import MovingAverageBatchNorm2d, MovingAverageBNFunction, moving_average_bn

C = 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class OracleMABN:
    """Official MABN2d semantics, one channel and one iteration at a time, plain Python state."""

    def __init__(self, channels, num_rows, eps, momentum, warmup_iters, weight, bias):
        self.channels, self.num_rows, self.eps, self.momentum = channels, num_rows, eps, momentum
        self.warmup_iters = warmup_iters
        self.weight, self.bias = [float(v) for v in weight], [float(v) for v in bias]
        self.iters = 0
        self.buffer_x2 = [[0.0] * channels for _ in range(num_rows)]
        self.buffer_gz = [[0.0] * channels for _ in range(num_rows)]
        self.running_var = [1.0] * channels
        self.saved = None

    def _warm(self, t):
        return t <= self.num_rows or t < self.warmup_iters

    def _row_mean(self, buffer, c):
        return sum(buffer[k][c] for k in range(self.num_rows)) / self.num_rows

    def forward(self, x):
        self.iters += 1
        t, row = self.iters, self.iters % self.num_rows
        y = torch.empty_like(x)
        per_channel = []
        for c in range(self.channels):
            xc = x[:, c]
            self.buffer_x2[row][c] = (xc * xc).mean().item()
            var = self.buffer_x2[row][c] if self._warm(t) else self._row_mean(self.buffer_x2, c)
            std = math.sqrt(var + self.eps)
            z = xc / std
            r = std / math.sqrt(self.running_var[c] + self.eps)
            r = 1.0 if t <= max(1000, self.warmup_iters) else min(max(r, 0.2), 5.0)
            y[:, c] = self.weight[c] * r * z + self.bias[c]
            self.running_var[c] = self.momentum * self.running_var[c] + (1 - self.momentum) * var
            per_channel.append((z, std, r))
        self.saved = (t, row, per_channel)
        return y

    def backward(self, grad_y):
        t, row, per_channel = self.saved
        grad_x = torch.empty_like(grad_y)
        grad_w, grad_b = [], []
        for c, (z, std, r) in enumerate(per_channel):
            g = grad_y[:, c] * self.weight[c] * r
            self.buffer_gz[row][c] = (g * z).mean().item()
            stat = self.buffer_gz[row][c] if self._warm(t) else self._row_mean(self.buffer_gz, c)
            grad_x[:, c] = (g - z * stat) / std
            grad_w.append((grad_y[:, c] * r * z).sum().item())
            grad_b.append(grad_y[:, c].sum().item())
        return grad_x, grad_w, grad_b


def make_pair(num_rows=3, warmup_iters=5, momentum=0.9, eps=1e-5, affine=True):
    layer = MovingAverageBatchNorm2d(C, eps, momentum, affine, B=2, real_B=2 * num_rows,
                                     warmup_iters=warmup_iters).double()
    weight, bias = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.1, -0.2, 0.3])
    if affine:
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    else:
        weight, bias = torch.ones(C), torch.zeros(C)
    return layer, OracleMABN(C, num_rows, eps, momentum, warmup_iters, weight, bias)


def f64(v):
    return torch.tensor(v, dtype=torch.float64)


def step_and_compare(layer, oracle, scale=1.0):
    x = (torch.randn(2, C, 3, 3, dtype=torch.float64) * scale + 0.3).requires_grad_(True)
    out = layer(x)
    expected = oracle.forward(x.detach())
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    if layer.weight is not None:
        layer.weight.grad = layer.bias.grad = None
    out.backward(grad)
    grad_x, grad_w, grad_b = oracle.backward(grad)
    torch.testing.assert_close(x.grad, grad_x)
    if layer.weight is not None:
        torch.testing.assert_close(layer.weight.grad, f64(grad_w))
        torch.testing.assert_close(layer.bias.grad, f64(grad_b))
    assert layer.iters.item() == oracle.iters
    torch.testing.assert_close(layer.buffer_x2, f64(oracle.buffer_x2))
    torch.testing.assert_close(layer.buffer_gz, f64(oracle.buffer_gz))
    torch.testing.assert_close(layer.running_var, f64(oracle.running_var))
    return x, out


def set_state(layer, oracle, iters, running_var):
    layer.iters.fill_(iters)
    oracle.iters = iters
    layer.running_var.copy_(f64(running_var))
    oracle.running_var = list(running_var)


# ----------------------------------------------------------------------------- vs the oracle


@pytest.mark.parametrize('affine', [True, False])
def test_warmup_then_moving_average_matches_oracle(affine):
    # K=3, warmup 5: iterations 1-3 (buffer filling) and 4 (< warmup) use the current statistics,
    # 5-8 the moving averages over a full buffer.
    layer, oracle = make_pair(num_rows=3, warmup_iters=5, affine=affine)
    for _ in range(8):
        step_and_compare(layer, oracle)


def test_buffer_size_rule_beats_small_warmup():
    # warmup_iters=0: the current statistics are still used until the buffer is full (t <= K).
    layer, oracle = make_pair(num_rows=4, warmup_iters=0)
    for _ in range(6):
        step_and_compare(layer, oracle)


def test_r_forced_to_one_then_clipped():
    layer, oracle = make_pair(num_rows=2, warmup_iters=5)
    for _ in range(3):
        step_and_compare(layer, oracle)
    # Per channel: running_var far below (r clipped at 5), far above (r clipped at 1/5), and close
    # to the batch second moment (r inside the clip range).
    set_state(layer, oracle, iters=998, running_var=[1e-4, 1e4, 0.9])
    for _ in range(4):  # iterations 999, 1000 (r = 1), then 1001, 1002 (clipped)
        step_and_compare(layer, oracle)
        t, _, per_channel = oracle.saved
        assert t > 1000 or [entry[2] for entry in per_channel] == [1.0, 1.0, 1.0]
        # Keep the extreme running variances extreme (the update would drift them).
        set_state(layer, oracle, iters=layer.iters.item(), running_var=[1e-4, 1e4, 0.9])
    # The last step really exercised both clip bounds and the free range.
    t, _, per_channel = oracle.saved
    assert t == 1002
    r = [entry[2] for entry in per_channel]
    assert r[0] == 5.0 and r[1] == 0.2 and 0.2 < r[2] < 5.0 and r[2] != 1.0


def test_r_forced_while_below_warmup_iters():
    layer, oracle = make_pair(num_rows=2, warmup_iters=1500)
    set_state(layer, oracle, iters=1200, running_var=[1e-4, 1e4, 0.5])
    step_and_compare(layer, oracle)
    assert [entry[2] for entry in oracle.saved[2]] == [1.0, 1.0, 1.0]


def test_running_var_update_uses_old_value_weighting():
    layer = MovingAverageBatchNorm2d(C, momentum=0.75, B=1, real_B=1, warmup_iters=0).double()
    x = torch.randn(4, C, 2, 2, dtype=torch.float64)
    layer(x).sum().backward()      # a training step: the averages take its statistics at its backward
    x2 = x.square().mean(dim=(0, 2, 3))
    torch.testing.assert_close(layer.running_var, 0.75 * torch.ones(C, dtype=torch.float64) + 0.25 * x2)
    assert torch.count_nonzero(layer.running_mean) == 0
    with torch.no_grad():          # no backward will come: written at once
        layer(x)
    torch.testing.assert_close(layer.running_var, 0.75 * (0.75 + 0.25 * x2) + 0.25 * x2)


# ----------------------------------------------------------------------------- gradients


def _functional_state(num_rows, iters, dtype=torch.float64):
    return (torch.ones(C, dtype=dtype), torch.rand(num_rows, C, dtype=dtype) + 0.5,
            torch.zeros(num_rows, C, dtype=dtype), torch.tensor(iters))


@pytest.mark.parametrize('num_rows,iters,warmup_iters', [
    (3, 2, 0),    # warm-up: the buffer is not full yet
    (2, 3, 10),   # warm-up: below warmup_iters
    (1, 50, 0),   # K=1 after warm-up: the "moving average" is the current statistic
])
def test_backward_is_the_true_gradient_when_no_average_is_used(num_rows, iters, warmup_iters):
    # With the current statistics and r forced to 1 (iters <= 1000) the MABN rule equals the exact
    # gradient of y = gamma * x / sqrt(mean(x^2) + eps) + beta.
    x = torch.randn(2, C, 2, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(C, dtype=torch.float64, requires_grad=True)
    bias = torch.rand(C, dtype=torch.float64, requires_grad=True)
    state = _functional_state(num_rows, iters)

    def fn(x, weight, bias):
        return moving_average_bn(x, weight, bias, *state, eps=1e-3, momentum=0.9, warmup_iters=warmup_iters)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_backward_is_not_the_true_gradient_with_the_moving_average():
    # K=3 with a full buffer: the exact gradient of the averaged forward statistic is
    # (g - z * gz / K) / std, the MABN rule uses (g - z * mean(buffer_gz)) / std. They coincide only
    # if the past gz rows are zero, so the past rows are filled here: intentionally not the gradient.
    state = _functional_state(3, 10)
    state[2].copy_(torch.rand(3, C, dtype=torch.float64) + 0.5)
    x = torch.randn(2, C, 2, 2, dtype=torch.float64, requires_grad=True)
    others = state[1].clone()
    out = moving_average_bn(x, None, None, *state, eps=1e-3, momentum=0.9, warmup_iters=0)
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, grad)

    x_ref = x.detach().clone().requires_grad_(True)
    rows = list(others)
    rows[10 % 3] = x_ref.square().mean(dim=(0, 2, 3))  # this step's row; the other two are constants
    var = torch.stack(rows).mean(0)
    exact = x_ref / torch.sqrt(var.view(1, C, 1, 1) + 1e-3)
    torch.testing.assert_close(exact, out)  # same forward ...
    (true_grad,) = torch.autograd.grad(exact, x_ref, grad)
    assert not torch.allclose(ours, true_grad, atol=1e-6)  # ... different backward

    # The two closed forms named above.
    std = torch.sqrt(var.detach() + 1e-3).view(1, C, 1, 1)
    z = x.detach() / std
    gz = (grad * z).mean(dim=(0, 2, 3))
    torch.testing.assert_close(state[2][10 % 3], gz)
    torch.testing.assert_close(ours, (grad - z * state[2].mean(0).view(1, C, 1, 1)) / std)
    torch.testing.assert_close(true_grad, (grad - z * (gz / 3).view(1, C, 1, 1)) / std)


def test_function_is_exported_and_writes_gz_in_backward():
    running_var, buffer_x2, buffer_gz, iters = _functional_state(1, 1)
    x = torch.randn(2, C, 2, 2, dtype=torch.float64, requires_grad=True)
    x2_before = buffer_x2.clone()
    out = MovingAverageBNFunction.apply(x, None, None, running_var, buffer_x2, buffer_gz, iters, 1e-5, 0.9, 0,
                                        None, True)
    # a training step's statistics enter the averages at its backward, once its gradients are known
    assert torch.count_nonzero(buffer_gz) == 0 and torch.equal(buffer_x2, x2_before)
    out.backward(torch.randn_like(out))
    assert torch.count_nonzero(buffer_gz) == C
    torch.testing.assert_close(buffer_x2[0], x.detach().square().mean(dim=(0, 2, 3)))


def test_two_forwards_then_one_backward():
    layer, oracle = make_pair(num_rows=2, warmup_iters=0)
    x1 = torch.randn(2, C, 2, 2, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, C, 2, 2, dtype=torch.float64, requires_grad=True)
    (layer(x1).sum() + layer(x2).sum()).backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(x2.grad).all()
    assert layer.iters.item() == 2 and torch.count_nonzero(layer.buffer_gz) == 2 * C


# ----------------------------------------------------------------------------- eval and state


def test_eval_formula_equals_batchnorm_eval_with_zero_mean():
    layer, _ = make_pair()
    for _ in range(3):
        layer(torch.randn(2, C, 3, 3, dtype=torch.float64))
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    out = layer(x)
    shape = (1, C, 1, 1)
    expected = layer.weight.view(shape) * x / torch.sqrt(layer.running_var.view(shape) + layer.eps) \
        + layer.bias.view(shape)
    torch.testing.assert_close(out, expected)

    bn = nn.BatchNorm2d(C, eps=layer.eps).double().eval()
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if k in bn.state_dict()})
    assert torch.count_nonzero(bn.running_mean) == 0
    torch.testing.assert_close(out, bn(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key  # eval changes no state


def test_empty_batch_is_a_no_op():
    layer, _ = make_pair()
    layer(torch.randn(2, C, 3, 3, dtype=torch.float64))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(0, C, 3, 3, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, C, 3, 3)
    out.sum().backward()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert (layer.weight.grad == 0).all() and torch.isfinite(layer.bias.grad).all()
    assert layer.eval()(x).shape == (0, C, 3, 3)


def test_autocast_bf16_statistics_in_fp32():
    layer = MovingAverageBatchNorm2d(C, B=1, real_B=2, warmup_iters=0)
    x = (torch.randn(2, C, 4, 4) * 3).bfloat16().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    for name in ('running_var', 'buffer_x2', 'buffer_gz'):
        assert getattr(layer, name).dtype == torch.float32, name
    out.float().sum().backward()
    torch.testing.assert_close(layer.buffer_x2[1], x.detach().float().square().mean(dim=(0, 2, 3)))
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    assert torch.isfinite(layer.buffer_gz).all() and torch.count_nonzero(layer.buffer_gz[1]) == C
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert layer.eval()(x).dtype == torch.bfloat16


def test_state_dict_round_trip():
    layer, _ = make_pair(num_rows=2, warmup_iters=0)
    for _ in range(4):
        x = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
        layer(x).sum().backward()
    state = layer.state_dict()
    assert {'iters', 'buffer_x2', 'buffer_gz', 'running_var', 'running_mean'} <= set(state)
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    fresh = MovingAverageBatchNorm2d(C, momentum=0.9, B=2, real_B=4, warmup_iters=0).double()
    fresh.load_state_dict(torch.load(blob))
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)  # training step, same state after
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), atol=0, rtol=0)


def test_batchnorm_checkpoint_loads_and_mean_is_reset():
    bn = nn.BatchNorm2d(C)
    bn.running_mean.fill_(0.5)
    layer = MovingAverageBatchNorm2d(C, B=2, real_B=4)
    with pytest.warns(UserWarning, match='running_mean is non-zero'):
        result = layer.load_state_dict(bn.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ['buffer_gz', 'buffer_x2', 'iters']
    assert result.unexpected_keys == []
    assert torch.count_nonzero(layer.running_mean) == 0
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        layer.load_state_dict(layer.state_dict())  # a zero mean loads silently


def test_is_a_batchnorm_with_bn_abbreviation():
    layer = MovingAverageBatchNorm2d(C, B=2, real_B=8)
    assert type(layer).__mro__[1] is _BatchNorm
    assert MovingAverageBatchNorm2d._abbr_ == 'bn'
    assert layer.buffer_size == 4 and layer.buffer_x2.shape == layer.buffer_gz.shape == (4, C)
    assert layer.iters.dtype == torch.long and layer.iters.dim() == 0
    assert 'real_B=8' in repr(layer)
    layer.iters.fill_(7)
    layer.reset_running_stats()
    assert layer.iters.item() == 0


def test_constructor_errors():
    with pytest.raises(ValueError, match=r'MovingAverageBatchNorm2d: B must be a positive int, got 0'):
        MovingAverageBatchNorm2d(C, B=0, real_B=4)
    with pytest.raises(TypeError, match=r'B must be an int, got 2.0'):
        MovingAverageBatchNorm2d(C, B=2.0, real_B=4)
    with pytest.raises(ValueError, match=r'real_B must be a positive int, got -4'):
        MovingAverageBatchNorm2d(C, B=2, real_B=-4)
    with pytest.raises(ValueError, match=r'B=3 must divide real_B=4'):
        MovingAverageBatchNorm2d(C, B=3, real_B=4)
    with pytest.raises(ValueError, match=r'warmup_iters must be >= 0, got -1'):
        MovingAverageBatchNorm2d(C, B=2, real_B=4, warmup_iters=-1)
    with pytest.raises(TypeError, match=r'warmup_iters must be an int, got 1.5'):
        MovingAverageBatchNorm2d(C, B=2, real_B=4, warmup_iters=1.5)
    with pytest.raises(ValueError, match=r'momentum must be in \[0, 1\], got 1.5'):
        MovingAverageBatchNorm2d(C, momentum=1.5, B=2, real_B=4)
    with pytest.raises(TypeError, match=r'momentum must be a real number, got None'):
        MovingAverageBatchNorm2d(C, momentum=None, B=2, real_B=4)
    with pytest.raises(ValueError, match=r'eps must be > 0, got -1.0'):
        MovingAverageBatchNorm2d(C, eps=-1.0, B=2, real_B=4)
    with pytest.raises(ValueError, match=r'num_features must be a positive int, got 0'):
        MovingAverageBatchNorm2d(0, B=2, real_B=4)
    with pytest.raises(TypeError, match=r"required keyword-only argument: 'B'"):
        MovingAverageBatchNorm2d(C, real_B=4)


def test_input_errors():
    layer = MovingAverageBatchNorm2d(C, B=2, real_B=4)
    with pytest.raises(ValueError, match=r'MovingAverageBatchNorm2d: expected 4D input .* got 2D input'):
        layer(torch.randn(2, C))
    assert layer.iters.item() == 0  # a rejected input does not advance the counter
    with pytest.raises(ValueError, match=r'got 2D input'):
        layer.eval()(torch.randn(2, C))
    running_var, buffer_x2, buffer_gz, iters = _functional_state(2, 1, torch.float32)
    with pytest.raises(ValueError, match=r'buffer_x2 must have shape \(K, 4\)'):
        moving_average_bn(torch.randn(2, 4, 2, 2), None, None, torch.ones(4), buffer_x2, buffer_gz, iters)
