"""SyncCBN with 2 gloo processes equals one process running CBN on the concatenated batch."""
import torch
import torch.distributed as dist
import torch.nn as nn

from cbn_mmdet.ops import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d, bind_cbn_to_conv
from tests.dist_utils import spawn

WORLD = 2
SPLITS = [(3, 1), (2, 2), (1, 3), (2, 0), (3, 1), (1, 2)]   # samples per rank at each iteration
DT = torch.float64


def _model(sync):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=False).to(DT)
    cls = SyncCrossIterationBatchNorm2d if sync else CrossIterationBatchNorm2d
    cbn = cls(4, buffer_num=2, burnin=1).to(DT)
    bind_cbn_to_conv(cbn, conv)
    return conv, cbn


def _batches():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(sum(s), 3, 6, 6, generator=gen, dtype=DT) * 2 + 1 for s in SPLITS]
    probes = [torch.randn(sum(s), 4, 3, 3, generator=gen, dtype=DT) for s in SPLITS]
    return xs, probes


def _train(conv, cbn, xs, probes, rank=None):
    """SGD on the summed loss; under DDP-like sync the weight gradients are summed over ranks."""
    record = []
    for it, (x, probe) in enumerate(zip(xs, probes)):
        if rank is not None:
            start = sum(SPLITS[it][:rank])
            x, probe = x[start:start + SPLITS[it][rank]], probe[start:start + SPLITS[it][rank]]
        x = x.clone().requires_grad_()
        out = cbn(conv(x))
        (out * probe).sum().backward()
        grads = [conv.weight.grad, cbn.weight.grad, cbn.bias.grad]
        if rank is not None:
            for g in grads:
                dist.all_reduce(g)
        record.append(dict(out=out.detach(), x_grad=x.grad, w_grad=conv.weight.grad.clone(),
                           running_mean=cbn.running_mean.clone(), running_var=cbn.running_var.clone(),
                           window_mean=cbn.window_mean.clone(), window_sq=cbn.window_sq.clone()))
        with torch.no_grad():
            for p in (conv.weight, cbn.weight, cbn.bias):
                p -= 0.2 * p.grad
                p.grad = None
    return record


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=WORLD)
    try:
        conv, cbn = _model(sync=True)
        xs, probes = _batches()
        torch.save(_train(conv, cbn, xs, probes, rank=rank), f'{out_dir}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_single_process_on_concatenated_batch(tmp_path):
    spawn(_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD)]
    conv, cbn = _model(sync=False)
    xs, probes = _batches()
    expected = _train(conv, cbn, xs, probes)
    tol = dict(rtol=1e-9, atol=1e-10)
    for it, exp in enumerate(expected):
        got_out = torch.cat([r[it]['out'] for r in ranks])
        got_xgrad = torch.cat([r[it]['x_grad'] for r in ranks])
        torch.testing.assert_close(got_out, exp['out'], **tol, msg=f'output, iter {it}')
        torch.testing.assert_close(got_xgrad, exp['x_grad'], **tol, msg=f'input grad, iter {it}')
        for r in ranks:
            for key in ('w_grad', 'running_mean', 'running_var', 'window_mean', 'window_sq'):
                torch.testing.assert_close(r[it][key], exp[key], **tol, msg=f'{key}, iter {it}')


def _collective_worker(rank, store, out_dir):
    """Ranks in different rank-local states (burn-in counter, empty batch) issue the same collectives."""
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=WORLD)
    calls = []
    real = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        conv, cbn = _model(sync=True)
        cbn.set_iteration(0 if rank == 0 else 5)       # rank 0 in its burn-in, rank 1 past it
        per_step = []
        for step in range(3):
            n = 0 if (rank == 1 and step == 1) else 2  # an empty batch on one rank
            x = torch.randn(n, 3, 6, 6, dtype=DT, requires_grad=True)
            before = len(calls)
            cbn(conv(x)).sum().backward()
            per_step.append(calls[before:])
        torch.save(per_step, f'{out_dir}/calls{rank}.pt')
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


def test_collectives_do_not_depend_on_rank_local_state(tmp_path):
    spawn(_collective_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=WORLD)
    calls = [torch.load(tmp_path / f'calls{r}.pt') for r in range(WORLD)]
    assert calls[0] == calls[1]          # same number, order and sizes at every step
    assert all(len(step) >= 3 for step in calls[0])   # moments, slopes, and the backward all-reduce
