"""The logic behind ``tools/train.py``: mmdet 3.x's train tool plus validation, trusted resume and CPU
multi-process runs.

Order of work (nothing is written before step 3)::

    1. import cbn_mmdet and register mmdet's modules; load the config, apply the options
       (cfg_options / work_dir / amp / auto_scale_lr / resume)
    2. generate the synthetic data a demo config asks for; validate the config (ConfigError)
    3. lock the work_dir (one live run per work_dir); CPU + multi-process launcher: init the gloo group;
       build the Runner; train with our own checkpoints trusted for loading (torch>=2.6 weights_only)
"""
import contextlib
import os
import os.path as osp

import torch

from .checkpoint import trusted_checkpoints
from .checkpoint_match import check_checkpoint_matches_config
from .config_checks import ConfigError, validate_config
from .data_errors import data_errors_named
from .dist import check_launcher_env, launcher_world_size, setup_cpu_distributed
from .runner_setup import build_runner, ensure_config_data, load_config, register_modules
from .work_dir_lock import work_dir_lock

__all__ = ['prepare_train_config', 'train', 'finish_distributed']


def prepare_train_config(config, *, work_dir=None, cfg_options=None, launcher='none', amp=False,
                         auto_scale_lr=False, resume=None, log=None, allow_partial_load=False,
                         nonfinite_check=True):
    """The final config for a training run, validated (raises :class:`ConfigError`); writes nothing but data.

    Args:
        config (str): the config file.
        work_dir (str, optional): overrides the config's ``work_dir`` (default ``./work_dirs/<name>``).
        cfg_options (dict, optional): ``key=value`` overrides merged into the config.
        launcher (str): ``none``, ``pytorch``, ``slurm`` or ``mpi``.
        amp (bool): automatic mixed precision (``AmpOptimWrapper``, dynamic loss scale).
        auto_scale_lr (bool): enable the config's ``auto_scale_lr``.
        resume (str, optional): ``'auto'`` (latest checkpoint of the work_dir) or a checkpoint file.
        log (callable): receives one-line notes (generated data, batch changes).
        allow_partial_load (bool): let ``--resume`` load a checkpoint that does not match the model.
        nonfinite_check (bool): add ``NonFiniteLossHook`` (stop at a NaN/Inf loss) unless the config has one.
    """
    log = log or (lambda message: None)
    check_launcher_env(launcher)
    if amp and not torch.cuda.is_available():
        raise ConfigError('--amp: mixed-precision training (mmengine AmpOptimWrapper) needs a CUDA GPU; this '
                          'machine has none (drop --amp)')
    register_modules()
    cfg = load_config(config, cfg_options, launcher, work_dir)

    if amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if auto_scale_lr:
        scale = cfg.get('auto_scale_lr')
        if not (isinstance(scale, dict) and 'enable' in scale and 'base_batch_size' in scale):
            raise ConfigError('--auto-scale-lr needs auto_scale_lr=dict(enable=..., base_batch_size=...) '
                              f'in the config, got auto_scale_lr = {scale!r}')
        cfg.auto_scale_lr.enable = True
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume

    # RNG states travel with every checkpoint, so that --resume continues bit-identically.
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(isinstance(h, dict) and h.get('type') == 'RNGStateHook' for h in hooks):
        hooks = hooks + [dict(type='RNGStateHook')]
    # A NaN/Inf loss stops the run (naming the iteration) instead of training on to exit 0.
    if nonfinite_check and not any(isinstance(h, dict) and h.get('type') == 'NonFiniteLossHook' for h in hooks):
        hooks = hooks + [dict(type='NonFiniteLossHook')]
    # Under AMP, MABN must know the loss scale its gradient statistics carry (no-op without MABN).
    if cfg.get('optim_wrapper', {}).get('type') == 'AmpOptimWrapper' and not any(
            isinstance(h, dict) and h.get('type') == 'MABNGradScalerHook' for h in hooks):
        hooks = hooks + [dict(type='MABNGradScalerHook')]
    cfg.custom_hooks = hooks

    ensure_config_data(cfg, logger=log)
    validate_config(cfg, 'train', world_size=launcher_world_size(launcher), logger=log)
    if resume not in (None, 'auto'):
        if not osp.isfile(osp.expanduser(resume)):
            raise ConfigError(f'--resume {resume!r}: no such checkpoint file')
        check_checkpoint_matches_config(cfg, resume, allow_partial=allow_partial_load, what='--resume', log=log)
    elif resume == 'auto':
        from mmengine.runner import find_latest_checkpoint
        latest = find_latest_checkpoint(cfg.work_dir) if osp.isdir(cfg.work_dir) else None
        if latest is None:
            log(f'--resume: no checkpoint in work_dir {cfg.work_dir!r}: nothing to resume, training starts '
                'from scratch')
            cfg.resume = False
        else:
            check_checkpoint_matches_config(cfg, latest, allow_partial=allow_partial_load, what='--resume',
                                            log=log)
            log(f'--resume: resuming from {latest}')
    return cfg


def train(cfg):
    """Build the Runner for a prepared config and train; returns the runner."""
    # One run per work_dir (rank 0 holds the lock; a refused rank 0 makes torchrun stop the others).
    lock = work_dir_lock(cfg.work_dir) if _rank() == 0 else contextlib.nullcontext()
    with lock:
        setup_cpu_distributed(cfg, cfg.get('launcher', 'none'))
        runner = build_runner(cfg)
        with trusted_checkpoints(paths=[cfg.get('load_from')], dirs=[cfg.work_dir]), data_errors_named():
            runner.train()
    return runner


def finish_distributed():
    """End a multi-process run together: a barrier, then the process group torn down.

    Only rank 0 writes the last checkpoint; a rank that exits meanwhile, with its process group still
    alive, can abort in the collective library's teardown ("terminate called without an active
    exception", seen with gloo on CPU after the last epoch), and torchrun then reports the whole run as
    failed. Called by ``tools/train.py`` once training returned; a no-op without a process group.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _rank():
    for key in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        if os.environ.get(key, '').isdigit():
            return int(os.environ[key])
    return 0
