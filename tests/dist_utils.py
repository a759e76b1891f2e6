"""Spawning gloo worker processes in tests without risking a hung CI run."""
import time

import pytest
import torch.multiprocessing as mp


def spawn(fn, args=(), nprocs=2, timeout=240):
    """``mp.spawn(fn, args, nprocs)`` that fails the test (and kills the workers) after ``timeout`` s."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method='spawn')
    deadline = time.monotonic() + timeout
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f'{getattr(fn, "__name__", fn)}: {nprocs} worker processes did not finish within {timeout} s')
