"""torch DDP on CPU (gloo) accepts a model holding our SyncBatchNorm (torch refuses any nn.SyncBatchNorm in a
CPU module: its forward needs CUDA; ours synchronises on CPU itself), and trains it exactly like BN on the
concatenated batch; torch's own SyncBatchNorm stays refused."""
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.multiprocessing import spawn
from torch.nn.parallel import DistributedDataParallel

from cbn_mmdet.ops import SyncBatchNorm

WORLD, STEPS = 2, 3


def _model(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), norm(4)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(STEPS)]


def _train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=WORLD)
    ddp = DistributedDataParallel(_model(SyncBatchNorm))
    _train(ddp, [x[2 * rank:2 * rank + 2] for x in _batches()])
    refused = None
    try:
        DistributedDataParallel(_model(nn.SyncBatchNorm))
    except ValueError as exc:
        refused = str(exc)
    torch.save(dict(state=ddp.module.state_dict(), refused=refused), os.path.join(out_dir, f'rank{rank}.pt'))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_on_cpu_trains_our_sync_bn_like_bn_on_the_whole_batch(tmp_path):
    spawn(_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=WORLD)
    ref = _model(nn.BatchNorm2d)
    _train(ref, _batches())     # the mean loss over the whole batch = DDP's average of the per-rank means
    for rank in range(WORLD):
        result = torch.load(tmp_path / f'rank{rank}.pt')
        assert result['refused'] == 'SyncBatchNorm layers only work with GPU modules'
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(result['state'][key], value, rtol=1e-10, atol=1e-12, msg=key)
