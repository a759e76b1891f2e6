"""Loading the checkpoints our own runs wrote, under torch>=2.6 and mmengine 0.10.

torch 2.6 changed ``torch.load``'s default to ``weights_only=True``. mmengine 0.10.x calls
``torch.load(filename, map_location=...)`` without the argument, and its checkpoints hold more than
tensors (the message hub's ``HistoryBuffer`` objects with numpy arrays, the config text, numpy scalars),
so ``--resume`` and ``tools/test.py CKPT`` fail with an ``UnpicklingError``.

The fix is deliberately narrow: inside ``trusted_checkpoints(paths, dirs)`` the *local-file* loader of
mmengine's ``CheckpointLoader`` loads with ``weights_only=False`` only files the user named (``--resume
CKPT``, the test checkpoint, ``load_from``) or files inside the run's own work_dir (auto-resume finds its
latest checkpoint there). Every other file — a pretrained backbone named in an ``init_cfg``, say —
keeps torch's safe default, and remote schemes (``http://``, ``s3://``...) are untouched. On exit the
original loader is restored.
"""
import contextlib
import os
import os.path as osp

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ['trusted_checkpoints', 'load_trusted_checkpoint']

_LOCAL_PREFIX = ''     # mmengine registers the local-file loader under the empty prefix


def _real(path):
    return osp.realpath(osp.expanduser(str(path)))


def load_trusted_checkpoint(filename, map_location=None):
    """``torch.load`` a local checkpoint that we trust (written by our own runs): full unpickling."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return torch.load(filename, map_location=map_location, weights_only=False)


@contextlib.contextmanager
def trusted_checkpoints(paths=(), dirs=()):
    """Within the block, local checkpoints in ``paths`` or under ``dirs`` load with ``weights_only=False``.

    Args:
        paths (iterable[str]): checkpoint files named by the user (``None`` entries are ignored).
        dirs (iterable[str]): directories whose checkpoints are ours (the run's work_dir).
    """
    trusted_files = {_real(p) for p in paths if p}
    trusted_dirs = [_real(d) for d in dirs if d]
    original = CheckpointLoader._schemes.get(_LOCAL_PREFIX)
    if original is None:   # pragma: no cover - mmengine always registers it
        raise RuntimeError("mmengine's CheckpointLoader has no local-file loader to wrap")

    def is_trusted(filename):
        real = _real(filename)
        return real in trusted_files or any(real.startswith(d + os.sep) for d in trusted_dirs)

    def load_local(filename, map_location):
        if is_trusted(filename):
            print_log(f'loading trusted local checkpoint {filename} with weights_only=False',
                      logger='current')
            return load_trusted_checkpoint(filename, map_location)
        return original(filename, map_location)

    CheckpointLoader.register_scheme(_LOCAL_PREFIX, load_local, force=True)
    try:
        yield is_trusted
    finally:
        CheckpointLoader.register_scheme(_LOCAL_PREFIX, original, force=True)
