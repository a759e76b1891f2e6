"""CBNBurnInHook: plain BN for the first N epochs/iterations, derived from the runner's position."""
import types

import pytest
import torch
import torch.nn as nn
from mmengine.registry import HOOKS

import cbn_mmdet  # noqa: F401
from cbn_mmdet.engine import CBNBurnInHook
from cbn_mmdet.ops import CrossIterationBatchNorm2d


def _runner(epoch=0, iteration=0, max_epochs=12, max_iters=1000):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), CrossIterationBatchNorm2d(4, buffer_num=3))
    logger = types.SimpleNamespace(warning=lambda msg: None)
    return types.SimpleNamespace(model=model, epoch=epoch, iter=iteration, max_epochs=max_epochs,
                                 max_iters=max_iters, logger=logger)


def _step(runner):
    runner.model(torch.randn(2, 3, 6, 6, requires_grad=True)).sum().backward()
    return runner.model[1]


def test_registered():
    hook = HOOKS.build(dict(type='CBNBurnInHook', burnin_epochs=8))
    assert isinstance(hook, CBNBurnInHook)


def test_epoch_burnin_keeps_window_empty_then_fills():
    runner = _runner()
    hook = CBNBurnInHook(burnin_epochs=8)
    hook.before_train(runner)
    for epoch in range(10):
        runner.epoch = epoch
        hook.before_train_epoch(runner)
        layer = _step(runner)
        filled = int(layer.window_filled.sum())
        assert filled == (0 if epoch < 8 else min(epoch - 7, 3)), epoch
        assert layer.window_enabled == (epoch >= 8)


def test_resume_recomputes_state_from_epoch():
    runner = _runner(epoch=9)
    hook = CBNBurnInHook(burnin_epochs=8)
    runner.model[1].window_enabled = False
    hook.before_train(runner)
    assert runner.model[1].window_enabled


def test_iteration_burnin():
    runner = _runner()
    hook = CBNBurnInHook(burnin_iters=2)
    hook.before_train(runner)
    for it in range(4):
        runner.iter = it
        hook.before_train_iter(runner, it)
        layer = _step(runner)
    assert int(layer.window_filled.sum()) == 2


@pytest.mark.parametrize('kwargs,match', [
    (dict(), 'exactly one of burnin_epochs / burnin_iters'),
    (dict(burnin_epochs=2, burnin_iters=3), 'exactly one'),
    (dict(burnin_epochs=-1), 'burnin_epochs must be an int >= 0, got -1'),
    (dict(burnin_iters=1.5), 'burnin_iters must be an int >= 0, got 1.5'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBNBurnInHook(**kwargs)


def test_burnin_longer_than_schedule():
    with pytest.raises(ValueError, match='burnin_epochs=12 is not shorter than the schedule'):
        CBNBurnInHook(burnin_epochs=12).before_train(_runner(max_epochs=12))
