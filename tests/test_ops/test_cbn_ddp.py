"""Plain CBN under DistributedDataParallel (2 gloo processes): per-process windows stay consistent."""
import gc

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from cbn_mmdet.ops import CrossIterationBatchNorm2d
from tests.dist_utils import spawn

WORLD = 2


def _worker(rank, store, out_dir, broadcast_buffers):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=WORLD)
    try:
        _train_and_save(rank, out_dir, broadcast_buffers)
    finally:
        # The DDP reducer must be gone before its process group: destroying the group first can
        # deadlock gloo's teardown (it joins a thread that waits for the GIL).
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _train_and_save(rank, out_dir, broadcast_buffers):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), CrossIterationBatchNorm2d(4, buffer_num=2),
                          nn.ReLU())
    ddp = DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)   # binds at first forward
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)       # each rank its own data
    for _ in range(4):
        opt.zero_grad()
        ddp(torch.randn(2, 3, 6, 6, generator=gen, requires_grad=True)).sum().backward()
        opt.step()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f'{out_dir}/rank{rank}.pt')
    # after an explicit broadcast (what DDP / SyncBuffersHook do) every buffer is identical
    for buf in model.buffers():
        dist.broadcast(buf, 0)
    ddp(torch.randn(2, 3, 6, 6, generator=gen, requires_grad=True)).sum().backward()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f'{out_dir}/rank{rank}_after.pt')


def _run(tmp_path, broadcast_buffers):
    tmp_path.mkdir(parents=True, exist_ok=True)
    spawn(_worker, args=(str(tmp_path / 'store'), str(tmp_path), broadcast_buffers), nprocs=WORLD)
    return [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD)], \
        [torch.load(tmp_path / f'rank{r}_after.pt') for r in range(WORLD)]


def test_per_process_windows(tmp_path):
    states, after = _run(tmp_path, broadcast_buffers=False)
    a, b = states
    # same weights on every rank (DDP), same ring position and fill; statistics are each rank's own
    for key in ('1.window_weight', '1.window_head', '1.window_filled', '1.iter_count', '0.weight'):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a['1.window_mean'], b['1.window_mean'])
    assert int(a['1.window_filled'].sum()) == 2
    # after a broadcast of the buffers, the next step keeps shapes and ring positions consistent
    assert torch.equal(after[0]['1.window_head'], after[1]['1.window_head'])
    assert torch.equal(after[0]['1.window_weight'], after[1]['1.window_weight'])


def test_broadcast_buffers_keeps_every_rank_its_own_window(tmp_path):
    """torch DDP with broadcast_buffers=True overwrites buffers with rank 0's before each forward; the
    CBN window must stay each rank's own: the same window as without buffer broadcasting."""
    per_rank, _ = _run(tmp_path / 'local', broadcast_buffers=False)
    broadcast, _ = _run(tmp_path / 'bcast', broadcast_buffers=True)
    for rank in range(WORLD):
        for key in ('1.window_mean', '1.window_sq', '1.window_sq_grad', '1.window_mean_grad', '1.window_weight',
                    '1.window_head', '1.window_filled'):
            assert torch.equal(per_rank[rank][key], broadcast[rank][key]), (rank, key)
    a, b = broadcast
    assert not torch.equal(a['1.window_mean'][0], b['1.window_mean'][0])
    assert not torch.equal(a['1.window_mean'][1], b['1.window_mean'][1])
    assert int(a['1.window_filled'].sum()) == 2
