"""MABN under a real GradScaler (torch.amp.GradScaler on CPU): loss-scaled gradients are averaged unscaled,
and an overflow step (skipped by the scaler) enters no moving average. Oracle: the same training without
loss scaling on the same batches, the overflow batch left out."""
import copy

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.ops import MovingAverageBatchNorm2d

OVERFLOW_STEP = 3
STEPS = 9


def _model():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    # K = 4 rows; warm-up over after K steps, so the averages are in use for most of the run
    return nn.Sequential(conv, MovingAverageBatchNorm2d(4, B=2, real_B=8, warmup_iters=0))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 5, 5, generator=g) for _ in range(STEPS)]


def _loss(model, x):
    return (model(x) - 0.5).square().mean()


def _reference(batches):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, x in enumerate(batches):
        if i == OVERFLOW_STEP:
            continue            # the scaled run skips this step: the oracle never sees the batch
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
    return model


def _scaled(batches, attach=True):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # growth every 2 steps: the scale changes during the run (2^6 ... 2^9, and halves at the overflow)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 6, growth_interval=2)
    if attach:
        model[1].use_grad_scaler(scaler)
    scales = []
    for i, x in enumerate(batches):
        opt.zero_grad()
        loss = _loss(model, x)
        if i == OVERFLOW_STEP:
            loss = loss * float('inf')        # an fp16-style overflow: every gradient is inf/NaN
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, scales


def test_overflow_step_and_scale_changes_leave_the_averages_as_without_scaling():
    batches = _batches()
    ref = _reference(batches)
    model, scales = _scaled(batches)
    assert len(set(scales)) >= 3 and scales[OVERFLOW_STEP] < scales[OVERFLOW_STEP - 1]   # the scaler acted
    norm, ref_norm = model[1], ref[1]
    assert int(norm.iters) == int(ref_norm.iters) == STEPS - 1     # the skipped step was taken back
    for name in ('running_var', 'buffer_x2', 'buffer_gz'):
        torch.testing.assert_close(getattr(norm, name), getattr(ref_norm, name), rtol=1e-5, atol=1e-7,
                                   msg=name)
    torch.testing.assert_close(model[0].weight, ref[0].weight, rtol=1e-5, atol=1e-7)


def test_without_the_scaler_the_rows_carry_the_loss_scale():
    """The same run with the scaler not attached: the gradient rows are the scaled ones (what the oracle
    test above rules out)."""
    batches = _batches()
    ref = _reference(batches)
    model, _ = _scaled(batches, attach=False)
    ratio = model[1].buffer_gz.abs().sum() / ref[1].buffer_gz.abs().sum()
    assert ratio > 16


def test_nonfinite_forward_statistics_enter_nothing():
    norm = MovingAverageBatchNorm2d(3, B=2, real_B=4, warmup_iters=0)
    norm(torch.randn(2, 3, 4, 4)).sum().backward()
    before = copy.deepcopy(norm.state_dict())
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 0, 0] = float('inf')
    norm(x.requires_grad_()).sum().backward()
    for key in ('running_var', 'buffer_x2', 'buffer_gz', 'iters'):
        assert torch.equal(norm.state_dict()[key], before[key]), key


@pytest.mark.parametrize('copier', [copy.deepcopy, lambda m: torch.load(_saved(m), weights_only=False)])
def test_copies_drop_the_scaler(copier):
    norm = MovingAverageBatchNorm2d(3, B=2, real_B=4)
    norm.use_grad_scaler(torch.amp.GradScaler('cpu'))
    assert copier(norm)._grad_scaler is None and norm._grad_scaler is not None


def _saved(module):
    import io
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return buf
