"""Config checks that run before anything is built (and before the Runner creates the work_dir).

Each check raises one :class:`ConfigError` naming the config field, the value found and what to do
(the norm-specific checks live in ``norm_checks`` and run as part of :func:`validate_config`),
instead of the errors mmengine/mmcv would give much later (a ``FileNotFoundError`` deep in dataset
building after the work_dir was created; ``KeyError: 'CBNN is not in the mmdet::model registry'``
without a list of what is registered; a silently different global batch).
"""
import difflib
import inspect
import os.path as osp

import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ['ConfigError', 'check_dataset_paths', 'check_layer_types', 'check_global_batch',
           'registered_norm_types', 'registered_conv_types', 'validate_config']


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field and the value."""


# ------------------------------------------------------------------------------------ dataset paths
_WRAPPER_KEYS = ('dataset', 'datasets')


def _is_remote(path):
    return isinstance(path, str) and '://' in path


def _join(root, path):
    if not root or osp.isabs(path) or _is_remote(path):
        return path
    return osp.join(root, path)


def _dataset_paths(dataset, field):
    """Yield ``(field, value, resolved_path)`` for the paths one dataset config reads, as mmengine's
    ``BaseDataset`` resolves them (``ann_file`` and every ``data_prefix`` entry joined to ``data_root``).
    Wrappers (Repeat/ClassBalanced/MultiImageMix: ``dataset``; Concat: ``datasets``) are followed."""
    if not isinstance(dataset, dict):
        return
    if 'dataset' in dataset:
        yield from _dataset_paths(dataset['dataset'], f'{field}.dataset')
    if isinstance(dataset.get('datasets'), (list, tuple)):
        for i, sub in enumerate(dataset['datasets']):
            yield from _dataset_paths(sub, f'{field}.datasets[{i}]')
    if any(k in dataset for k in _WRAPPER_KEYS) and 'ann_file' not in dataset:
        return
    if dataset.get('backend_args') is not None:     # a remote storage backend: nothing local to check
        return
    root = dataset.get('data_root')
    if isinstance(root, str) and root and not _is_remote(root):
        yield f'{field}.data_root', root, root
    ann_file = dataset.get('ann_file')
    if isinstance(ann_file, str) and ann_file:
        yield f'{field}.ann_file', ann_file, _join(root, ann_file)
    prefix = dataset.get('data_prefix')
    if isinstance(prefix, dict):
        for key, value in prefix.items():
            if isinstance(value, str) and value:
                yield f'{field}.data_prefix.{key}', value, _join(root, value)


def _evaluator_paths(evaluator, field):
    if isinstance(evaluator, (list, tuple)):
        for i, sub in enumerate(evaluator):
            yield from _evaluator_paths(sub, f'{field}[{i}]')
        return
    if not isinstance(evaluator, dict):
        return
    if isinstance(evaluator.get('metrics'), (list, tuple, dict)):   # type='Evaluator', metrics=[...]
        yield from _evaluator_paths(evaluator['metrics'], f'{field}.metrics')
    ann_file = evaluator.get('ann_file')
    if isinstance(ann_file, str) and ann_file and not _is_remote(ann_file) \
            and evaluator.get('backend_args') is None:
        yield f'{field}.ann_file', ann_file, ann_file


def check_dataset_paths(cfg, splits):
    """Every local path the dataloaders/evaluators of ``splits`` ('train', 'val', 'test') read must exist."""
    missing = []
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if isinstance(loader, dict):
            missing += [(f, v, p) for f, v, p in _dataset_paths(loader.get('dataset'), f'{split}_dataloader.dataset')
                        if not osp.exists(p)]
        if split != 'train':
            missing += [(f, v, p) for f, v, p in _evaluator_paths(cfg.get(f'{split}_evaluator'), f'{split}_evaluator')
                        if not osp.exists(p)]
    if missing:
        lines = [f"  {field} = {value!r}" + (f' (resolved: {path!r})' if path != value else '')
                 for field, value, path in missing]
        raise ConfigError('dataset path(s) in the config do not exist:\n' + '\n'.join(lines) +
                          '\nFix data_root/ann_file/data_prefix (e.g. --cfg-options '
                          f"{missing[0][0]}=...) or put the dataset there.")


# ------------------------------------------------------------------------------------ layer types
def _models_registry():
    from mmdet.registry import MODELS
    return MODELS


def _registered(predicate):
    from mmengine.registry import MODELS as ROOT
    names = set()
    for registry in (ROOT, _models_registry()):
        for name, cls in registry.module_dict.items():
            if inspect.isclass(cls) and predicate(cls):
                names.add(name)
    return sorted(names, key=str.lower)


def _is_norm(cls):
    if issubclass(cls, (_NormBase, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)):
        return True
    try:
        from cbn_mmdet.models import NORM_LAYERS
    except ImportError:     # pragma: no cover
        return False
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
    registry = _models_registry()
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


# ------------------------------------------------------------------------------------ global batch
def check_global_batch(cfg, world_size, logger=None):
    """Dist runs: the process count must divide ``cfg.global_batch_size`` (where the config states one).

    A config may state the batch its schedule and learning rate were made for as a top-level
    ``global_batch_size`` (the paper's 4 GPUs x 4 images = 16). ``auto_scale_lr.base_batch_size`` is
    *not* such a statement (mmdet puts 16 into every config as a reference for LR scaling). When the
    count divides it, the per-process ``train_dataloader.batch_size`` is set to ``global // world_size``
    so the global batch stays what the config states.
    """
    global_batch = cfg.get('global_batch_size')
    if global_batch is None or world_size <= 1:
        return
    if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
        raise ConfigError(f'global_batch_size = {global_batch!r} must be a positive int')
    if global_batch % world_size:
        divisors = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise ConfigError(
            f'global_batch_size = {global_batch} cannot be split over {world_size} processes (GPUs): '
            f'use a process count that divides it ({", ".join(map(str, divisors))}) or change '
            f'global_batch_size (--cfg-options global_batch_size=...)')
    per_process = global_batch // world_size
    loader = cfg.get('train_dataloader')
    if isinstance(loader, dict) and loader.get('batch_size') != per_process:
        if logger is not None:
            logger(f'global_batch_size={global_batch} over {world_size} processes: '
                   f'train_dataloader.batch_size {loader.get("batch_size")} -> {per_process}')
        loader['batch_size'] = per_process


# ------------------------------------------------------------------------------------ all of them
def validate_config(cfg, mode, world_size=1, logger=None):
    """Run the checks for ``mode`` ('train' or 'test'); raise :class:`ConfigError` on the first problem."""
    if mode not in ('train', 'test'):
        raise ValueError(f"validate_config: mode must be 'train' or 'test', got {mode!r}")
    if mode == 'train':
        splits = ['train']
        if cfg.get('val_cfg') is not None and cfg.get('val_dataloader') is not None:
            splits.append('val')
    else:
        splits = ['test']
    check_layer_types(cfg)
    # norm arguments, conv->norm order, burn-in vs schedule, sync_bn conversion, SyncBN launch
    from .norm_checks import validate_norm_config   # imports this module: import here, not at the top
    validate_norm_config(cfg, mode, launcher=cfg.get('launcher', 'none'))
    check_dataset_paths(cfg, splits)
    if mode == 'train':
        check_global_batch(cfg, world_size, logger=logger)
