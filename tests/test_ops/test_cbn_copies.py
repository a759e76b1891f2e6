"""Copies of a CBN model (deepcopy, pickle, torch.save) at any stage train exactly like the original and
share nothing with it: buffers, hooks and the bound conv are the copy's own."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.ops import CrossIterationBatchNorm2d


def _model(stage):
    torch.manual_seed(0)
    if stage == 'queued':      # a structure the finders cannot read until the first forward
        model = nn.Sequential(nn.Identity(), CrossIterationBatchNorm2d(4, buffer_num=3), nn.ReLU())
        model._modules['0'] = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        assert not model[1].is_bound
        return model
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), CrossIterationBatchNorm2d(4, buffer_num=3),
                          nn.ReLU())
    if stage == 'mid_window':
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(2):
            _step(model, opt, i)
        assert int(model[1].window_filled.sum()) == 2
    return model


def _step(model, opt, seed):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    opt.zero_grad()
    out = model(x)
    out.square().sum().backward()
    opt.step()
    return out.detach()


def _copy(model, how):
    if how == 'deepcopy':
        return copy.deepcopy(model)
    if how == 'pickle':
        return pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize('how', ['deepcopy', 'pickle', 'torch.save'])
@pytest.mark.parametrize('stage', ['queued', 'bound', 'mid_window'])
def test_copy_trains_like_the_original(stage, how):
    original = _model(stage)
    clone = _copy(original, how)
    if stage != 'queued':
        assert clone[1].bound_conv is clone[0] and original[1].bound_conv is original[0]
    for name, buf in clone.named_buffers():
        assert buf.data_ptr() != dict(original.named_buffers())[name].data_ptr() or buf.numel() == 0, name
    opt_a = torch.optim.SGD(original.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(clone.parameters(), lr=0.1)
    for i in range(10, 15):    # interleaved: any shared state would make the two diverge
        out_a = _step(original, opt_a, i)
        out_b = _step(clone, opt_b, i)
        assert torch.equal(out_a, out_b), i
    assert clone[1].bound_conv is clone[0]
    state_a, state_b = original.state_dict(), clone.state_dict()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert int(clone[1].window_filled.sum()) == 3


def test_copy_hooks_capture_only_their_own_conv():
    original = _model('bound')
    clone = copy.deepcopy(original)
    original.train()
    with torch.enable_grad():
        clone[0](torch.randn(2, 3, 6, 6, requires_grad=True))
    assert clone[1]._conv_input is not None and original[1]._conv_input is None
