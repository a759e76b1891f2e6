"""Registration: every name resolves from the root and from mmdet's scope, with the right class/abbr."""
import importlib

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_conv_layer, build_norm_layer
from mmengine.registry import MODELS, DefaultScope

import cbn_mmdet  # noqa: F401
from cbn_mmdet import ops
from tests.test_models.norm_cases import NORM_CFGS

EXPECTED = {
    'CBN': (ops.CrossIterationBatchNorm2d, 'bn'),
    'SyncCBN': (ops.SyncCrossIterationBatchNorm2d, 'bn'),
    'SyncBN': (ops.SyncBatchNorm, 'bn'),
    'GN': (nn.GroupNorm, 'gn'),
    'BCN': (ops.BatchChannelNorm2d, 'bn'),
    'MABN': (ops.MovingAverageBatchNorm2d, 'bn'),
}


@pytest.mark.parametrize('scope', [None, 'mmdet'])
@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_norm_types_build(name, scope):
    cls, abbr = EXPECTED[name]
    if scope:
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        ctx = DefaultScope.overwrite_default_scope(scope)
    else:
        ctx = DefaultScope.overwrite_default_scope(None)
    with ctx:
        layer_name, layer = build_norm_layer(NORM_CFGS[name], 16, postfix=1)
    assert type(layer) is cls and layer_name == f'{abbr}1'
    assert layer.weight.requires_grad


def test_requires_grad_false_freezes():
    _, layer = build_norm_layer(dict(type='CBN', buffer_num=1, requires_grad=False), 8)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize('name,cls', [('WSConv', ops.WeightStandardizedConv2d), ('CenConv', ops.CenteredConv2d)])
def test_conv_types_build(name, cls):
    conv = build_conv_layer(dict(type=name), 4, 8, 3, padding=1, bias=False)
    assert type(conv) is cls
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 8, 5, 5)


def test_syncbn_replaces_mmcv_registration_deliberately():
    assert MODELS.get('SyncBN') is ops.SyncBatchNorm
    assert issubclass(ops.SyncBatchNorm, nn.SyncBatchNorm)       # isinstance checks keep working
    assert MODELS.get('TorchSyncBN') is nn.SyncBatchNorm


def test_reimport_does_not_raise():
    from cbn_mmdet.models import registry
    importlib.reload(registry)
    assert MODELS.get('CBN') is ops.CrossIterationBatchNorm2d


def test_refuses_to_shadow_a_foreign_registration():
    from cbn_mmdet.models import registry

    class Foreign(nn.Module):
        pass

    original = MODELS.module_dict['BCN']
    MODELS.register_module(name='BCN', module=Foreign, force=True)
    try:
        with pytest.raises(KeyError, match="type='BCN' registered as"):
            registry.register_all()
    finally:
        MODELS.register_module(name='BCN', module=original, force=True)


def test_unknown_norm_type_is_an_error():
    with pytest.raises(KeyError, match='Cannot find'):
        build_norm_layer(dict(type='CBNN'), 8)


def test_custom_imports_registers(tmp_path):
    from mmengine.config import Config
    cfg_file = tmp_path / 'user_cfg.py'
    cfg_file.write_text("custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)\n"
                        "norm_cfg = dict(type='CBN', buffer_num=3)\n")
    cfg = Config.fromfile(str(cfg_file))
    module = ConvModule(3, 8, 3, norm_cfg=cfg.norm_cfg)
    assert isinstance(module.norm, ops.CrossIterationBatchNorm2d)


def test_hooks_are_registered_from_the_one_table():
    from mmengine.registry import HOOKS

    from cbn_mmdet.engine.hooks import (
        CBNBurnInHook,
        MABNGradScalerHook,
        NonFiniteLossHook,
        NormHealthHook,
        PreciseBNHook,
        RNGStateHook,
    )
    from cbn_mmdet.models import HOOK_TYPES
    assert HOOK_TYPES == {'CBNBurnInHook': CBNBurnInHook, 'MABNGradScalerHook': MABNGradScalerHook,
                          'NonFiniteLossHook': NonFiniteLossHook, 'NormHealthHook': NormHealthHook,
                          'PreciseBNHook': PreciseBNHook, 'RNGStateHook': RNGStateHook}
    for name, cls in HOOK_TYPES.items():
        assert HOOKS.get(name) is cls


def test_type_name_lists_follow_the_classes():
    """The lists the config checks use are derived from the registration table, not typed again."""
    from cbn_mmdet.models import CBN_TYPES, NOT_SYNCBN_CONVERTIBLE, SYNC_NORM_TYPES
    assert set(CBN_TYPES) == {'CBN', 'SyncCBN'}
    assert set(SYNC_NORM_TYPES) == {'SyncCBN', 'SyncBN', 'TorchSyncBN', 'MMSyncBN'}
    assert set(NOT_SYNCBN_CONVERTIBLE) == {'CBN', 'SyncCBN', 'BCN', 'MABN', 'BRN'}
    for name in CBN_TYPES:
        assert issubclass(MODELS.get(name), ops.CrossIterationBatchNorm2d)


def test_refuses_to_shadow_a_foreign_hook():
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    from cbn_mmdet.models import registry

    class ForeignHook(Hook):
        pass

    original = HOOKS.module_dict['RNGStateHook']
    HOOKS.register_module(name='RNGStateHook', module=ForeignHook, force=True)
    try:
        with pytest.raises(KeyError, match="type='RNGStateHook' registered as"):
            registry.register_all()
    finally:
        HOOKS.register_module(name='RNGStateHook', module=original, force=True)
