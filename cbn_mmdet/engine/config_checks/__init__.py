"""Config checks that run before anything is built (and before the Runner creates the work_dir).

Each check raises one :class:`ConfigError` naming the config field, the value found and what to do,
instead of the errors mmengine/mmcv would give much later, or never (a silently different global batch):

* ``paths``  — dataset files and folders;
* ``layers`` — registered norm/conv types;
* ``norms``  — norm arguments, conv->norm order, burn-in vs schedule, ``sync_bn`` conversion, SyncBN launch;
* ``annotations`` — annotation files that do not parse as COCO JSON;
* ``options`` — ``--cfg-options`` keys nothing would read (called by the config loader);
* ``batch``  — the global batch over the process count.

``docs/reliability.md`` lists every check with its message.
"""
from .annotations import check_annotation_files
from .batch import check_global_batch, check_mabn_batch
from .errors import ConfigError
from .layers import check_layer_types, mmdet_models_registry, registered_conv_types, registered_norm_types
from .norms import (
    check_burnin_hooks,
    check_norm_arguments,
    check_norm_order,
    check_sync_bn_conversion,
    check_sync_layers_launch,
    validate_norm_config,
)
from .paths import check_dataset_paths

__all__ = ['ConfigError', 'check_dataset_paths', 'check_annotation_files', 'check_layer_types', 'check_global_batch',
           'check_mabn_batch',
           'registered_norm_types', 'registered_conv_types', 'mmdet_models_registry', 'check_norm_arguments',
           'check_norm_order', 'check_sync_bn_conversion', 'check_burnin_hooks', 'check_sync_layers_launch',
           'validate_norm_config', 'validate_config']


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
    validate_norm_config(cfg, mode, launcher=cfg.get('launcher', 'none'))
    check_dataset_paths(cfg, splits)
    check_annotation_files(cfg, splits)
    if mode == 'train':
        check_global_batch(cfg, world_size, logger=logger)
        check_mabn_batch(cfg)
