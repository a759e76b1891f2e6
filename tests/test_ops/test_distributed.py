"""Tests for cbn_mmdet.ops.distributed: world size helper and the differentiable weighted mean."""
import os

import pytest
import torch
import torch.distributed as dist

from cbn_mmdet.ops.distributed import get_world_size, sync_weighted_mean
from tests.dist_utils import spawn

WORLD = 2


# --------------------------------------------------------------------------- single process
def test_get_world_size_without_group():
    assert not dist.is_initialized()
    assert get_world_size() == 1
    assert get_world_size(None) == 1


def test_sync_weighted_mean_without_group_is_identity():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, 2)
    (ma, mb), total = sync_weighted_mean([a, b], 5)
    assert ma is a and mb is b
    assert total.dtype == torch.float32 and total.item() == 5.0
    (ma, ), total = sync_weighted_mean((a.double(), ), torch.tensor(7))
    assert total.dtype == torch.float64 and total.item() == 7.0


@pytest.mark.parametrize('tensors, error', [
    (torch.zeros(3), TypeError),
    ([], ValueError),
    ([torch.zeros(3), 1.0], TypeError),
    ([torch.zeros(3, dtype=torch.long)], TypeError),
])
def test_sync_weighted_mean_rejects_bad_tensors(tensors, error):
    with pytest.raises(error, match='tensors'):
        sync_weighted_mean(tensors, 1)


@pytest.mark.parametrize('count, error', [
    (-1, ValueError),
    ('3', TypeError),
    (True, TypeError),
    (torch.ones(2), ValueError),
])
def test_sync_weighted_mean_rejects_bad_count(count, error):
    with pytest.raises(error, match='count'):
        sync_weighted_mean([torch.zeros(3)], count)


# --------------------------------------------------------------------------- two gloo processes
def _stats(rank, case):
    """Deterministic per-rank statistics of one case (same on every process)."""
    gen = torch.Generator().manual_seed(100 * case + rank)
    a = torch.randn(3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    ga = torch.randn(3, generator=gen, dtype=torch.float64)
    gb = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    return a, b, ga, gb


# (count on rank 0, count on rank 1, count given as tensor?, rank 1 statistics are NaN?)
CASES = [
    (3, 1, False, False),
    (3.0, 1.0, True, False),
    (4, 0, False, True),   # empty rank with garbage statistics
    (0, 0, True, False),   # nothing anywhere
]


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store_path}', rank=rank, world_size=WORLD)
    calls = {'n': 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls['n'] += 1
        return real_all_reduce(*args, **kwargs)

    results = {'world_size': get_world_size()}
    dist.all_reduce = counting_all_reduce
    try:
        for case, (c0, c1, as_tensor, nan_on_1) in enumerate(CASES):
            a, b, ga, gb = _stats(rank, case)
            if nan_on_1 and rank == 1:
                a = torch.full_like(a, float('nan'))
            a.requires_grad_(True)
            b.requires_grad_(True)
            count = (c0, c1)[rank]
            if as_tensor:
                count = torch.tensor(count, dtype=torch.float64)
            before = calls['n']
            (ma, mb), total = sync_weighted_mean((a, b), count)
            fwd_calls = calls['n'] - before
            ((ma * ga).sum() + (mb * gb).sum()).backward()
            results[case] = dict(ma=ma.detach(), mb=mb.detach(), total=total, ga=a.grad, gb=b.grad,
                                 fwd_calls=fwd_calls, bwd_calls=calls['n'] - before - fwd_calls,
                                 total_grad=total.requires_grad)
    finally:
        dist.all_reduce = real_all_reduce
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.barrier()
    dist.destroy_process_group()


def test_sync_weighted_mean_two_ranks(tmp_path):
    spawn(_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=WORLD)
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD)]
    assert [res['world_size'] for res in results] == [WORLD, WORLD]
    for case, (c0, c1, _, _) in enumerate(CASES):
        counts = (float(c0), float(c1))
        total = sum(counts)
        stats = [_stats(r, case) for r in range(WORLD)]
        # Hand-derived: m = sum_r c_r t_r / C (empty ranks contribute nothing, zeros if C == 0).
        if total > 0:
            want_a = sum(counts[r] * stats[r][0] for r in range(WORLD) if counts[r] > 0) / total
            want_b = sum(counts[r] * stats[r][1] for r in range(WORLD) if counts[r] > 0) / total
        else:
            want_a, want_b = torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
        # dL/dt_r = (c_r / C) * sum_s dL_s/dm for L = sum_s <m, g_s>.
        g_a = stats[0][2] + stats[1][2]
        g_b = stats[0][3] + stats[1][3]
        for rank, res in enumerate(results):
            got = res[case]
            msg = f'case {case} rank {rank}'
            assert got['fwd_calls'] == 1 and got['bwd_calls'] == 1, msg
            assert got['total'].item() == total and not got['total_grad'], msg
            torch.testing.assert_close(got['ma'], want_a, rtol=1e-12, atol=1e-12, msg=msg)
            torch.testing.assert_close(got['mb'], want_b, rtol=1e-12, atol=1e-12, msg=msg)
            share = counts[rank] / total if total > 0 else 0.0
            torch.testing.assert_close(got['ga'], share * g_a, rtol=1e-12, atol=1e-12, msg=msg)
            torch.testing.assert_close(got['gb'], share * g_b, rtol=1e-12, atol=1e-12, msg=msg)
