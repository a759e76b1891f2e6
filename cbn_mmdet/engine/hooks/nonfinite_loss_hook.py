"""Stop training, naming the iteration and the loss terms, when losses become NaN/Inf.

Without it a run whose loss turned NaN trains on to the last epoch (the weights are NaN after the first
such step with plain SGD) and exits 0. ``tools/train.py`` adds this hook to every run (like
``RNGStateHook``); ``--allow-nonfinite-loss`` leaves it out.
"""
import math

import torch
from mmengine.hooks import Hook

__all__ = ['NonFiniteLossHook']


def _loss_terms(outputs):
    """``{name: scalar tensor/float}`` of the loss entries of a train step's ``log_vars``."""
    if not isinstance(outputs, dict):
        return {}
    return {k: v for k, v in outputs.items() if isinstance(k, str) and k.startswith('loss')
            and (torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (int, float)))}


class NonFiniteLossHook(Hook):
    """Raise ``FloatingPointError`` after ``max_nonfinite`` training iterations with a non-finite loss.

    Args:
        max_nonfinite (int): how many iterations with a NaN/Inf loss (in total) are tolerated before
            stopping; the default 1 stops at the first one.
    """

    priority = 'ABOVE_NORMAL'    # before the checkpoint hook saves NaN weights of the same iteration

    def __init__(self, max_nonfinite=1):
        if not isinstance(max_nonfinite, int) or isinstance(max_nonfinite, bool) or max_nonfinite < 1:
            raise ValueError(f'NonFiniteLossHook: max_nonfinite must be an int >= 1, got {max_nonfinite!r}')
        self.max_nonfinite = max_nonfinite
        self.seen = []       # (iteration, {term: value}) of the non-finite iterations so far

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        terms = _loss_terms(outputs)
        if not terms:
            return
        # one host read for all terms (the logger reads them anyway)
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32).detach().cpu().reshape(())
                              for v in terms.values()]).tolist()
        bad = {k: v for k, v in zip(terms, values) if not math.isfinite(v)}
        if not bad:
            return
        iteration = runner.iter + 1
        self.seen.append((iteration, bad))
        shown = ', '.join(f'{k}={v}' for k, v in bad.items())
        message = (f'NonFiniteLossHook: non-finite loss at iteration {iteration} (epoch {runner.epoch + 1}): '
                   f'{shown}')
        if len(self.seen) >= self.max_nonfinite:
            first = self.seen[0][0]
            raise FloatingPointError(
                f'{message}; {len(self.seen)} non-finite iteration(s) (first: {first}, max_nonfinite='
                f'{self.max_nonfinite}): stopping. Lower the learning rate, check the data, or add '
                "NormHealthHook to find the layer (tools/train.py --allow-nonfinite-loss disables this check)")
        runner.logger.warning(f'{message} ({len(self.seen)} of max_nonfinite={self.max_nonfinite})')
