"""Layer types: every ``norm_cfg``/``conv_cfg`` type of the model must be registered; the error lists the
registered ones and the closest match (instead of ``KeyError: 'CBNN is not in the mmdet::model registry'``)."""
import difflib
import inspect

import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from .errors import ConfigError

__all__ = ['mmdet_models_registry', 'registered_norm_types', 'registered_conv_types', 'check_layer_types']

def mmdet_models_registry():
    """mmdet's ``MODELS`` registry (imported late: mmdet is heavy and not needed to import this module)."""
    from mmdet.registry import MODELS
    return MODELS


def _registered(predicate):
    from mmengine.registry import MODELS as ROOT
    names = set()
    for registry in (ROOT, mmdet_models_registry()):
        for name, cls in registry.module_dict.items():
            if inspect.isclass(cls) and predicate(cls):
                names.add(name)
    return sorted(names, key=str.lower)


def _is_norm(cls):
    if issubclass(cls, (_NormBase, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)):
        return True
    from ...models.registry import NORM_LAYERS
    return cls in NORM_LAYERS.values()


def _is_conv(cls):
    if issubclass(cls, _ConvNd):
        return True
    # mmcv's deformable and sparse convs are plain nn.Modules
    name = cls.__name__
    return cls.__module__.startswith('mmcv.ops') and ('Conv' in name and 'Module' not in name)


def registered_norm_types():
    """Norm ``type`` names resolvable from mmdet's MODELS registry (mmcv's, mmdet's and ours)."""
    return _registered(_is_norm)


def registered_conv_types():
    """Conv ``type`` names resolvable from mmdet's MODELS registry."""
    return _registered(_is_conv)


def _layer_cfgs(node, field):
    """Yield ``(field, kind, cfg)`` for every norm/conv layer config under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f'{field}.{key}'
            kind = None
            if isinstance(key, str):
                if key.endswith('norm_cfg'):
                    kind = 'norm'
                elif key.endswith('conv_cfg') or key == 'dcn':
                    kind = 'conv'
            if kind and isinstance(value, dict) and 'type' in value:
                yield sub, kind, value
            yield from _layer_cfgs(value, sub)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _layer_cfgs(value, f'{field}[{i}]')


def check_layer_types(cfg):
    """Every ``norm_cfg``/``conv_cfg`` ``type`` in ``cfg.model`` must be registered."""
    registry = mmdet_models_registry()
    for field, kind, layer_cfg in _layer_cfgs(cfg.get('model'), 'model'):
        layer_type = layer_cfg['type']
        if not isinstance(layer_type, str):      # a class object (lazy configs): nothing to resolve
            continue
        if registry.get(layer_type) is not None:
            continue
        known = registered_norm_types() if kind == 'norm' else registered_conv_types()
        close = difflib.get_close_matches(layer_type, known, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise ConfigError(f"{field}.type = {layer_type!r} is not a registered {kind} layer{hint}. "
                          f"Registered {kind} types: {', '.join(known)}")
