"""The global batch: a multi-process run must keep the batch its schedule was made for."""
from ...models.registry import MABN_TYPES
from .errors import ConfigError
from .norms import norm_sites

__all__ = ['check_global_batch', 'check_mabn_batch']

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


def check_mabn_batch(cfg):
    """MABN's ``B`` must be the images per process (``train_dataloader.batch_size``).

    Its moving averages emulate a batch of ``real_B`` from ``real_B / B`` iterations of ``B`` images; the
    layer cannot check it itself (in RoI heads its batch dimension counts RoIs, not images), so the
    config is checked after the global batch has been split over the processes.
    """
    loader = cfg.get('train_dataloader')
    batch = loader.get('batch_size') if isinstance(loader, dict) else None
    if not isinstance(batch, int) or isinstance(batch, bool):
        return
    for field, norm_cfg, _ in norm_sites(cfg):
        if norm_cfg['type'] in MABN_TYPES and norm_cfg.get('B') != batch:
            raise ConfigError(f"{field}: MABN B={norm_cfg.get('B')!r} must equal train_dataloader.batch_size="
                              f'{batch} (the images per process); set both to the same value')
