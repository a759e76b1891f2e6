"""CBN under a real GradScaler (torch.amp.GradScaler on CPU): a step whose gradient overflows (the scaler
skips it) enters neither the window nor the running statistics. Oracle: the same training without loss
scaling on the same batches, the overflow batch left out."""
import pytest
import torch
import torch.nn as nn

from cbn_mmdet.ops import CrossIterationBatchNorm2d

OVERFLOW_STEP = 4
STEPS = 8


def _model(**kwargs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                         CrossIterationBatchNorm2d(4, buffer_num=3, burnin=0, **kwargs), nn.ReLU())


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 5, 5, generator=g) for _ in range(STEPS)]


def _loss(model, x):
    return (model(x) - 0.5).square().mean()


def _train(batches, scaled, **kwargs):
    model = _model(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 6, growth_interval=2) if scaled else None
    for i, x in enumerate(batches):
        if i == OVERFLOW_STEP and not scaled:
            continue
        opt.zero_grad()
        loss = _loss(model, x)
        if scaled:
            if i == OVERFLOW_STEP:
                loss = loss * float('inf')       # every gradient inf/NaN: the scaler skips the step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    return model


@pytest.mark.parametrize('kwargs', [{}, dict(grad_through_window=True)])
def test_overflow_step_enters_no_window_and_no_running_statistics(kwargs):
    batches = _batches()
    ref, model = _train(batches, False, **kwargs), _train(batches, True, **kwargs)
    norm, ref_norm = model[1], ref[1]
    assert int(norm.num_nonfinite) == 1 and int(ref_norm.num_nonfinite) == 0
    for name in ('running_mean', 'running_var', 'window_mean', 'window_sq', 'window_weight', 'window_sq_grad',
                 'window_mean_grad', 'window_head'):
        torch.testing.assert_close(getattr(norm, name), getattr(ref_norm, name), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(model[0].weight, ref[0].weight, rtol=1e-5, atol=1e-6)


def test_the_oracle_sees_the_overflow_batch_when_it_is_kept():
    """Power of the test above: with the overflow batch's statistics entered (the batch trained on instead
    of skipped), the window differs from the oracle's."""
    batches = _batches()
    ref = _train(batches, False)
    kept = _model()
    opt = torch.optim.SGD(kept.parameters(), lr=0.1)
    for x in batches:
        opt.zero_grad()
        _loss(kept, x).backward()
        opt.step()
    assert not torch.allclose(kept[1].window_mean, ref[1].window_mean)
