"""RNGStateHook: every rank's RNG states saved (a list indexed by rank) and each rank's restored on resume
(2 gloo processes); a world-size change, an old single-state checkpoint and a missing state (1 process)."""
import os
import random
import types

import numpy as np
import torch
import torch.distributed as dist
from mmengine.dist import master_only

from cbn_mmdet.engine.hooks.rng_state_hook import RNGStateHook, rng_states
from tests.dist_utils import spawn

WORLD = 2


def _draws():
    return [random.random(), float(np.random.rand()), torch.rand(3)]


def _seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _expected_continuation(seed):
    """Oracle: what an uninterrupted process seeded with ``seed`` draws after its first three draws."""
    _seed(seed)
    _draws()
    return _draws()


class _Runner:
    """Calls the hook the way mmengine's Runner does: ``save_checkpoint`` is ``master_only`` and calls
    ``before_save_checkpoint`` on rank 0 only; resuming calls ``after_load_checkpoint`` on every rank."""

    def __init__(self, hook, path):
        self.hook, self.path, self.warnings = hook, path, []
        self.logger = types.SimpleNamespace(warning=self.warnings.append)

    @master_only
    def save_checkpoint(self):
        checkpoint = {'meta': {}}
        self.hook.before_save_checkpoint(self, checkpoint)
        torch.save(checkpoint, self.path)

    def resume(self):
        checkpoint = torch.load(self.path, weights_only=False)
        self.hook.after_load_checkpoint(self, checkpoint)
        return checkpoint


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store_path}', rank=rank, world_size=WORLD)
    _seed(10 + rank)                              # mmengine's diff_rank_seed: seed + rank
    _draws()
    hook = RNGStateHook()
    runner = _Runner(hook, os.path.join(out_dir, 'ckpt.pth'))
    hook.before_train(runner)
    runner.save_checkpoint()
    dist.barrier()                                # the file is written before anyone reads it
    uninterrupted = _draws()
    _seed(999)                                    # a fresh process's seeds
    checkpoint = runner.resume()
    resumed = _draws()
    torch.save(dict(uninterrupted=uninterrupted, resumed=resumed, states=len(checkpoint['rng_state']),
                    warnings=runner.warnings), os.path.join(out_dir, f'rank{rank}.pt'))
    dist.barrier()
    dist.destroy_process_group()


def test_each_rank_resumes_its_own_streams(tmp_path):
    spawn(_worker, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=WORLD)
    results = [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(WORLD)]
    for rank, res in enumerate(results):
        expected = _expected_continuation(10 + rank)
        assert res['states'] == WORLD and res['warnings'] == []
        for got in (res['uninterrupted'], res['resumed']):
            assert got[:2] == expected[:2], rank
            torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)
    assert results[0]['resumed'][:2] != results[1]['resumed'][:2]     # rank 1 did not get rank 0's streams


def _single_process_runner(tmp_path):
    hook = RNGStateHook()
    runner = _Runner(hook, str(tmp_path / 'ckpt.pth'))
    hook.before_train(runner)
    return hook, runner


def test_single_process_saves_a_one_entry_list_and_restores_it(tmp_path):
    _, runner = _single_process_runner(tmp_path)
    _seed(3)
    runner.save_checkpoint()
    expected = _draws()
    _seed(4)
    assert len(runner.resume()['rng_state']) == 1
    assert _draws()[:2] == expected[:2] and runner.warnings == []


def test_world_size_change_warns_and_restores_nothing(tmp_path):
    hook, runner = _single_process_runner(tmp_path)
    _seed(5)
    states = [rng_states(), rng_states()]          # as written by a 2-process run
    expected = _expected_continuation(6)
    _seed(6)
    _draws()
    hook.after_load_checkpoint(runner, {'rng_state': states})
    assert _draws()[:2] == expected[:2]             # the run's own streams go on
    assert runner.warnings == [
        'RNGStateHook: the checkpoint holds the RNG states of 2 rank(s), this run has world_size=1; RNG states '
        'not restored (the run continues with its own seeds, not bitwise identical to an uninterrupted one)']


def test_old_single_state_checkpoint_and_missing_state(tmp_path):
    hook, runner = _single_process_runner(tmp_path)
    expected = _expected_continuation(7)
    _seed(7)
    _draws()
    old = rng_states()                               # the format before per-rank states: one dict
    _seed(8)
    hook.after_load_checkpoint(runner, {'rng_state': old})
    assert _draws()[:2] == expected[:2] and runner.warnings == []
    hook.after_load_checkpoint(runner, {})
    assert len(runner.warnings) == 1 and 'has no rng_state' in runner.warnings[0]
