"""Shared parts of the checkpoint converters: reading, key checks, writing."""
import torch


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted exactly; the message names the key."""


def load_state_dict(path):
    """The ``{key: tensor}`` of a released file: a bare state_dict, or one under 'state_dict'/'model'."""
    # weights_only: the released files hold tensors (and plain containers) only; nothing to execute.
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ConversionError(f'{path}: expected a dict checkpoint, got {type(checkpoint).__name__}')
    for field in ('state_dict', 'model'):
        if isinstance(checkpoint.get(field), dict):
            return dict(checkpoint[field])
    return dict(checkpoint)


def save_state_dict(state_dict, path, meta=None):
    """Save as mmengine checkpoints are read: ``{'state_dict': ..., 'meta': ...}``."""
    torch.save({'state_dict': state_dict, 'meta': dict(meta or {})}, path)


def strip_prefix(state_dict, prefix):
    """Drop ``prefix`` from every key that has it (DataParallel's ``module.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def check_against_target(converted, target_state, fill=()):
    """Compare with a freshly built target's state_dict: every key and shape must agree.

    Keys of the target that the source cannot have (buffers only this package keeps, e.g. CBN's
    window) are listed in ``fill`` by their last name component and taken from ``target_state``.
    Returns the completed dict; raises ConversionError naming the first unknown, missing or
    mis-shaped key."""
    out = dict(converted)
    for key in converted:
        if key not in target_state:
            raise ConversionError(f'unknown key {key!r}: the target model has no such parameter or buffer')
    for key, value in target_state.items():
        if key not in out:
            if key.rsplit('.', 1)[-1] in fill:
                out[key] = value.clone()
                continue
            raise ConversionError(f'missing key {key!r}: the source checkpoint does not provide it')
        if tuple(out[key].shape) != tuple(value.shape):
            raise ConversionError(f'key {key!r}: shape {tuple(out[key].shape)} in the converted checkpoint, '
                                  f'{tuple(value.shape)} in the target model')
    return out
