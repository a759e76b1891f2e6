"""The shared argument checks, and every layer refusing an eps it cannot honour.

eps = 0 is accepted by torch's BN, but a constant channel (or, for WS, a constant filter) then divides
0 by 0; the layers refuse it at construction with a one-line error naming the layer and the value.
"""
import math

import pytest
import torch

from cbn_mmdet.ops import (
    BatchChannelNorm2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    SyncBatchNorm,
    SyncCrossIterationBatchNorm2d,
    WeightStandardizedConv2d,
    weight_standardize,
)
from cbn_mmdet.ops._validate import (
    check_divides,
    check_eps,
    check_finite,
    check_input_dim,
    check_non_negative_int,
    check_positive_int,
    check_unit_interval,
)

LAYERS = {
    'CrossIterationBatchNorm2d': lambda eps: CrossIterationBatchNorm2d(8, eps=eps),
    'SyncCrossIterationBatchNorm2d': lambda eps: SyncCrossIterationBatchNorm2d(8, eps=eps),
    'SyncBatchNorm': lambda eps: SyncBatchNorm(8, eps=eps),
    'MovingAverageBatchNorm2d': lambda eps: MovingAverageBatchNorm2d(8, eps=eps, B=1, real_B=2),
    'BatchChannelNorm2d': lambda eps: BatchChannelNorm2d(8, eps=eps, num_groups=2),
    'WeightStandardizedConv2d': lambda eps: WeightStandardizedConv2d(2, 3, 3, ws_eps=eps),
    'weight_standardize': lambda eps: weight_standardize(torch.randn(3, 2, 3, 3), eps=eps),
}


@pytest.mark.parametrize('layer', sorted(LAYERS))
@pytest.mark.parametrize('eps', [0, 0.0, -1e-5])
def test_every_layer_refuses_a_non_positive_eps(layer, eps):
    name = 'ws_eps' if layer == 'WeightStandardizedConv2d' else 'eps'
    owner = 'CrossIterationBatchNorm2d' if layer == 'SyncCrossIterationBatchNorm2d' else layer  # its base names it
    with pytest.raises(ValueError, match=rf'^{owner}: {name} must be > 0, got {eps!r}$'):
        LAYERS[layer](eps)


@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_every_layer_accepts_a_tiny_positive_eps(layer):
    LAYERS[layer](1e-12)


def test_why_eps_zero_is_refused():
    """torch's own BN refuses eps = 0 in training; in eval a dead channel (running_var 0) gives NaN."""
    bn = torch.nn.BatchNorm2d(1, eps=0.0)
    with pytest.raises(ValueError, match='eps must be positive'):
        bn(torch.ones(2, 1, 2, 2))
    bn.running_var.zero_()
    assert torch.isnan(bn.eval()(torch.zeros(2, 1, 2, 2))).all()


@pytest.mark.parametrize('value,error,message', [
    (float('nan'), ValueError, 'must be finite, got nan'),
    (math.inf, ValueError, 'must be finite, got inf'),
    (True, TypeError, 'must be a real number, got True'),
    ('1e-5', TypeError, "must be a real number, got '1e-5'"),
])
def test_check_eps_rejects_non_numbers(value, error, message):
    with pytest.raises(error, match=rf'^Owner: eps {message}'):
        check_eps(value, 'Owner')


def test_check_eps_returns_a_float():
    value = check_eps(1, 'Owner')
    assert value == 1.0 and type(value) is float


def test_integer_checks():
    assert check_positive_int('n', 3) == 3 and check_non_negative_int('n', 0) == 0
    with pytest.raises(ValueError, match=r'^L: n must be a positive int, got 0$'):
        check_positive_int('n', 0, 'L')
    with pytest.raises(TypeError, match=r'^L: n must be an int, got True \(bool\)$'):
        check_positive_int('n', True, 'L')
    with pytest.raises(ValueError, match=r'^L: n must be >= 0, got -1$'):
        check_non_negative_int('n', -1, 'L')


def test_interval_divides_and_finite():
    assert check_unit_interval('m', None, allow_none=True) is None
    with pytest.raises(ValueError, match=r'^L: m must be in \[0, 1\], got 1.5$'):
        check_unit_interval('m', 1.5, 'L')
    with pytest.raises(TypeError, match=r'must be a real number, got None'):
        check_unit_interval('m', None, 'L')
    with pytest.raises(ValueError, match=r'^L: g=3 must divide c=8$'):
        check_divides('g', 3, 'c', 8, 'L')
    assert check_finite('x', 2) == 2.0


def test_check_input_dim():
    check_input_dim(torch.zeros(1, 2, 3, 4), (4,))
    with pytest.raises(ValueError, match=r'^L: expected 4D input \(N, C, H, W\), got 3D input of shape \(2, 3, 4\)$'):
        check_input_dim(torch.zeros(2, 3, 4), (4,), 'L')
    with pytest.raises(TypeError, match=r'^L: input must be a torch.Tensor, got list$'):
        check_input_dim([1], (4,), 'L')
