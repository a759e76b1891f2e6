"""One training run per work_dir: a second run into a work_dir a live run holds is refused.

Two runs in one work_dir interleave one log and ``scalars.json`` and overwrite each other's checkpoints.
The lock is ``fcntl.flock`` on ``<work_dir>/.cbn_mmdet_train.lock``, held by the training process (rank 0
of a distributed run) while it trains. The kernel drops a flock when its process exits in any way, so a
crashed or killed run never leaves the work_dir stuck; the file itself (holding the pid) may stay.
"""
import contextlib
import os
import os.path as osp

from .config_checks import ConfigError

__all__ = ['LOCK_FILE', 'WorkDirBusy', 'work_dir_lock']

LOCK_FILE = '.cbn_mmdet_train.lock'


class WorkDirBusy(ConfigError):
    """Another live process holds the work_dir's lock."""


def _holder(path):
    try:
        with open(path) as f:
            return f.read().strip() or 'unknown'
    except OSError:
        return 'unknown'


@contextlib.contextmanager
def work_dir_lock(work_dir):
    """Hold the work_dir's lock for the block; raise :class:`WorkDirBusy` (naming the pid) if it is held.

    Creates ``work_dir`` if needed. On platforms without ``fcntl`` the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:     # pragma: no cover - not POSIX
        yield None
        return
    os.makedirs(work_dir, exist_ok=True)
    path = osp.join(work_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkDirBusy(f'work_dir {work_dir!r} is in use by another training run (pid {_holder(path)}, '
                              f'lock {path}); wait for it to end or use another --work-dir') from None
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        yield path
    finally:
        os.close(fd)      # releases the flock
