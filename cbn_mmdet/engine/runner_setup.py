"""Steps shared by training and testing: registration, config loading, synthetic data, the Runner."""
import copy
import os.path as osp

from .config_checks import ConfigError
from .config_checks.options import check_cfg_options

__all__ = ['register_modules', 'load_config', 'read_config_file', 'default_work_dir', 'ensure_config_data',
           'build_runner']


def register_modules():
    """``import cbn_mmdet`` (our layers and hooks) and mmdet's ``register_all_modules``."""
    from mmdet.utils import register_all_modules

    import cbn_mmdet  # noqa: F401  (registration)
    register_all_modules(init_default_scope=True)


def load_config(config, cfg_options=None, launcher='none', work_dir=None):
    """``Config.fromfile`` + ``--cfg-options`` + launcher + work_dir (CLI > config > ./work_dirs/<name>).

    Raises :class:`ConfigError` for a file that does not load and for option keys nothing would read
    (:func:`cbn_mmdet.engine.config_checks.options.check_cfg_options`).
    """
    if not osp.isfile(config):
        raise ConfigError(f'config file {config!r} does not exist')
    cfg = read_config_file(config)
    cfg.launcher = launcher
    if cfg_options:
        original = copy.deepcopy(cfg.to_dict())
        try:
            cfg.merge_from_dict(cfg_options)
        except Exception as err:      # e.g. an index into a list that is not there, a key below a value
            raise ConfigError(f'--cfg-options {" ".join(map(str, cfg_options))}: cannot be merged into '
                              f'{config!r}: {type(err).__name__}: {err}') from None
        check_cfg_options(original, cfg_options, cfg.to_dict())
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = default_work_dir(config)
    return cfg


def read_config_file(config):
    """``Config.fromfile``, with a :class:`ConfigError` naming the file (and line) it cannot read."""
    from mmengine.config import Config
    try:
        return Config.fromfile(config)
    except SyntaxError as err:
        # mmengine parses with ast (filename '<unknown>'): find the file of the chain that fails.
        located = _syntax_error_in(config) if not err.filename or err.filename.startswith('<') else None
        if located is not None:
            err = located
        path = err.filename if err.filename and not err.filename.startswith('<') else config
        where = f'{path}, line {err.lineno}' if err.lineno else path
        raise ConfigError(f'config file {config!r}: syntax error ({where}): {err.msg}') from None
    except Exception as err:     # a missing _base_, a NameError in the file, a bad custom_imports...
        message = str(err).strip().splitlines()[-1] if str(err).strip() else ''
        raise ConfigError(f'config file {config!r} cannot be loaded: {type(err).__name__}: {message}') from None


def _syntax_error_in(config, depth=0):
    """The ``SyntaxError`` (with its filename) of ``config`` or of a ``_base_`` file below it, or ``None``."""
    try:
        with open(config) as f:
            compile(f.read(), config, 'exec')
    except SyntaxError as err:
        return err
    except OSError:
        return None
    if depth > 16:
        return None
    from mmengine.config import Config
    try:
        bases = Config._get_base_files(config)
    except Exception:
        return None
    for base in bases:
        path = osp.join(osp.dirname(config), base) if not osp.isabs(base) else base
        found = _syntax_error_in(path, depth + 1) if osp.isfile(path) else None
        if found is not None:
            return found
    return None


def default_work_dir(config):
    return osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])


def ensure_config_data(cfg, logger=None):
    """Generate the synthetic dataset a config asks for (top-level ``synthetic_data=dict(out_dir=..., ...)``).

    Configs on real data have no such key and are left alone; missing real data is then reported by
    :func:`cbn_mmdet.engine.config_checks.check_dataset_paths`. An ``out_dir`` that exists and is not the
    generator's set of these parameters (the user's own dataset, say) is refused with a
    :class:`ConfigError`, never written into.
    """
    spec = cfg.get('synthetic_data')
    if not spec:
        return
    from ..datasets import SyntheticDataError, ensure_synthetic_coco
    if not isinstance(spec, dict) or not isinstance(spec.get('out_dir'), str) or not spec['out_dir']:
        raise ConfigError(f'synthetic_data = {spec!r}: expected dict(out_dir=<new directory>, seed=..., ...) '
                          'or None')
    spec = dict(spec)
    out_dir = spec.pop('out_dir')
    try:
        made = ensure_synthetic_coco(out_dir, **spec)
    except SyntheticDataError as err:
        raise ConfigError(f'synthetic_data.out_dir = {out_dir!r}: {err}') from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f'synthetic_data = {dict(spec, out_dir=out_dir)!r}: {err}') from None
    if made and logger is not None:
        logger(f'generated the synthetic dataset in {out_dir}')


def build_runner(cfg):
    """The Runner for ``cfg`` (``runner_type`` honoured), as mmdet's tools build it."""
    from mmengine.runner import Runner
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    from mmdet.registry import RUNNERS
    return RUNNERS.build(cfg)
