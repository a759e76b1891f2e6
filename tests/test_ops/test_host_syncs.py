"""No host synchronisation in a training step of any layer: the CPU profiler of the step (forward, backward,
optimizer step), of an eval forward, and of the first training step after a checkpoint load shows no op
that reads a device value on the host (on CUDA each is a cudaMemcpy D2H plus a stream synchronisation).

Cases that sync today are marked ``xfail(strict=True)`` with what syncs and where: a fix turns them into
XPASS failures, and the mark goes.
"""
import pytest
import torch

from cbn_mmdet.ops import sync_weighted_mean

from .cuda_contracts import KNOWN_HOST_SYNCS, LAYER_CASES, MODES, build_case, eval_forward, reload, train_steps

# aten::item / _local_scalar_dense: a device value read on the host; nonzero/is_nonzero/equal read one
# internally; lift_fresh: torch.tensor(<host data>), a blocking host-to-device copy when made on a GPU.
SYNC_OPS = {'aten::_local_scalar_dense', 'aten::item', 'aten::nonzero', 'aten::is_nonzero', 'aten::equal',
            'aten::lift_fresh'}
WARM_STEPS = 4      # windows, burn-in and MABN's moving averages are all in use after these
PHASES = ('train', 'eval', 'after_load')
# The reads of KNOWN_HOST_SYNCS happen in training forwards only.
SYNCING_PHASES = ('train', 'after_load')


def _params():
    params = []
    for name in sorted(LAYER_CASES):
        for phase in PHASES:
            if name in KNOWN_HOST_SYNCS and phase in SYNCING_PHASES:
                params.append(pytest.param(name, phase, marks=pytest.mark.xfail(
                    strict=True, reason=KNOWN_HOST_SYNCS[name])))
            else:
                params.append((name, phase))
    return params


def _profiled_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name, phase', _params())
def test_no_host_sync(name, phase, mode):
    model = build_case(name, mode)
    optimizer = train_steps(model, WARM_STEPS, mode)
    if phase == 'train':
        names = _profiled_names(lambda: train_steps(model, 1, mode, optimizer, start=WARM_STEPS))
        assert 'aten::convolution_backward' in names      # the profile saw the backward
    elif phase == 'eval':
        names = _profiled_names(lambda: eval_forward(model, mode))
    else:
        fresh = reload(name, model, mode)
        for key, value in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key
        names = _profiled_names(lambda: train_steps(fresh, 1, mode, start=WARM_STEPS))
    assert not names & SYNC_OPS, sorted(names & SYNC_OPS)


def test_count_of_sync_weighted_mean_is_made_without_a_host_copy():
    stats = torch.randn(4), torch.randn(4)
    names = _profiled_names(lambda: sync_weighted_mean(stats, 12))
    assert not names & SYNC_OPS, sorted(names & SYNC_OPS)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of world size 1 in this process (the CPU path ours takes with a group)."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip('a process group is already initialised in this process')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('name', [
    'sync_bn', 'sync_cbn',
    'sync_bn_momentum_none',
])
def test_no_host_sync_in_a_one_process_group(name, one_process_group):
    model = build_case(name)
    optimizer = train_steps(model, WARM_STEPS)
    names = _profiled_names(lambda: train_steps(model, 1, optimizer=optimizer, start=WARM_STEPS))
    assert not names & SYNC_OPS, sorted(names & SYNC_OPS)
