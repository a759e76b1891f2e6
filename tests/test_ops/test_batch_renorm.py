"""Tests of cbn_mmdet.ops.batch_renorm against the float64 per-channel reference of the paper's
equations (tests/oracles/batch_renorm_reference.py) and against torch's own BatchNorm2d."""
import io

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cbn_mmdet.ops.batch_renorm import BatchRenorm2d, batch_renorm, renorm_limits
from tests.oracles.batch_renorm_reference import ReferenceBRN

C = 3
SCHEDULE = dict(r_max=3.0, d_max=5.0, warmup_iters=2, r_ramp_iters=4, d_ramp_iters=3)
# (scale, offset) per step: far from the running statistics (both limits bind) and close to them.
STEPS = [(1.0, 0.0), (4.0, 6.0), (5.0, 8.0), (1.1, 0.2), (0.2, -9.0), (1.0, 0.1), (6.0, 0.0), (1.2, 0.3),
         (0.9, -0.2), (3.0, 12.0)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _layer(dtype=torch.float64, momentum=0.3, **kwargs):
    layer = BatchRenorm2d(C, eps=1e-5, momentum=momentum, **{**SCHEDULE, **kwargs}).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
        layer.bias.copy_(torch.tensor([0.2, 0.0, -1.0]))
    return layer


def _reference(momentum=0.3, **kwargs):
    s = {**SCHEDULE, **kwargs}
    return ReferenceBRN(C, 1e-5, momentum, s['r_max'], s['d_max'], s['warmup_iters'], s['r_ramp_iters'],
                        s['d_ramp_iters'])


def _batch(scale, offset, shape=(4, C, 3, 5)):
    return scale * torch.randn(shape, dtype=torch.float64) + offset


def _step_both(layer, ref, x):
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    x1 = x.clone().to(layer.weight.dtype).requires_grad_()
    layer.weight.grad = layer.bias.grad = None
    y = layer(x1)
    y.backward(grad_out.to(y.dtype))
    x2 = x.clone().requires_grad_()
    gamma = layer.weight.detach().double().clone().requires_grad_()
    beta = layer.bias.detach().double().clone().requires_grad_()
    y_ref = ref.train_step(x2, gamma, beta)
    y_ref.backward(grad_out)
    return (y, x1.grad, layer.weight.grad, layer.bias.grad), (y_ref, x2.grad, gamma.grad, beta.grad)


def test_schedule_matches_reference_piecewise():
    ref = _reference()
    for t in range(0, 12):
        r_limit, d_limit = renorm_limits(torch.tensor(t), **SCHEDULE)
        want = ref.limits(t)
        assert float(r_limit) == pytest.approx(want[0], abs=1e-6) and float(d_limit) == pytest.approx(want[1],
                                                                                                         abs=1e-6)
    # the paper's defaults: 1 up to 5k, 3 at 40k; 0 up to 5k, 5 at 25k
    layer = BatchRenorm2d(4)
    for t, want in ((5000, (1.0, 0.0)), (22500, (2.0, 5.0 * 17.5 / 20)), (25000, (1 + 2 * 20 / 35, 5.0)),
                    (40000, (3.0, 5.0)), (10 ** 6, (3.0, 5.0))):
        r_limit, d_limit = renorm_limits(torch.tensor(t), layer.r_max, layer.d_max, layer.warmup_iters,
                                         layer.r_ramp_iters, layer.d_ramp_iters)
        assert (float(r_limit), float(d_limit)) == pytest.approx(want, rel=1e-6)


def test_training_steps_match_reference_across_schedule():
    layer, ref = _layer(), _reference()
    for scale, offset in STEPS:
        got, want = _step_both(layer, ref, _batch(scale, offset))
        for name, a, b in zip(('output', 'grad_input', 'grad_weight', 'grad_bias'), got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
        torch.testing.assert_close(layer.running_mean, torch.tensor(ref.running_mean, dtype=torch.float64),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_var, torch.tensor(ref.running_var, dtype=torch.float64),
                                   rtol=1e-10, atol=1e-10)
    assert int(layer.iters) == int(layer.num_batches_tracked) == len(STEPS)
    after_warmup_r, after_warmup_d = ref.clipped_r[2:], ref.clipped_d[2:]
    # the sequence exercises both regimes of both clips
    assert any(after_warmup_r) and not all(after_warmup_r)
    assert any(after_warmup_d) and not all(after_warmup_d)


def test_float32_layer_matches_reference():
    layer, ref = _layer(torch.float32), _reference()
    for scale, offset in STEPS[:6]:
        got, want = _step_both(layer, ref, _batch(scale, offset))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    assert layer.running_var.dtype == torch.float32


def test_without_affine_matches_reference():
    layer = BatchRenorm2d(C, momentum=0.3, affine=False, **SCHEDULE).double()
    ref = _reference()
    for scale, offset in STEPS[:5]:
        x = _batch(scale, offset)
        torch.testing.assert_close(layer(x), ref.train_step(x, None, None), rtol=1e-9, atol=1e-9)


def test_eval_uses_running_stats():
    layer, ref = _layer(), _reference()
    for scale, offset in STEPS[:4]:
        _step_both(layer, ref, _batch(scale, offset))
    layer.eval()
    x = _batch(2.0, 1.0)
    gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref.eval_forward(x, gamma, beta), rtol=1e-10, atol=1e-10)
    assert int(layer.iters) == 4   # eval does not step the schedule


def test_warmup_is_torch_batchnorm():
    layer = BatchRenorm2d(C, momentum=0.05, warmup_iters=4, r_ramp_iters=10, d_ramp_iters=10)
    bn = nn.BatchNorm2d(C, momentum=0.05)
    with torch.no_grad():
        for m in (layer, bn):
            m.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
            m.bias.copy_(torch.tensor([0.2, 0.0, -1.0]))
    for scale, offset in STEPS[:4]:   # far from the running stats: BRN would clip hard after the warm-up
        x = _batch(scale, offset).float()
        g = torch.randn(x.shape)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((layer, bn), xs)]
        for y in ys:
            y.backward(g)
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
        for name in ('weight', 'bias'):
            torch.testing.assert_close(getattr(layer, name).grad, getattr(bn, name).grad, rtol=1e-5, atol=1e-5)
        for name in ('running_mean', 'running_var', 'num_batches_tracked'):
            torch.testing.assert_close(getattr(layer, name), getattr(bn, name), rtol=1e-6, atol=1e-6)
    # the fifth step leaves the warm-up: no longer BN on a batch far from the running statistics
    x = _batch(5.0, 8.0).float()
    assert not torch.allclose(layer(x), bn(x), atol=1e-3)


