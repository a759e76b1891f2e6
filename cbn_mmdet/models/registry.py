"""The one place that puts cbn_mmdet's layers into mmengine's root ``MODELS`` registry.

mmcv 2.x ``build_norm_layer``/``build_conv_layer`` look ``type`` up in ``mmengine.registry.MODELS``
(falling back to it from mmdet's child registry), so registering in the root makes every name usable
from any scope: ``norm_cfg=dict(type='CBN', buffer_num=3)``, ``conv_cfg=dict(type='WSConv')``.

``SyncBN`` deliberately *replaces* mmcv's registration (which is ``torch.nn.SyncBatchNorm`` itself) by
our subclass: on CUDA it runs torch's own code, so mmdet configs behave exactly as before; in addition
it works on CPU (one process = BN, several gloo processes all-reduce), which torch's refuses. mmcv's
class stays reachable as ``type='TorchSyncBN'``.
"""
import torch.nn as nn
from mmengine.registry import MODELS

from ..ops import (BatchChannelNorm2d, CenteredConv2d, CrossIterationBatchNorm2d, MovingAverageBatchNorm2d,
                   SyncBatchNorm, SyncCrossIterationBatchNorm2d, WeightStandardizedConv2d)

NORM_LAYERS = {
    'CBN': CrossIterationBatchNorm2d,
    'SyncCBN': SyncCrossIterationBatchNorm2d,
    'SyncBN': SyncBatchNorm,
    'TorchSyncBN': nn.SyncBatchNorm,
    'BCN': BatchChannelNorm2d,
    'MABN': MovingAverageBatchNorm2d,
}
CONV_LAYERS = {
    'WSConv': WeightStandardizedConv2d,
    'CenConv': CenteredConv2d,
}
# Names we take over from mmcv on purpose (see the module docstring); any other clash is an error.
_REPLACES_MMCV = {'SyncBN'}


def _same_class(a, b):
    # The same file imported under two module paths gives two class objects with one qualified name.
    return a is b or (getattr(a, '__qualname__', None) == getattr(b, '__qualname__', None)
                      and getattr(a, '__module__', '').endswith(getattr(b, '__module__', '').split('.')[-1]))


def register_all():
    for name, cls in {**NORM_LAYERS, **CONV_LAYERS}.items():
        existing = MODELS.module_dict.get(name)
        if existing is not None and not _same_class(existing, cls) and name not in _REPLACES_MMCV:
            raise KeyError(f'cbn_mmdet: MODELS already has type={name!r} registered as '
                           f'{existing.__module__}.{existing.__qualname__}; refusing to shadow it')
        MODELS.register_module(name=name, module=cls, force=True)


register_all()
