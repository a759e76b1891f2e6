"""Official ``MABN2d`` state -> our ``MovingAverageBatchNorm2d`` (``MABN``).

Official buffers per layer ``P``: ``P.running_var`` of shape ``(1, C, 1, 1)``, ``P.buffer_x2`` and
``P.buffer_gz`` of shape ``(K, C)`` (``K = real_B / B``), ``P.iters`` (the training-forward counter),
``P.weight``/``P.bias`` (``(1, C, 1, 1)`` or ``(C,)``), and no ``running_mean``. Ours are a ``_BatchNorm``:
``(C,)`` parameters and ``running_var``, an all-zero ``running_mean`` (MABN subtracts no mean), a 0-d
``iters`` and ``num_batches_tracked`` (training steps, = ``iters``). Every other key (convs, heads) is
copied unchanged; the moving-average buffers are copied too, so a converted model also resumes training.
"""
import torch

from .common import ConversionError, strip_prefix

_OFFICIAL = ('weight', 'bias', 'running_var', 'buffer_x2', 'buffer_gz', 'iters')


def convert_mabn(state_dict):
    """Official MABN model state_dict -> ours (MABN layers found by their ``buffer_x2`` key)."""
    source = strip_prefix(state_dict, 'module.')
    prefixes = sorted(k[:-len('.buffer_x2')] for k in source if k.endswith('.buffer_x2'))
    if not prefixes:
        raise ConversionError('no key ending in .buffer_x2: not an official MABN checkpoint')
    layer_keys = {f'{p}.{n}' for p in prefixes for n in _OFFICIAL}
    out = {k: v.clone() for k, v in source.items() if k not in layer_keys}
    for key in out:
        prefix = key.rsplit('.', 1)[0]
        if prefix in prefixes:    # e.g. a running_mean: the official layer has none
            raise ConversionError(f'unknown key {key!r} in an official MABN layer')
    for prefix in prefixes:
        out.update(_convert_layer(source, prefix))
    return out


def _convert_layer(source, prefix):
    for name in _OFFICIAL:
        if f'{prefix}.{name}' not in source:
            raise ConversionError(f'missing key {prefix + "." + name!r} in the official MABN checkpoint')
    running_var = source[f'{prefix}.running_var']
    channels = running_var.numel()
    if tuple(running_var.shape) not in ((1, channels, 1, 1), (channels,)):
        raise ConversionError(f'key {prefix + ".running_var"!r}: expected shape (1, C, 1, 1), '
                              f'got {tuple(running_var.shape)}')
    out = {}
    for name in ('weight', 'bias', 'running_var'):
        value = source[f'{prefix}.{name}']
        if value.numel() != channels:
            raise ConversionError(f'key {prefix + "." + name!r}: {value.numel()} values for {channels} channels')
        out[f'{prefix}.{name}'] = value.reshape(channels).clone()
    for name in ('buffer_x2', 'buffer_gz'):
        value = source[f'{prefix}.{name}']
        if value.dim() != 2 or value.shape[1] != channels:
            raise ConversionError(f'key {prefix + "." + name!r}: expected shape (K, {channels}), '
                                  f'got {tuple(value.shape)}')
        out[f'{prefix}.{name}'] = value.clone()
    iters = source[f'{prefix}.iters']
    if iters.numel() != 1:
        raise ConversionError(f'key {prefix + ".iters"!r}: expected one counter, got shape {tuple(iters.shape)}')
    out[f'{prefix}.iters'] = iters.reshape(()).long().clone()
    out[f'{prefix}.num_batches_tracked'] = iters.reshape(()).long().clone()
    out[f'{prefix}.running_mean'] = torch.zeros(channels, dtype=running_var.dtype)
    return out