def test_checkpoint_round_trip_continues_schedule():
    layer, ref = _layer(), _reference()
    for scale, offset in STEPS[:3]:
        _step_both(layer, ref, _batch(scale, offset))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    assert set(layer.state_dict()) == {'weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked',
                                       'iters'}
    restored = BatchRenorm2d(C, momentum=0.3, **SCHEDULE).double()
    buf.seek(0)
    restored.load_state_dict(torch.load(buf))
    assert int(restored.iters) == 3
    for scale, offset in STEPS[3:7]:   # still the reference's schedule (the ramp continues from step 4)
        got, want = _step_both(restored, ref, _batch(scale, offset))
        torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    restored.reset_running_stats()
    assert int(restored.iters) == 0 and float(restored.running_var.min()) == 1.0


def test_half_precision_and_autocast():
    layer = _layer(torch.float32)
    x = _batch(2.0, 1.0).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.running_var.dtype == torch.float32
    ref = _layer(torch.float32)
    torch.testing.assert_close(y.float(), ref(x.float()), rtol=2e-2, atol=2e-2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(_batch(1.0, 0.0).float())
    assert out.dtype == torch.float32
    layer.eval()
    assert layer(x).dtype == torch.bfloat16


def test_empty_batch_is_a_no_op():
    layer = _layer(torch.float32)
    x = torch.zeros(0, C, 4, 4, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert int(layer.iters) == 0 and int(layer.num_batches_tracked) == 0
    layer(torch.zeros(0, C, 4, 4)).sum().backward()
    assert layer.weight.grad is not None


def test_invalid_arguments_and_inputs():
    with pytest.raises(ValueError, match='eps must be > 0, got 0'):
        BatchRenorm2d(4, eps=0)
    with pytest.raises(ValueError, match='eps must be > 0'):
        BatchRenorm2d(4, eps=-1e-5)
    with pytest.raises(ValueError, match='r_max must be >= 1, got 0.5'):
        BatchRenorm2d(4, r_max=0.5)
    with pytest.raises(ValueError, match='d_max must be >= 0, got -1.0'):
        BatchRenorm2d(4, d_max=-1.0)
    with pytest.raises(ValueError, match='warmup_iters must be >= 0, got -3'):
        BatchRenorm2d(4, warmup_iters=-3)
    with pytest.raises(TypeError, match='r_ramp_iters must be an int'):
        BatchRenorm2d(4, r_ramp_iters=2.5)
    with pytest.raises(ValueError, match=r'momentum must be in \[0, 1\], got 1.5'):
        BatchRenorm2d(4, momentum=1.5)
    layer = BatchRenorm2d(4)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        layer(torch.randn(1, 4, 1, 1))
    assert int(layer.iters) == 0
    with pytest.raises(ValueError, match='expected 4D input'):
        layer(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        batch_renorm(torch.randn(1, 4, 1, 1), None, None, torch.zeros(4), torch.ones(4), torch.tensor(1.),
                     torch.tensor(0.))
    layer.eval()
    assert layer(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)   # eval needs no batch statistics


def test_is_a_batchnorm_and_builds_through_mmcv():
    from mmcv.cnn import build_norm_layer

    import cbn_mmdet  # noqa: F401  (registers the layers)

    name, layer = build_norm_layer(dict(type='BRN', warmup_iters=10, r_ramp_iters=20, d_ramp_iters=20), 8)
    assert name == 'bn' and isinstance(layer, BatchRenorm2d) and isinstance(layer, _BatchNorm)
    assert (layer.warmup_iters, layer.momentum, layer.r_max, layer.d_max) == (10, 0.01, 3.0, 5.0)
    _, frozen = build_norm_layer(dict(type='BRN', requires_grad=False), 8)
    assert not frozen.weight.requires_grad
    from cbn_mmdet.models.registry import NOT_SYNCBN_CONVERTIBLE
    assert 'BRN' in NOT_SYNCBN_CONVERTIBLE


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_step_does_not_sync():
    layer = _layer(torch.float32).cuda()
    x = torch.randn(4, C, 8, 8, device='cuda', requires_grad=True)
    layer(x)   # warm up the allocator / kernels
    torch.cuda.set_sync_debug_mode('error')
    try:
        for _ in range(4):
            layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
