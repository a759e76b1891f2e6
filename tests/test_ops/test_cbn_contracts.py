"""CBN contracts checked on CPU: argument combinations CUDA's kernels reject, host syncs, autocast dtypes,
channels_last with the window layout, loading checkpoints of the older (5-D) window layout."""
import copy
import io

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from cbn_mmdet.ops import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d, bind_cbn_to_conv

_HOST_SYNC_OPS = ('aten._local_scalar_dense.default', 'aten.item.default')


class CudaArgumentRules(TorchDispatchMode):
    """Fails on calls CUDA's kernels reject although the CPU kernels accept them (read off torch's CUDA
    sources): ``native_batch_norm_backward`` with undefined ``save_mean``/``save_invstd`` (an internal
    assert whenever the fused path is not taken), ``batch_norm_elemt``/``batch_norm_backward_elemt`` with
    statistics in a dtype other than float32 for a reduced-precision input (or other than the input's
    otherwise), and any device-to-host read (``_local_scalar_dense``: a sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.seen.add(name)
        if name in _HOST_SYNC_OPS:
            raise AssertionError(f'host sync: {name}')
        if name == 'aten.native_batch_norm_backward.default':
            save_mean, save_invstd = args[5], args[6]
            if save_mean is None or save_invstd is None:
                raise AssertionError('native_batch_norm_backward: save_mean/save_invstd undefined (CUDA asserts)')
        if name in ('aten.batch_norm_elemt.default', 'aten.batch_norm_backward_elemt.default'):
            x = args[1] if name.endswith('backward_elemt.default') else args[0]
            stats = [a for a in args[2:] if isinstance(a, torch.Tensor) and a.dim() == 1]
            want = {x.dtype, torch.float32} if x.dtype in (torch.float16, torch.bfloat16) else {x.dtype}
            bad = [a.dtype for a in stats if a.dtype not in want]
            if bad:
                raise AssertionError(f'{name}: statistics dtype {bad} with input {x.dtype}')
        return func(*args, **kwargs)


OPTIONS = {
    'plain': dict(buffer_num=0),
    'burnin': dict(buffer_num=2, burnin=10),
    'window': dict(buffer_num=2),
    'grad_through_window': dict(buffer_num=2, grad_through_window=True),
    'stat_grad_sample': dict(buffer_num=2, stat_grad_sample=0.25),
    'momentum_none': dict(buffer_num=2, momentum=None),
    'sync_world_1': dict(buffer_num=2, sync=True),
}


def _model(**kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    cbn = CrossIterationBatchNorm2d(4, **kwargs)
    if cbn.buffer_num:
        bind_cbn_to_conv(cbn, conv)
    return nn.Sequential(conv, cbn, nn.ReLU())


def _train_step(model, seed=0):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    out = model(x)
    out.sum().backward()
    return out


@pytest.mark.parametrize('option', sorted(OPTIONS))
def test_training_steps_respect_cuda_argument_rules(option):
    model = _model(**OPTIONS[option])
    for i in range(3):          # fill the window first: the guarded paths differ from the first step
        _train_step(model, i)
    with CudaArgumentRules() as rules:
        _train_step(model, 9)
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 3, 6, 6))
    # the rule that matters was really exercised (the layer's closed-form backward)
    assert 'aten.native_batch_norm_backward.default' in rules.seen


def test_rule_catches_undefined_save_tensors():
    x = torch.randn(2, 3, 4, 4)
    stats = torch.zeros(3), torch.ones(3)
    with pytest.raises(AssertionError, match='save_mean'):
        with CudaArgumentRules():
            torch.ops.aten.native_batch_norm_backward(torch.ones_like(x), x, torch.ones(3), *stats, None, None,
                                                      False, 1e-5, [False, True, True])


@pytest.mark.parametrize('option', sorted(OPTIONS))
def test_no_host_sync_in_profiled_training_step(option):
    model = _model(**OPTIONS[option])
    for i in range(3):
        _train_step(model, i)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _train_step(model, 9)
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 3, 6, 6))
    names = {e.name for e in prof.events()}
    assert 'aten::native_batch_norm_backward' in names     # the profile saw the layer's backward
    assert not names & {'aten::_local_scalar_dense', 'aten::item'}


def test_momentum_none_is_the_cumulative_average():
    model = _model(buffer_num=2, momentum=None)
    cbn = model[1]
    batches = []
    for i in range(4):
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i), requires_grad=True)
        batches.append(model[0](x).detach())
        model(x).sum().backward()
    expected = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(cbn.running_mean, expected)
    torch.testing.assert_close(cbn.running_var, torch.stack([b.var((0, 2, 3)) for b in batches]).mean(0))


@pytest.mark.parametrize('buffer_num', [0, 2])
def test_empty_batch_under_autocast_has_the_autocast_dtype(buffer_num):
    model = _model(buffer_num=buffer_num)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        full = model(torch.randn(2, 3, 6, 6, requires_grad=True))
        empty = model(torch.randn(0, 3, 6, 6, requires_grad=True))
    assert full.dtype == empty.dtype == torch.bfloat16
    empty.sum().backward()
    assert model[1].weight.grad is not None      # still connected to gamma


def test_window_buffers_survive_channels_last():
    model = _model(buffer_num=2)
    model.to(memory_format=torch.channels_last)              # before training: buffers already sized
    reference = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    for i in range(3):
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i))
        a = model(x.to(memory_format=torch.channels_last).requires_grad_())
        b = reference(x.clone().requires_grad_())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        a.sum().backward()
        b.sum().backward()
    model.to(memory_format=torch.channels_last)              # after training (window filled)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = _model(buffer_num=2)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    fresh.to(memory_format=torch.channels_last)              # after a checkpoint load
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    _train_step(fresh)


def test_checkpoint_of_the_5d_window_layout_loads():
    model = _model(buffer_num=2)
    for i in range(3):
        _train_step(model, i)
    state = model.state_dict()
    conv_shape = model[0].weight.shape
    old = {k: v.clone() for k, v in state.items()}
    for key in ('1.window_weight', '1.window_sq_grad'):    # version 2 stored them weight-shaped
        old[key] = old[key].view(2, *conv_shape)
    old = type(state)(old)
    old._metadata = copy.deepcopy(state._metadata)
    old._metadata['1']['version'] = 2
    fresh = _model(buffer_num=2)
    fresh.load_state_dict(old)
    for key, value in state.items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    torch.testing.assert_close(_train_step(fresh, 5), _train_step(model, 5), rtol=0, atol=0)


def test_compensation_does_not_cancel_large_products():
    """The offset Σ(W_t − W_τ)·g is small next to Σ W_t·g: forming the difference first keeps float32
    within float32 rounding of the float64 value; subtracting the two products would not."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    cbn = CrossIterationBatchNorm2d(8, buffer_num=1)
    bind_cbn_to_conv(cbn, conv)
    with torch.no_grad():
        conv.weight.add_(100.0)               # a large common part of W_t and W_τ
    x = torch.rand(2, 8, 6, 6) + 1.0
    cbn(conv(x.requires_grad_())).sum().backward()
    step = 1e-3 * torch.randn_like(conv.weight)
    weight_t = conv.weight.detach() + step
    mean32, sq32 = cbn._compensated_window(weight_t, torch.float32)
    mean64, sq64 = cbn._compensated_window(weight_t.double(), torch.float64)
    offset64 = sq64 - cbn.window_sq.double()
    err = (sq32.double() - sq64).abs()
    assert (err <= 1e-3 * offset64.abs() + 1e-6 * sq64.abs()).all()
    naive = ((weight_t.flatten(1) * cbn.window_sq_grad[0]).sum(-1)
             - (cbn.window_weight[0] * cbn.window_sq_grad[0]).sum(-1))
    assert ((naive.double() - offset64[0]).abs() > (sq32.double() - sq64)[0].abs()).any()
    torch.testing.assert_close(mean32.double(), mean64, rtol=1e-5, atol=1e-5)


def test_sync_layer_at_world_size_one_respects_rules():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    cbn = SyncCrossIterationBatchNorm2d(4, buffer_num=2)
    bind_cbn_to_conv(cbn, conv)
    model = nn.Sequential(conv, cbn)
    for i in range(3):
        _train_step(model, i)
    with CudaArgumentRules():
        _train_step(model, 7)
