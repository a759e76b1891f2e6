"""NormHealthHook names the layer and the iteration where a NaN/Inf reached a norm."""
import types
from collections import Counter

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule

import cbn_mmdet  # noqa: F401
from cbn_mmdet.engine import NormHealthHook


def _runner(model, iteration=0):
    errors = []
    logger = types.SimpleNamespace(error=errors.append, warning=errors.append)
    return types.SimpleNamespace(model=model, iter=iteration, epoch=0, logger=logger, errors=errors)


def _model():
    return nn.Sequential(ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type='CBN', buffer_num=2)),
                         ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type='GN', num_groups=4)))


def test_clean_iterations_pass_silently():
    model = _model()
    runner = _runner(model)
    hook = NormHealthHook()
    hook.before_train(runner)
    for it in range(3):
        runner.iter = it
        model(torch.randn(2, 3, 5, 5, requires_grad=True)).sum().backward()
        hook.after_train_iter(runner, it)


def test_nan_is_reported_with_layer_and_iteration():
    model = _model()
    runner = _runner(model, iteration=41)
    hook = NormHealthHook()
    hook.before_train(runner)
    x = torch.randn(2, 3, 5, 5)
    x[1, 2, 0, 0] = float('inf')
    model(x.requires_grad_()).sum().backward()       # CBN commits a step (or refuses it) at its backward
    with pytest.raises(FloatingPointError, match=r"'0.bn'.*'1.gn'.*at iteration 42"):
        hook.after_train_iter(runner, 41)
    assert int(model[0].norm.num_nonfinite) == 1
    assert torch.isfinite(model[0].norm.running_var).all()


def test_log_instead_of_raise_and_interval():
    model = _model()
    runner = _runner(model, iteration=0)
    hook = NormHealthHook(interval=2, raise_error=False)
    hook.before_train(runner)
    x = torch.randn(2, 3, 5, 5)
    x[0, 0, 0, 0] = float('nan')
    model(x)
    hook.after_train_iter(runner, 0)     # not a checked iteration: flags kept
    assert not runner.errors
    runner.iter = 1
    hook.after_train_iter(runner, 1)
    assert len(runner.errors) == 1 and "'0.bn'" in runner.errors[0]


def test_bad_interval():
    with pytest.raises(ValueError, match='interval must be an int >= 1, got 0'):
        NormHealthHook(interval=0)


# Entry points of a device-to-host read; aten::to's own copy kernels (_to_copy, copy_) are its children.
HOST_READS = ('aten::to', 'aten::item', 'aten::_local_scalar_dense')


def _host_reads_of_one_check(layers, device):
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)) for _ in range(layers)])
    model.to(device)
    runner = _runner(model)
    hook = NormHealthHook()
    hook.before_train(runner)
    model(torch.randn(2, 4, 5, 5, device=device))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hook.after_train_iter(runner, 0)
    names = Counter(event.name for event in prof.events())
    return sum(names[name] for name in HOST_READS)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs CUDA'))])
def test_one_host_read_per_check_whatever_the_layer_count(device):
    """All layers' flags are stacked on the device and read once (before: one copy per layer)."""
    assert [_host_reads_of_one_check(n, device) for n in (1, 3, 9)] == [1, 1, 1]
