"""``--cfg-options`` keys that mmengine would silently ignore, or that a constructor would reject later.

mmengine merges any ``key=value`` into the config: ``max_epoch=1`` (for ``train_cfg.max_epochs``) adds an
unused top-level key and the run trains 12 epochs; ``model.neck.out_chanels=32`` ends in a constructor
traceback after the work_dir exists. The rule (``docs/reliability.md``):

* below a top-level key that is read, a key that exists in the config (dict keys, list indices) is
  accepted;
* a new key inside a module config (a dict with ``type``) is accepted when the registered class takes
  that argument (or ``**kwargs``), refused otherwise; a type we cannot resolve is accepted;
* a new key inside a dict without ``type`` is accepted (its reader is unknown: ``env_cfg``,
  ``paramwise_cfg``...);
* a top-level key is accepted when mmengine's Runner, mmdet's tools or cbn_mmdet read it, or when it
  starts with ``custom_``; otherwise refused: a new one would be read by nothing, and an existing one is
  a config variable (``max_epochs``, ``data_root``...) already substituted where the config uses it, so
  changing it changes nothing (the message names the fields holding its value).
"""
import difflib
import inspect

from .errors import ConfigError

__all__ = ['TOP_LEVEL_KEYS', 'check_cfg_options']

# Top-level keys read by mmengine's Runner.from_cfg, mmdet's tools (tta_*) and cbn_mmdet.
TOP_LEVEL_KEYS = frozenset((
    'model', 'work_dir', 'train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg', 'val_cfg',
    'test_cfg', 'auto_scale_lr', 'optim_wrapper', 'param_scheduler', 'val_evaluator', 'test_evaluator',
    'default_hooks', 'custom_hooks', 'data_preprocessor', 'load_from', 'resume', 'launcher', 'env_cfg',
    'log_processor', 'log_level', 'visualizer', 'default_scope', 'randomness', 'experiment_name', 'compile',
    'runner_type', 'model_wrapper_cfg', 'find_unused_parameters', 'strategy', 'tta_model', 'tta_pipeline',
    'sync_bn', 'global_batch_size', 'synthetic_data'))
_MISSING = object()


def _child(node, key):
    if isinstance(node, dict):
        return node.get(key, _MISSING)
    if isinstance(node, (list, tuple)) and key.lstrip('-').isdigit() and -len(node) <= int(key) < len(node):
        return node[int(key)]
    return _MISSING


def _all_keys(node, prefix=''):
    """Every dotted key path of the config (for "did you mean")."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for key, value in items:
        path = f'{prefix}{key}'
        yield path
        yield from _all_keys(value, path + '.')


def _uses_of(cfg, name, value, limit=3):
    """Paths (in the sections something reads) that a config variable ``name`` probably feeds: those named
    like it, then those holding its value."""
    named, equal = [], []
    for path in _all_keys(cfg):
        if not _is_read(path.split('.')[0]):
            continue
        node = cfg
        for part in path.split('.'):
            node = _child(node, part)
        same = node == value and type(node) is type(value) and not (isinstance(value, (dict, list)) and not value)
        if path.split('.')[-1] == name:
            named.append((not same, path))
        elif same:
            equal.append(path)
    return list(dict.fromkeys([p for _, p in sorted(named)] + equal))[:limit]


def _resolve_type(type_name):
    """The class registered as ``type_name`` in mmdet's (then mmengine's) registries, or ``None``."""
    if not isinstance(type_name, str):
        return type_name if inspect.isclass(type_name) else None
    import mmdet.registry as mmdet_registry
    from mmengine.registry import Registry
    registries = [r for r in vars(mmdet_registry).values() if isinstance(r, Registry)]
    for registry in registries:
        try:
            cls = registry.get(type_name)
        except Exception:      # a registry whose lazy imports fail is simply not the one
            cls = None
        if cls is not None:
            return cls
    return None


def _accepts(cls, name):
    target = cls.__init__ if inspect.isclass(cls) else cls
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or p.name == name for p in params)


def _is_read(top_key):
    return top_key in TOP_LEVEL_KEYS or top_key.startswith('custom_')


def _suggest(key, cfg):
    leaf = key.split('.')[-1]
    paths = [p for p in _all_keys(cfg) if _is_read(p.split('.')[0])]    # not other config variables
    close = difflib.get_close_matches(key, paths, n=1, cutoff=0.75)
    if not close:
        by_leaf = {p.split('.')[-1]: p for p in paths}
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[leaves[0]]] if leaves else []
    return f' (did you mean {close[0]!r}?)' if close else ''


def check_cfg_options(original, options, merged):
    """Raise :class:`ConfigError` for an option key that nothing would read (see the module docstring).

    Args:
        original (dict): the config before ``--cfg-options``.
        options (dict): the ``--cfg-options`` (dotted keys).
        merged (dict): the config after merging (a new ``type`` given with the options counts).
    """
    for key in options or {}:
        parts = str(key).split('.')
        node, depth = original, 0
        while depth < len(parts):
            child = _child(node, parts[depth])
            if child is _MISSING:
                break
            node, depth = child, depth + 1
        if not _is_read(parts[0]):
            if parts[0] in original:
                uses = _uses_of(original, parts[0], original[parts[0]])
                hint = f" (e.g. {', '.join(repr(u) for u in uses)})" if uses else ''
                raise ConfigError(f'--cfg-options {key}=...: {parts[0]!r} is a config variable, already '
                                  'substituted where the config uses it, so setting it changes nothing; set '
                                  f'the fields that use it{hint}')
            raise ConfigError(f'--cfg-options {key}=...: the config has no key {parts[0]!r} and nothing reads a '
                              f'new top-level key of that name{_suggest(key, original)}')
        if depth == len(parts):
            continue                                  # an existing key
        if depth == 0:
            continue                                  # a new top-level key that is read
        parent_path = parts[:depth]
        parent = merged
        for part in parent_path:
            parent = _child(parent, part)
        if not isinstance(parent, dict) or 'type' not in parent:
            continue                                  # a plain dict: its reader is unknown, accept
        cls = _resolve_type(parent['type'])
        if cls is None or _accepts(cls, parts[depth]):
            continue
        name = getattr(cls, '__name__', parent['type'])
        raise ConfigError(f"--cfg-options {key}=...: {'.'.join(parent_path)} (type={parent['type']!r}) has no "
                          f"argument {parts[depth]!r}: {name} does not take it{_suggest(key, original)}")
