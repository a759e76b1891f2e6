"""Official CBN detectors (a fork of mmdetection v0.6) -> mmdet 3.x models of our configs.

The v0.6 layout differs from 3.x the way mmdetection's own v1 -> v2 upgrade describes it:

* the RoI heads sit at the top level (``bbox_head.*``, ``mask_head.*``); 3.x nests them under
  ``roi_head.`` (``backbone.*``, ``neck.lateral_convs.N.conv.*``, ``neck.fpn_convs.*``, ``rpn_head.rpn_conv``,
  ``rpn_cls``, ``rpn_reg`` keep their names);
* the classes: v0.6 puts the background FIRST (``fc_cls`` has ``num_classes + 1`` rows, index 0 is the
  background), 3.x puts it LAST: row 0 moves to the end; a class-specific ``fc_reg`` (and the mask
  head's ``conv_logits``) has a slot for the background at the front that 3.x does not have: dropped;
* ConvModules name their norm by the type's abbreviation (``bn``, ``gn``) in both versions: unchanged.

The official ``CBatchNorm2d`` kept its window and counter in Python lists, so a checkpoint has only
the BN keys (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``); our
CBN's extra buffers come from the freshly built target (an empty window, iteration count 0). The eval
forwards agree: both normalise by ``(x − running_mean) / (sqrt(running_var) + eps)``.
"""
from .common import ConversionError, check_against_target, strip_prefix

_MOVED_HEADS = ('bbox_head.', 'mask_head.')


def _cbn_only_buffers():
    """State-dict names our CBN has and a BN (hence the official checkpoint) does not (its window is one
    packed buffer saved as named parts, so the state_dict is asked, not the buffers)."""
    import torch.nn as nn

    from cbn_mmdet.ops import CrossIterationBatchNorm2d
    return set(CrossIterationBatchNorm2d(4, buffer_num=1).state_dict()) - set(nn.BatchNorm2d(4).state_dict())


def _rename(key):
    for head in _MOVED_HEADS:
        if key.startswith(head):
            return 'roi_head.' + key
    return key


def _reorder_classes(converted):
    """Background first (v0.6) -> last (3.x) for fc_cls; background slot dropped from fc_reg, conv_logits."""
    cls_key = 'roi_head.bbox_head.fc_cls.weight'
    if cls_key not in converted:
        raise ConversionError(f'missing key {cls_key!r}: not a two-stage v0.6 detector checkpoint')
    num_with_bg = converted[cls_key].shape[0]
    for name in ('weight', 'bias'):
        key = f'roi_head.bbox_head.fc_cls.{name}'
        if key in converted:
            value = converted[key]
            converted[key] = value[list(range(1, num_with_bg)) + [0]].clone()
        key = f'roi_head.bbox_head.fc_reg.{name}'
        if key in converted and converted[key].shape[0] == 4 * num_with_bg:
            converted[key] = converted[key][4:].clone()    # class-specific: the background's 4 deltas
        key = f'roi_head.mask_head.conv_logits.{name}'
        if key in converted and converted[key].shape[0] == num_with_bg:
            converted[key] = converted[key][1:].clone()
    return converted


def convert_cbn_v06_detector(state_dict, target_state):
    """Official CBN detector state_dict -> the state_dict of ``target_state``'s model (our config).

    Args:
        state_dict (dict): the v0.6 checkpoint's ``state_dict``.
        target_state (dict): ``model.state_dict()`` of the mmdet 3.x model built from our config; it
            decides the key set, and fills what the official checkpoint cannot have.
    """
    source = strip_prefix(state_dict, 'module.')
    converted = _reorder_classes({_rename(k): v for k, v in source.items()})
    return check_against_target(converted, target_state, fill=_cbn_only_buffers() | {'num_batches_tracked'})


def build_config_model(config):
    """The model of an mmdet 3.x config, built on CPU without loading any pretrained weights."""
    import copy

    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine import Config
    register_all_modules()
    model_cfg = copy.deepcopy(Config.fromfile(config).model)
    if model_cfg.get('backbone', {}).get('init_cfg') is not None:
        model_cfg.backbone.init_cfg = None    # the converted checkpoint replaces every weight
    return MODELS.build(model_cfg)
