"""Save and restore the random number generators of every rank with each checkpoint, so a resumed run is
bitwise identical to an uninterrupted one.

mmengine restores the model, the optimizer, the schedulers and the data sampler's epoch on resume, but
not the global RNG states; mmdet's RoI samplers (and any random augmentation) draw from them, so without
this hook the iterations after a resume differ from those of an uninterrupted run. Each rank's generators
differ (mmengine seeds rank ``r`` with ``seed + r`` under ``diff_rank_seed``, and they diverge anyway as
each rank samples its own RoIs), so the hook all-gathers them: ``checkpoint['rng_state']`` is a list
indexed by rank, and on resume rank ``r`` restores entry ``r``.

Where the gather happens: mmengine calls ``before_save_checkpoint`` on rank 0 only (``Runner.save_checkpoint``
is ``master_only``), so a collective there would hang. Every caller of ``runner.save_checkpoint`` (the
``CheckpointHook``: periodic, last and best checkpoints) calls it on every rank, though; in a multi-process
run the hook therefore wraps the runner's ``save_checkpoint`` (at ``before_train``) with the all-gather, and
``before_save_checkpoint`` stores what it gathered. Code that calls ``runner.save_checkpoint`` on rank 0
alone would hang in that gather, as it would in any other collective.

A resume with another world size than the checkpoint's cannot continue the same random streams (nor the
same data split): the hook then logs one warning and leaves the generators as they are (seeded by the
new run), instead of handing some ranks another rank's stream. A checkpoint written before states were
saved per rank (a single dict: rank 0's) counts as a world size of 1.
"""
import functools
import random

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import Hook

__all__ = ['RNGStateHook', 'rng_states', 'set_rng_states']


def rng_states():
    """This process's python, numpy, torch (and, once CUDA is initialised, every CUDA device's) RNG states."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state):
    """Restore what :func:`rng_states` returned."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class RNGStateHook(Hook):
    """Store every rank's python/numpy/torch (and CUDA) RNG states in ``checkpoint['rng_state']`` (a list
    indexed by rank); on resume rank ``r`` restores entry ``r``. A world-size change warns and restores
    nothing (module doc)."""

    priority = 'VERY_LOW'

    def __init__(self):
        self._gathered = None

    def before_train(self, runner):
        if get_world_size() == 1 or getattr(runner.save_checkpoint, '_gathers_rng_states', False):
            return
        save_checkpoint = runner.save_checkpoint

        @functools.wraps(save_checkpoint)
        def gathering_save_checkpoint(*args, **kwargs):
            self._gathered = all_gather_object(rng_states())      # every rank: [rank 0's, rank 1's, ...]
            try:
                return save_checkpoint(*args, **kwargs)            # master_only: rank 0 writes
            finally:
                self._gathered = None

        gathering_save_checkpoint._gathers_rng_states = True
        runner.save_checkpoint = gathering_save_checkpoint

    def before_save_checkpoint(self, runner, checkpoint):
        if get_world_size() == 1:
            checkpoint['rng_state'] = [rng_states()]
        elif self._gathered is not None:
            checkpoint['rng_state'] = self._gathered
        else:
            runner.logger.warning('RNGStateHook: runner.save_checkpoint was called before before_train, so the '
                                  'other ranks\' RNG states were not gathered; no rng_state saved')

    def after_load_checkpoint(self, runner, checkpoint):
        states = checkpoint.get('rng_state')
        if states is None:
            runner.logger.warning('RNGStateHook: the checkpoint has no rng_state; the run will not be '
                                  'bitwise identical to an uninterrupted one')
            return
        if isinstance(states, dict):          # written before the per-rank format: rank 0's states only
            states = [states]
        world_size = get_world_size()
        if len(states) != world_size:
            runner.logger.warning(f'RNGStateHook: the checkpoint holds the RNG states of {len(states)} rank(s), '
                                  f'this run has world_size={world_size}; RNG states not restored (the run '
                                  'continues with its own seeds, not bitwise identical to an uninterrupted one)')
            return
        set_rng_states(states[get_rank()])
