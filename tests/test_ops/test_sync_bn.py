"""Tests for cbn_mmdet.ops.sync_bn.SyncBatchNorm: single process and two gloo processes on CPU."""
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from cbn_mmdet.ops.sync_bn import _TORCH_HAS_BIAS_KW, SyncBatchNorm
from tests.dist_utils import spawn

WORLD = 2
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}


def _init_like(dst, seed, num_features, dtype=torch.float64):
    """Same non-trivial parameters and running statistics for the layer under test and the reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if dst.weight is not None:
            dst.weight.copy_(torch.rand(num_features, generator=gen, dtype=dtype) + 0.5)
            dst.bias.copy_(torch.randn(num_features, generator=gen, dtype=dtype))
        if dst.running_mean is not None:
            dst.running_mean.copy_(torch.randn(num_features, generator=gen, dtype=dtype))
            dst.running_var.copy_(torch.rand(num_features, generator=gen, dtype=dtype) + 0.5)


def _batch(seed, shape, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    # An offset and scale per channel so that wrong statistics cannot cancel out.
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 3
    grad = torch.randn(shape, generator=gen, dtype=dtype)
    return x, grad


def _run_steps(bn, inputs):
    """Train steps with loss <out, g>; returns outputs and input gradients per step."""
    outs, grads = [], []
    for x, g in inputs:
        x = x.clone().requires_grad_(True)
        out = bn(x)
        (out * g).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    return outs, grads


def _state(bn):
    keys = ('running_mean', 'running_var', 'num_batches_tracked')
    state = {k: getattr(bn, k).clone() for k in keys if getattr(bn, k) is not None}
    if bn.weight is not None:
        state['weight_grad'] = bn.weight.grad.clone()
        state['bias_grad'] = bn.bias.grad.clone()
    return state


def _close(actual, expected, msg=''):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10, msg=msg)


# --------------------------------------------------------------------------- single process
def test_class_identity():
    assert SyncBatchNorm.__name__ == 'SyncBatchNorm'
    assert _BatchNorm in SyncBatchNorm.__bases__
    assert torch.nn.SyncBatchNorm in SyncBatchNorm.__bases__
    assert SyncBatchNorm._abbr_ == 'bn'
    bn = SyncBatchNorm(4)
    assert isinstance(bn, torch.nn.SyncBatchNorm) and isinstance(bn, _BatchNorm)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.process_group) == \
        (1e-5, 0.1, True, True, None)


@pytest.mark.parametrize('kwargs, error, name', [
    (dict(num_features=0), ValueError, 'num_features'),
    (dict(num_features=2.0), TypeError, 'num_features'),
    (dict(num_features=2, eps=-1.0), ValueError, 'eps'),
    (dict(num_features=2, eps='1e-5'), TypeError, 'eps'),
    (dict(num_features=2, momentum=1.5), ValueError, 'momentum'),
])
def test_constructor_rejects(kwargs, error, name):
    with pytest.raises(error, match=name):
        SyncBatchNorm(**kwargs)


def test_input_checks():
    bn = SyncBatchNorm(3)
    with pytest.raises(ValueError, match='2D'):
        bn(torch.randn(3))
    with pytest.raises(ValueError, match='channels'):
        SyncBatchNorm(3)(torch.randn(2, 0, 2))


@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('affine', [True, False])
def test_matches_batchnorm2d_single_process(momentum, affine):
    ours = SyncBatchNorm(3, momentum=momentum, affine=affine).double()
    ref = torch.nn.BatchNorm2d(3, momentum=momentum, affine=affine).double()
    _init_like(ours, 0, 3)
    _init_like(ref, 0, 3)
    inputs = [_batch(s, (4, 3, 2, 3)) for s in (1, 2)]
    outs, grads = _run_steps(ours, inputs)
    ref_outs, ref_grads = _run_steps(ref, inputs)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        _close(a, b)
    for key, value in _state(ref).items():
        _close(_state(ours)[key], value, msg=key)
    ours.eval()
    ref.eval()
    x = _batch(3, (2, 3, 2, 2))[0]
    _close(ours(x), ref(x))


def test_empty_batch_single_process():
    ours, ref = SyncBatchNorm(3), torch.nn.BatchNorm2d(3)
    _init_like(ours, 0, 3, torch.float32)
    _init_like(ref, 0, 3, torch.float32)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    out = ours(x)
    out.sum().backward()
    ref(torch.randn(0, 3, 4, 4))
    assert out.shape == (0, 3, 4, 4) and x.grad.shape == x.shape
    for key in ('running_mean', 'running_var', 'num_batches_tracked'):
        _close(getattr(ours, key), getattr(ref, key), msg=key)


def test_autocast_bfloat16_single_process():
    conv = torch.nn.Conv2d(3, 4, 1)
    bn = SyncBatchNorm(4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = bn(conv(torch.randn(2, 3, 4, 4)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    assert torch.isfinite(bn.running_var).all()
    out.float().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(bn.weight.grad).all()


def test_state_dict_round_trip_with_torch_bn():
    ref = torch.nn.BatchNorm2d(5)
    _init_like(ref, 7, 5, torch.float32)
    ours = SyncBatchNorm(5)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_convert_sync_batchnorm():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.BatchNorm2d(4, momentum=None, affine=False)))
    net[1].eval()
    weight, running_mean = net[1].weight, net[1].running_mean
    converted = SyncBatchNorm.convert_sync_batchnorm(net)
    assert converted is net
    assert type(net[1]) is SyncBatchNorm and type(net[3][0]) is SyncBatchNorm
    assert net[1].weight is weight and net[1].running_mean is running_mean
    assert not net[1].training and net[3][0].training
    assert net[3][0].momentum is None and not net[3][0].affine
    single = SyncBatchNorm.convert_sync_batchnorm(torch.nn.SyncBatchNorm(2))
    assert type(single) is SyncBatchNorm


@pytest.mark.skipif(not _TORCH_HAS_BIAS_KW, reason='torch SyncBatchNorm has no bias keyword')
def test_bias_false():
    bn = SyncBatchNorm(3, bias=False)
    assert bn.bias is None and bn.weight is not None
    assert SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3, bias=False)).bias is None
    assert bn(torch.randn(2, 3, 2, 2)).shape == (2, 3, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_matches_batchnorm2d_cuda():
    ours = SyncBatchNorm(3).cuda().double()
    ref = torch.nn.BatchNorm2d(3).cuda().double()
    inputs = [tuple(t.cuda() for t in _batch(s, (4, 3, 2, 3))) for s in (1, 2)]
    for a, b in zip(sum(_run_steps(ours, inputs), []), sum(_run_steps(ref, inputs), [])):
        _close(a, b)
    _close(ours.running_var, ref.running_var)


# --------------------------------------------------------------------------- two gloo processes
# shape of the whole batch, samples per rank, layer keywords, steps
CASES = [
    dict(shape=(4, 3, 2, 3), split=(3, 1), kwargs=dict(), steps=2),
    dict(shape=(4, 3, 2, 2), split=(4, 0), kwargs=dict(momentum=None), steps=2),
    dict(shape=(3, 4), split=(2, 1), kwargs=dict(affine=False), steps=2),
    dict(shape=(3, 2, 3), split=(0, 3), kwargs=dict(momentum=0.3), steps=1),
    dict(shape=(3, 2, 2, 1, 2), split=(1, 2), kwargs=dict(track_running_stats=False), steps=1),
    dict(shape=(0, 3, 2, 2), split=(0, 0), kwargs=dict(), steps=1),
]


def _case_inputs(case_id, case):
    return [_batch(100 * case_id + step, case['shape']) for step in range(case['steps'])]


def _rank_slice(case, rank):
    start = sum(case['split'][:rank])
    return slice(start, start + case['split'][rank])


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store_path}', rank=rank, world_size=WORLD)
    results = {}
    for case_id, case in enumerate(CASES):
        channels = case['shape'][1]
        bn = SyncBatchNorm(channels, **case['kwargs']).double()
        _init_like(bn, case_id, channels)
        sl = _rank_slice(case, rank)
        inputs = [(x[sl], g[sl]) for x, g in _case_inputs(case_id, case)]
        outs, grads = _run_steps(bn, inputs)
        bn.eval()
        eval_out = bn(_case_inputs(case_id, case)[0][0][sl])
        results[case_id] = dict(outs=outs, grads=grads, state=_state(bn), eval_out=eval_out.detach())

    # A single-member group is plain BN on the local slice (torch's SyncBatchNorm raises on CPU).
    own_groups = [dist.new_group([r]) for r in range(WORLD)]
    bn = SyncBatchNorm(3, process_group=own_groups[rank]).double()
    x, g = _batch(7, (4, 3, 2, 2))
    outs, grads = _run_steps(bn, [(x[2 * rank:2 * rank + 2], g[2 * rank:2 * rank + 2])])
    results['own_group'] = dict(outs=outs, grads=grads, state=_state(bn))

    # Under autocast the statistics stay float32 and the output keeps the input dtype.
    bn = SyncBatchNorm(3)
    x = _batch(8, (3, 3, 2, 2), torch.float32)[0]
    x = x[:2] if rank == 0 else x[2:]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = bn(x.bfloat16())
    results['autocast'] = dict(out=out.detach(), running_mean=bn.running_mean.clone(),
                               running_var=bn.running_var.clone())
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_match_single_process_batchnorm(tmp_path):
    spawn(_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=WORLD)
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD)]

    for case_id, case in enumerate(CASES):
        channels = case['shape'][1]
        ref = TORCH_BN[len(case['shape'])](channels, **case['kwargs']).double()
        _init_like(ref, case_id, channels)
        initial = {k: v.clone() for k, v in ref.state_dict().items()}
        inputs = _case_inputs(case_id, case)
        ref_outs, ref_grads = _run_steps(ref, inputs)
        ref.eval()
        ref_eval = ref(inputs[0][0])
        for step in range(case['steps']):
            msg = f'case {case_id} step {step}'
            _close(torch.cat([res[case_id]['outs'][step] for res in results]), ref_outs[step], msg)
            _close(torch.cat([res[case_id]['grads'][step] for res in results]), ref_grads[step], msg)
        if case['kwargs'].get('track_running_stats', True):
            # (Without running statistics eval mode uses local batch statistics, unsynced, like torch.)
            _close(torch.cat([res[case_id]['eval_out'] for res in results]), ref_eval, f'case {case_id}')
        ref_state = _state(ref)
        for key, value in ref_state.items():
            msg = f'case {case_id} {key}'
            if key.endswith('_grad'):
                # DDP sums (then averages) parameter gradients over ranks.
                _close(results[0][case_id]['state'][key] + results[1][case_id]['state'][key], value, msg)
            else:
                for res in results:
                    _close(res[case_id]['state'][key], value, msg)
        if case['shape'][0] == 0:
            for key in ('running_mean', 'running_var'):
                assert torch.equal(ref_state[key], initial[key])

    for rank, res in enumerate(results):
        ref = torch.nn.BatchNorm2d(3).double()
        x, g = _batch(7, (4, 3, 2, 2))
        ref_outs, ref_grads = _run_steps(ref, [(x[2 * rank:2 * rank + 2], g[2 * rank:2 * rank + 2])])
        _close(res['own_group']['outs'][0], ref_outs[0])
        _close(res['own_group']['grads'][0], ref_grads[0])
        for key, value in _state(ref).items():
            _close(res['own_group']['state'][key], value, msg=key)

    ref = torch.nn.BatchNorm2d(3)
    ref_out = ref(_batch(8, (3, 3, 2, 2), torch.float32)[0].bfloat16().float())
    out = torch.cat([res['autocast']['out'] for res in results])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)
    for res in results:
        assert res['autocast']['running_var'].dtype == torch.float32
        torch.testing.assert_close(res['autocast']['running_mean'], ref.running_mean)
        torch.testing.assert_close(res['autocast']['running_var'], ref.running_var)
