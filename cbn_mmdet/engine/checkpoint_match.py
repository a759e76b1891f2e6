"""Refuse a checkpoint that does not belong to the model, before anything is built or written.

mmengine loads checkpoints with ``strict=False``: a Faster R-CNN checkpoint "loads" into a Mask R-CNN
(the mask head stays random), an R-18 one into an R-50 (every mismatching shape skipped with a log line),
and ``tools/test.py`` then writes metrics of random weights. Here the checkpoint is compared with the
model the config builds: missing keys, unexpected keys and shape mismatches raise a :class:`ConfigError`
naming the checkpoint and the first mismatching keys, unless partial loading is asked for explicitly.

One case stays a warning by design: a plain-BN checkpoint loaded into a CBN model (the same keys, CBN's
window buffers absent); the CBN layer's own loading policy starts the window empty.
"""
import os.path as osp
import warnings

import torch

from .config_checks import ConfigError

__all__ = ['read_checkpoint_state', 'checkpoint_mismatches', 'check_checkpoint_matches',
           'check_checkpoint_matches_config']

_SHOWN = 5      # keys listed per kind in the error message


def read_checkpoint_state(path):
    """The ``state_dict`` of a local checkpoint file; :class:`ConfigError` naming the file when it is not one.

    Loaded with ``weights_only=False``: only files the user named on the command line are read here.
    """
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise ConfigError(f'checkpoint {path!r} does not exist')
    if osp.getsize(path) == 0:
        raise ConfigError(f'checkpoint {path!r} is empty (0 bytes)')
    try:
        data = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as err:     # truncated zip, random bytes, a pickle of something else...
        reason = str(err).splitlines()[0][:160] if str(err) else ''
        raise ConfigError(f'checkpoint {path!r} is not a readable torch checkpoint (truncated or not a '
                          f'checkpoint): {type(err).__name__}: {reason}') from None
    state = data.get('state_dict', data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f'checkpoint {path!r} holds no state_dict of tensors (found {type(data).__name__}'
                          + (f' with keys {sorted(map(str, data))[:_SHOWN]}' if isinstance(data, dict) else '')
                          + ')')
    # mmengine strips the DDP wrapper's prefix when it loads; so do we.
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def checkpoint_mismatches(model, state):
    """``(missing, unexpected, shape_mismatches)`` of loading ``state`` into ``model``.

    Loads into ``model`` (non-strict) to let each layer apply its own policy: CBN accepts a plain-BN
    state (its window buffers are then not "missing") and sizes its conv-shaped buffers lazily. Pass a
    model built for the check only.
    """
    own = model.state_dict()
    # CBN's conv-shaped window parts before binding: 1-D and empty (a buffer_num=0 layer's (0, C) parts
    # are real shapes and compared)
    lazy = {k for k, v in own.items() if v.dim() == 1 and v.numel() == 0}
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
              if k in own and k not in lazy and tuple(v.shape) != tuple(own[k].shape)]
    mismatched = {k for k, _, _ in shapes}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = model.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    for warning in caught:         # e.g. "loaded a BN checkpoint into CBN": a warning by design
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    missing = [k for k in result.missing_keys if k not in mismatched]
    return missing, list(result.unexpected_keys), shapes


def _listing(keys):
    keys = list(keys)
    more = f' (+{len(keys) - _SHOWN} more)' if len(keys) > _SHOWN else ''
    return ', '.join(keys[:_SHOWN]) + more


def check_checkpoint_matches(model, path, *, allow_partial=False, what='checkpoint', log=None):
    """Raise :class:`ConfigError` unless the checkpoint at ``path`` fits ``model`` exactly.

    Args:
        model (nn.Module): a model built for the check (it is loaded into).
        path (str): the checkpoint file.
        allow_partial (bool): report the mismatches through ``log`` instead of raising.
        what (str): how the message names the checkpoint (``'--resume'``, ``'checkpoint'``).
    """
    missing, unexpected, shapes = checkpoint_mismatches(model, read_checkpoint_state(path))
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f'{len(missing)} model key(s) missing from it: {_listing(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} key(s) the model does not have: {_listing(unexpected)}')
    if shapes:
        parts.append(f'{len(shapes)} shape mismatch(es): ' +
                     _listing(f'{k} {tuple(c)} in the checkpoint vs {tuple(m)} in the model' for k, c, m in shapes))
    message = f'{what} {path!r} does not match the model of the config: ' + '; '.join(parts)
    if allow_partial:
        if log is not None:
            log(f'partial load (--allow-partial-load): {message}')
        return
    raise ConfigError(message + '. Is it the checkpoint of another model? (--allow-partial-load loads '
                      'what matches)')


def check_checkpoint_matches_config(cfg, path, **kwargs):
    """:func:`check_checkpoint_matches` against a fresh model built from ``cfg.model`` (mmdet registry)."""
    if '://' in str(path):        # remote checkpoints are not fetched twice
        return
    import copy

    from mmdet.registry import MODELS
    check_checkpoint_matches(MODELS.build(copy.deepcopy(cfg.model)), path, **kwargs)
