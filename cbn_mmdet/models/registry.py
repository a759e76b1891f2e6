"""The one place that puts cbn_mmdet's layers, convs and hooks into mmengine's root registries.

mmcv 2.x ``build_norm_layer``/``build_conv_layer`` look ``type`` up in ``mmengine.registry.MODELS``
(falling back to it from mmdet's child registry), and mmengine builds ``custom_hooks`` from
``mmengine.registry.HOOKS``; registering in the roots makes every name usable from any scope:
``norm_cfg=dict(type='CBN', buffer_num=3)``, ``conv_cfg=dict(type='WSConv')``,
``custom_hooks=[dict(type='CBNBurnInHook', burnin_epochs=8)]``.

``SyncBN`` deliberately *replaces* mmcv's registration (which is ``torch.nn.SyncBatchNorm`` itself) by
our subclass: on CUDA it runs torch's own code, so mmdet configs behave exactly as before; in addition
it works on CPU (one process = BN, several gloo processes all-reduce), which torch's refuses. mmcv's
class stays reachable as ``type='TorchSyncBN'``.

The name lists other code needs (which types are CBN, which synchronise over processes, which a
``sync_bn`` conversion would erase) are derived from these tables, so a new layer is declared once.
"""
import torch.nn as nn
from mmengine.registry import HOOKS, MODELS

from ..engine.hooks import (
    CBNBurnInHook,
    MABNGradScalerHook,
    NonFiniteLossHook,
    NormHealthHook,
    PreciseBNHook,
    RNGStateHook,
)
from ..ops import (
    BatchChannelNorm2d,
    BatchRenorm2d,
    CenteredConv2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    SyncBatchNorm,
    SyncCrossIterationBatchNorm2d,
    WeightStandardizedConv2d,
)

__all__ = ['NORM_LAYERS', 'CONV_LAYERS', 'HOOK_TYPES', 'CBN_TYPES', 'SYNC_NORM_TYPES', 'NOT_SYNCBN_CONVERTIBLE',
           'MABN_TYPES', 'register_all']

NORM_LAYERS = {
    'CBN': CrossIterationBatchNorm2d,
    'SyncCBN': SyncCrossIterationBatchNorm2d,
    'SyncBN': SyncBatchNorm,
    'TorchSyncBN': nn.SyncBatchNorm,
    'BCN': BatchChannelNorm2d,
    'MABN': MovingAverageBatchNorm2d,
    'BRN': BatchRenorm2d,
}
CONV_LAYERS = {
    'WSConv': WeightStandardizedConv2d,
    'CenConv': CenteredConv2d,
}
HOOK_TYPES = {
    'CBNBurnInHook': CBNBurnInHook,
    'MABNGradScalerHook': MABNGradScalerHook,
    'NonFiniteLossHook': NonFiniteLossHook,
    'NormHealthHook': NormHealthHook,
    'PreciseBNHook': PreciseBNHook,
    'RNGStateHook': RNGStateHook,
}
# Names we take over from mmcv on purpose (see the module docstring); any other clash is an error.
_REPLACES_MMCV = {'SyncBN'}
# mmcv's own synchronised BN (not ours, so not in the tables above).
_MMCV_SYNC_TYPES = ('MMSyncBN',)

# Norm types that are cross-iteration BN (need the conv that feeds them; burn-in applies).
CBN_TYPES = tuple(n for n, cls in NORM_LAYERS.items() if issubclass(cls, CrossIterationBatchNorm2d))
# Norm types whose moving averages assume B images per process (checked against the dataloader).
MABN_TYPES = tuple(n for n, cls in NORM_LAYERS.items() if issubclass(cls, MovingAverageBatchNorm2d))
# Norm types that synchronise statistics over a process group.
SYNC_NORM_TYPES = tuple(n for n, cls in NORM_LAYERS.items()
                        if issubclass(cls, (nn.SyncBatchNorm, SyncCrossIterationBatchNorm2d))) + _MMCV_SYNC_TYPES
# Our norm types whose algorithm a conversion to plain SyncBN (``cfg.sync_bn``) would silently discard.
NOT_SYNCBN_CONVERTIBLE = tuple(n for n, cls in NORM_LAYERS.items() if not issubclass(cls, nn.SyncBatchNorm))


def _same_class(a, b):
    # The same file imported under two module paths gives two class objects with one qualified name.
    return a is b or (getattr(a, '__qualname__', None) == getattr(b, '__qualname__', None)
                      and getattr(a, '__module__', '').endswith(getattr(b, '__module__', '').split('.')[-1]))


def _register(registry, table, replaces=()):
    for name, cls in table.items():
        existing = registry.module_dict.get(name)
        if existing is not None and not _same_class(existing, cls) and name not in replaces:
            raise KeyError(f'cbn_mmdet: {registry.name} already has type={name!r} registered as '
                           f'{existing.__module__}.{existing.__qualname__}; refusing to shadow it')
        registry.register_module(name=name, module=cls, force=True)


def register_all():
    """Register every table above (idempotent; refuses to shadow a foreign class of the same name)."""
    _register(MODELS, {**NORM_LAYERS, **CONV_LAYERS}, replaces=_REPLACES_MMCV)
    _register(HOOKS, HOOK_TYPES)


register_all()
