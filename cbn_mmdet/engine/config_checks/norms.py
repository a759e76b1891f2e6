"""Config-time checks of norm layers, hooks and launch settings: fail before anything is built.

A norm config is only instantiated deep inside model building, often after the work_dir exists; a typo
then surfaces as a bare ``TypeError`` from a constructor, or (worse) never: a CBN layer converted to
SyncBN by ``cfg.sync_bn``, a burn-in longer than the schedule, a SyncBN config launched without a
process group on a GPU. Each check here raises one :class:`ConfigError` naming the config field and
the value. ``docs/reliability.md`` lists them; ``tests/test_engine/test_reliability_matrix.py`` pins each.

Which type names are CBN, synchronised or not convertible to SyncBN comes from the registration
table (``cbn_mmdet.models.registry``), so a new layer is declared in one place.
"""
import difflib
import inspect

from ...models.registry import CBN_TYPES, NOT_SYNCBN_CONVERTIBLE, SYNC_NORM_TYPES
from .errors import ConfigError
from .layers import mmdet_models_registry

__all__ = ['check_norm_arguments', 'check_sync_bn_conversion', 'check_burnin_hooks',
           'check_sync_layers_launch', 'check_norm_order', 'validate_norm_config']

_CHANNEL_KEYS = ('out_channels', 'conv_out_channels', 'feat_channels', 'channels')


