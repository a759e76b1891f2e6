"""``tools/train.py``: mmdet 3.x's train tool plus validation, trusted resume and CPU multi-process.

Order of work (nothing is written before step 4)::

    1. parse args; import cbn_mmdet and register mmdet's modules
    2. load the config, apply --cfg-options/--work-dir/--amp/--auto-scale-lr/--resume
    3. generate the synthetic data a demo config asks for; validate the config (ConfigError)
    4. CPU + multi-process launcher: init the gloo group; build the Runner; train with our own
       checkpoints trusted for loading (torch>=2.6 weights_only)
"""
import argparse
import os.path as osp

from mmengine.config import DictAction

from .checkpoint import trusted_checkpoints
from .common import (add_launcher_args, build_runner, ensure_config_data, load_config, register_modules,
                     set_local_rank_env)
from .dist import launcher_world_size, setup_cpu_distributed
from .validate import ConfigError, validate_config

__all__ = ['parse_train_args', 'prepare_train_config', 'train', 'main']


def parse_train_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector (mmdet 3.x + cbn_mmdet)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true', help='enable automatically scaling LR.')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from the given checkpoint, or (no value) from the latest checkpoint '
                        'in the work directory')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs (xxx=yyy) merged into the config')
    add_launcher_args(parser)
    args = parser.parse_args(argv)
    set_local_rank_env(args.local_rank)
    return args


def prepare_train_config(args, log=print):
    """The final config for ``args``, validated (raises :class:`ConfigError`); writes nothing but data."""
    register_modules()
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        scale = cfg.get('auto_scale_lr')
        if not (isinstance(scale, dict) and 'enable' in scale and 'base_batch_size' in scale):
            raise ConfigError('--auto-scale-lr needs auto_scale_lr=dict(enable=..., base_batch_size=...) '
                              f'in the config, got auto_scale_lr = {scale!r}')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    # RNG states travel with every checkpoint, so that --resume continues bit-identically.
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(isinstance(h, dict) and h.get('type') == 'RNGStateHook' for h in hooks):
        cfg.custom_hooks = hooks + [dict(type='RNGStateHook')]

    ensure_config_data(cfg, logger=log)
    validate_config(cfg, 'train', world_size=launcher_world_size(args.launcher), logger=log)
    if args.resume not in (None, 'auto'):
        if not osp.isfile(osp.expanduser(args.resume)):
            raise ConfigError(f'--resume {args.resume!r}: no such checkpoint file')
    return cfg


def train(cfg):
    """Build the Runner for a prepared config and train; returns the runner."""
    setup_cpu_distributed(cfg, cfg.get('launcher', 'none'))
    runner = build_runner(cfg)
    with trusted_checkpoints(paths=[cfg.get('load_from')], dirs=[cfg.work_dir]):
        runner.train()
    return runner


def _log(message):
    print(f'[cbn_mmdet] {message}', flush=True)


def main(argv=None):
    args = parse_train_args(argv)
    try:
        cfg = prepare_train_config(args, log=_log)
    except ConfigError as err:
        raise SystemExit(f'tools/train.py: config error: {err}') from None
    train(cfg)
