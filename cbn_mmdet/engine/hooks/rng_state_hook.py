"""Save and restore the random number generators with each checkpoint, so a resumed run is bitwise
identical to an uninterrupted one.

mmengine restores the model, the optimizer, the schedulers and the data sampler's epoch on resume, but
not the global RNG states; mmdet's RoI samplers (and any random augmentation) draw from them, so without
this hook the iterations after a resume differ from those of an uninterrupted run.
"""
import random

import numpy as np
import torch
from mmengine.hooks import Hook


class RNGStateHook(Hook):
    """Store python/numpy/torch (and CUDA) RNG states in ``checkpoint['rng_state']``; restore on resume."""

    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint):
        state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint['rng_state'] = state

    def after_load_checkpoint(self, runner, checkpoint):
        state = checkpoint.get('rng_state')
        if state is None:
            runner.logger.warning('RNGStateHook: the checkpoint has no rng_state; the run will not be '
                                  'bitwise identical to an uninterrupted one')
            return
        random.setstate(state['python'])
        np.random.set_state(state['numpy'])
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])
