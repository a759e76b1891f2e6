"""CBN keeps ``running_mean``/``running_var`` as the rows of one tensor and ``window_head`` as element 0 of
``[head, 1, 0]`` (one ``where`` per step instead of three ops). The buffers must stay what users and
tools see (names, values, state dict), the packing must survive what replaces buffers (casts, copies,
pickling), and a buffer replaced behind the layer's back must fall back to the unpacked path with the
same values, never write into a stale pack."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.benchmark.op_count import norm_step_op_count
from cbn_mmdet.ops import CrossIterationBatchNorm2d
from cbn_mmdet.ops.cross_iter_bn import _shares_memory


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False),
                         CrossIterationBatchNorm2d(6, buffer_num=3)).to(dtype)


def _train(model, steps, seed=1, overflow_at=None):
    """SGD steps on random batches; ``overflow_at``: that step's gradient is +inf (a refused step)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = next(model.parameters()).dtype
    for i in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=gen).to(dtype)
        opt.zero_grad()
        loss = model(x).square().mean()
        if i == overflow_at:
            loss = loss * float('inf')
        loss.backward()
        if i != overflow_at:
            opt.step()


def _packed(norm):
    return (_shares_memory(norm._packed_running_stats(), (norm.running_mean, norm.running_var)),
            _shares_memory(norm._packed_head(), (norm.window_head,)))


def _assert_same_state(a, b):
    state_b = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, state_b[key]), key


def test_buffers_are_views_of_their_packs_and_look_unchanged():
    norm = _model()[1]
    assert _packed(norm) == (True, True)
    assert norm.running_mean.shape == norm.running_var.shape == (6,)
    assert norm.window_head.shape == () and norm.window_head.dtype == torch.long
    assert torch.equal(norm.running_var, torch.ones(6)) and int(norm.window_head) == 0
    assert sorted(n for n, _ in norm.named_buffers()) == sorted(
        ['running_mean', 'running_var', 'num_batches_tracked', 'iter_count', 'num_fallbacks', 'num_nonfinite',
         'window_head', 'window'])


@pytest.mark.parametrize('replaced', ['running', 'head', 'both'])
def test_a_replaced_buffer_falls_back_to_the_same_values(replaced):
    """Assigning a buffer (what a tool that swaps buffers does) unpacks it: the commit then takes its
    unpacked path — one op more per replaced pack — and trains to exactly the packed layer's state,
    refused steps included."""
    packed, swapped = _model(), _model()
    norm = swapped[1]
    if replaced in ('running', 'both'):
        norm.running_mean = norm.running_mean.clone()
        norm.running_var = norm.running_var.clone()
    if replaced in ('head', 'both'):
        norm.window_head = norm.window_head.clone()
    assert _packed(norm) == (replaced == 'head', replaced == 'running')
    for model in (packed, swapped):
        _train(model, 7, overflow_at=4)
    _assert_same_state(packed, swapped)
    assert int(swapped[1].num_nonfinite) == 1 and int(swapped[1].window_head) == 6 % 3
    # the unpacked path really ran: a where per running statistic (and the targets split in two) / the
    # negation of the flag
    x = torch.randn(2, 3, 8, 8)
    counts = [norm_step_op_count(m[0], m[1], x)[0] for m in (packed, swapped)]
    assert counts[1] - counts[0] == {'running': 2, 'head': 1, 'both': 3}[replaced]


@pytest.mark.parametrize('cast', ['double', 'half_then_float', 'to_same'])
def test_casts_pack_the_new_buffers_again(cast):
    model = _model()
    _train(model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if cast == 'double':
        model.double()
    elif cast == 'half_then_float':
        model.half().float()
    else:
        model.to(torch.float32)
    norm = model[1]
    assert _packed(norm) == (True, True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value.to(before[key].dtype), before[key], rtol=1e-3, atol=1e-3, msg=key)
    # and it trains like a twin whose packs were broken after the same cast (the unpacked path)
    twin = copy.deepcopy(model)
    twin[1].running_mean = twin[1].running_mean.clone()
    twin[1].window_head = twin[1].window_head.clone()
    for m in (model, twin):
        _train(m, 4, seed=2)
    _assert_same_state(model, twin)


@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_copies_own_packed_buffers(how):
    model = _model()
    _train(model, 3)
    clone = copy.deepcopy(model) if how == 'deepcopy' else pickle.loads(pickle.dumps(model))
    assert _packed(clone[1]) == (True, True)
    assert clone[1].running_mean.data_ptr() != model[1].running_mean.data_ptr()
    for m in (model, clone):
        _train(m, 4, seed=3)
    _assert_same_state(model, clone)


def test_load_state_dict_keeps_the_packs_and_assign_falls_back():
    source = _model()
    _train(source, 5)
    inplace, assigned = _model(), _model()
    inplace.load_state_dict(source.state_dict())
    assigned.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
    assert _packed(inplace[1]) == (True, True)
    for m in (source, inplace, assigned):
        _train(m, 4, seed=4)
    _assert_same_state(source, inplace)
    _assert_same_state(source, assigned)