def _parent_dicts(node, field='model'):
    """Yield ``(field, dict)`` for every dict under ``node`` (the dict holding a norm_cfg is its module)."""
    if isinstance(node, dict):
        yield field, node
        for key, value in node.items():
            yield from _parent_dicts(value, f'{field}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _parent_dicts(value, f'{field}[{i}]')


def norm_sites(cfg):
    """Yield ``(field, norm_cfg, module_cfg)`` for each ``norm_cfg`` in the model config."""
    for field, module_cfg in _parent_dicts(cfg.get('model')):
        norm_cfg = module_cfg.get('norm_cfg')
        if isinstance(norm_cfg, dict) and isinstance(norm_cfg.get('type'), str):
            yield f'{field}.norm_cfg', norm_cfg, module_cfg


def _channels_of(module_cfg):
    for key in _CHANNEL_KEYS:
        value = module_cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_norm_arguments(cfg):
    """Misspelt keywords and invalid values of every norm_cfg, by building the layer once, on its own.

    The channel count comes from the enclosing module's config (``out_channels``,
    ``conv_out_channels``, ...) when it states one, so ``num_groups`` not dividing it is caught too.
    """
    registry = mmdet_models_registry()
    for field, norm_cfg, module_cfg in norm_sites(cfg):
        cls = registry.get(norm_cfg['type'])
        if cls is None or not inspect.isclass(cls):
            continue      # unknown types are check_layer_types' job
        kwargs = {k: v for k, v in norm_cfg.items() if k not in ('type', 'requires_grad')}
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):     # pragma: no cover - builtins without a signature
            continue
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not takes_kwargs:
            for key in kwargs:
                if key not in params:
                    close = difflib.get_close_matches(key, list(params), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ''
                    raise ConfigError(f"{field}: {norm_cfg['type']} has no argument {key!r}{hint}; "
                                      f"it takes {', '.join(p for p in params if p != 'self')}")
        channels = _channels_of(module_cfg) or kwargs.get('num_groups') or 32
        try:
            if norm_cfg['type'] == 'GN':
                kwargs.setdefault('num_groups', 32)
                groups = kwargs['num_groups']
                if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
                    raise ValueError(f'num_groups must be a positive int, got {groups!r}')
                if channels % groups:
                    raise ValueError(f"num_groups={kwargs['num_groups']!r} must divide the "
                                     f'{channels} channels')
                continue
            cls(channels, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{field} = {dict(norm_cfg)!r}: {err}") from None


def check_norm_order(cfg):
    """A CBN needs the conv that feeds it: a ConvModule ``order`` with the norm first cannot work."""
    for field, norm_cfg, module_cfg in norm_sites(cfg):
        order = module_cfg.get('order')
        if norm_cfg['type'] in CBN_TYPES and isinstance(order, (list, tuple)) and 'conv' in order \
                and 'norm' in order and list(order).index('norm') < list(order).index('conv'):
            raise ConfigError(f'{field}: type={norm_cfg["type"]!r} needs a conv before it, but the '
                              f'module order is {tuple(order)!r}')
        conv_cfg = module_cfg.get('conv_cfg')
        if norm_cfg['type'] in CBN_TYPES and isinstance(conv_cfg, dict) \
                and conv_cfg.get('type') in ('ConvWS', 'ConvAWS'):
            raise ConfigError(f"{field}: CBN after conv_cfg type={conv_cfg['type']!r} cannot see the "
                              "weight that conv uses; use conv_cfg=dict(type='WSConv')")


def check_sync_bn_conversion(cfg):
    """``cfg.sync_bn`` converts every _BatchNorm into plain SyncBN: it would erase CBN/BCN/MABN."""
    if not cfg.get('sync_bn'):
        return
    for field, norm_cfg, _ in norm_sites(cfg):
        if norm_cfg['type'] in NOT_SYNCBN_CONVERTIBLE:
            raise ConfigError(f"sync_bn = {cfg.get('sync_bn')!r} would replace {field} type="
                              f"{norm_cfg['type']!r} by plain SyncBN; remove sync_bn "
                              "(use type='SyncCBN' for synced CBN)")


def check_burnin_hooks(cfg):
    """A CBNBurnInHook must build, and its burn-in must end before the schedule does."""
    hooks = [h for h in (cfg.get('custom_hooks') or []) if isinstance(h, dict)
             and h.get('type') == 'CBNBurnInHook']
    if not hooks:
        return
    from mmengine.registry import HOOKS
    train_cfg = cfg.get('train_cfg') or {}
    for i, hook_cfg in enumerate(hooks):
        field = f'custom_hooks[CBNBurnInHook #{i}]'
        try:
            hook = HOOKS.build(dict(hook_cfg))
        except (TypeError, ValueError) as err:
            raise ConfigError(f'{field} = {dict(hook_cfg)!r}: {err}') from None
        max_epochs = train_cfg.get('max_epochs')
        if hook.burnin_epochs is not None and isinstance(max_epochs, int) and hook.burnin_epochs >= max_epochs:
            raise ConfigError(f'{field}.burnin_epochs = {hook.burnin_epochs} is not shorter than '
                              f'train_cfg.max_epochs = {max_epochs}: CBN would never be used')
        max_iters = train_cfg.get('max_iters')
        if hook.burnin_iters is not None and isinstance(max_iters, int) and hook.burnin_iters >= max_iters:
            raise ConfigError(f'{field}.burnin_iters = {hook.burnin_iters} is not shorter than '
                              f'train_cfg.max_iters = {max_iters}: CBN would never be used')


def check_sync_layers_launch(cfg, launcher, cuda_available):
    """On GPUs, a SyncBN/SyncCBN config trained without a launcher would silently be plain BN."""
    if launcher != 'none' or not cuda_available:
        return   # CPU single process: SyncBN is BN by design (the demo and CI rely on it)
    for field, norm_cfg, _ in norm_sites(cfg):
        if norm_cfg['type'] in SYNC_NORM_TYPES:
            raise ConfigError(f"{field}.type = {norm_cfg['type']!r} on a GPU without a process group "
                              "(--launcher none): launch with tools/dist_train.sh CONFIG N, or set "
                              "norm_cfg type='BN'/'CBN'")


def validate_norm_config(cfg, mode, launcher='none', cuda_available=None):
    """All norm checks for ``mode`` ('train' or 'test')."""
    check_norm_arguments(cfg)
    check_norm_order(cfg)
    if mode == 'train':
        check_sync_bn_conversion(cfg)
        check_burnin_hooks(cfg)
        if cuda_available is None:
            import torch
            cuda_available = torch.cuda.is_available()
        check_sync_layers_launch(cfg, launcher, cuda_available)
