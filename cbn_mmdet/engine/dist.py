"""Distributed setup for the tools, on CUDA (left to mmengine: NCCL) and on CPU (gloo, done here).

mmengine's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally, and its Runner wraps the model
in DDP with ``device_ids=[LOCAL_RANK]``; both fail on a CPU-only machine. The Runner skips ``init_dist``
when a process group already exists, so on CPU we initialise a gloo group ourselves before building it
and give the DDP wrapper ``device_ids=None``.
"""
import datetime
import os
import subprocess

import torch
import torch.distributed as dist

__all__ = ['launcher_world_size', 'cpu_distributed', 'setup_cpu_distributed', 'check_launcher_env']

_DEFAULT_PORT = '29500'


# What each launcher must have put in the environment (mmengine reads these, with a KeyError otherwise).
_LAUNCHER_ENV = {'pytorch': ('RANK', 'WORLD_SIZE'),
                 'slurm': ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'),
                 'mpi': ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE')}
_HOW = {'pytorch': 'tools/dist_train.sh CFG N (torchrun)', 'slurm': 'tools/slurm_train.sh (srun)',
        'mpi': 'mpirun'}


def check_launcher_env(launcher):
    """Raise :class:`ConfigError` when ``--launcher`` names a launcher that did not start this process."""
    from .config_checks import ConfigError
    missing = [key for key in _LAUNCHER_ENV.get(launcher, ()) if not os.environ.get(key)]
    if missing:
        raise ConfigError(f'--launcher {launcher}: this process was not started by that launcher ({", ".join(missing)} '
                          f'not set); run it through {_HOW[launcher]}, or use --launcher none')


def launcher_world_size(launcher):
    """Number of processes the launcher started (1 for ``none``), read from its environment."""
    if launcher == 'none':
        return 1
    keys = {'pytorch': ('WORLD_SIZE',), 'slurm': ('SLURM_NTASKS', 'WORLD_SIZE'),
            'mpi': ('OMPI_COMM_WORLD_SIZE', 'PMI_SIZE', 'WORLD_SIZE')}[launcher]
    for key in keys:
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def cpu_distributed(launcher):
    """True when a multi-process run has to use gloo on CPU (no CUDA device)."""
    return launcher != 'none' and not torch.cuda.is_available()


def _rank_info(launcher):
    env = os.environ
    if launcher == 'pytorch':
        return int(env['RANK']), int(env['WORLD_SIZE']), int(env.get('LOCAL_RANK', 0))
    if launcher == 'slurm':
        if 'MASTER_ADDR' not in env:
            node_list = env['SLURM_NODELIST']
            env['MASTER_ADDR'] = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
        return int(env['SLURM_PROCID']), int(env['SLURM_NTASKS']), int(env.get('SLURM_LOCALID', 0))
    if launcher == 'mpi':
        env.setdefault('MASTER_ADDR', '127.0.0.1')
        return (int(env['OMPI_COMM_WORLD_RANK']), int(env['OMPI_COMM_WORLD_SIZE']),
                int(env.get('OMPI_COMM_WORLD_LOCAL_RANK', 0)))
    raise ValueError(f"launcher must be one of none/pytorch/slurm/mpi, got {launcher!r}")


def setup_cpu_distributed(cfg, launcher, timeout_s=1800):
    """On a CPU-only machine with a multi-process launcher: init the gloo group and fix the DDP wrapper.

    Does nothing when CUDA is available (mmengine initialises NCCL itself), for ``launcher='none'``, or
    when a process group already exists. Returns True when it initialised the group.
    """
    if not cpu_distributed(launcher):
        return False
    _make_ddp_cpu_friendly(cfg)
    if dist.is_available() and dist.is_initialized():
        return False
    rank, world_size, local_rank = _rank_info(launcher)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
    os.environ.setdefault('MASTER_PORT', _DEFAULT_PORT)
    dist.init_process_group('gloo', init_method='env://', rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    env_cfg = cfg.setdefault('env_cfg', {})
    env_cfg.setdefault('dist_cfg', {})['backend'] = 'gloo'   # what the run really uses (logged)
    return True


def _make_ddp_cpu_friendly(cfg):
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None,
                                     broadcast_buffers=False,
                                     find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper.get('type', 'MMDistributedDataParallel') in ('MMDistributedDataParallel',
                                                              'DistributedDataParallel'):
        wrapper['device_ids'] = None
