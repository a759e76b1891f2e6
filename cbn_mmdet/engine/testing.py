"""The logic behind ``tools/test.py``: mmdet 3.x's test tool plus mmdet 2.x's ``--eval`` and config validation.

mmdet 3.x computes metrics with the config's ``test_evaluator`` and has no ``--eval``. Here
``--eval bbox segm`` replaces the ``metric`` list of the ``CocoMetric`` in ``test_evaluator`` (an
unknown metric is refused before anything is built or written). The metrics mmengine computes are
dumped by its LoggerHook to ``<work_dir>/<timestamp>/<timestamp>.json``.
"""
import os.path as osp
import types
import warnings
from copy import deepcopy

from mmengine.config import ConfigDict

from .checkpoint import trusted_checkpoints
from .checkpoint_match import check_checkpoint_matches_config
from .config_checks import ConfigError, validate_config
from .data_errors import data_errors_named
from .dist import check_launcher_env, launcher_world_size, setup_cpu_distributed
from .runner_setup import build_runner, load_config, register_modules

__all__ = ['COCO_METRICS', 'check_eval_metrics', 'apply_eval_metrics', 'prepare_test_config', 'test']

# mmdet.evaluation.CocoMetric's allowed metrics (a local list in its __init__, so repeated here).
COCO_METRICS = ('bbox', 'segm', 'proposal', 'proposal_fast')


def check_eval_metrics(metrics):
    """The ``--eval`` list, de-duplicated in order; raise :class:`ConfigError` for an unknown metric."""
    metrics = list(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in COCO_METRICS]
    if unknown:
        raise ConfigError(f"--eval {' '.join(unknown)}: unsupported metric(s) {unknown}; supported "
                          f"(CocoMetric): {', '.join(COCO_METRICS)}")
    if not metrics:
        raise ConfigError(f"--eval needs at least one metric; supported: {', '.join(COCO_METRICS)}")
    return metrics


def _is_coco_metric(metric_cfg):
    return isinstance(metric_cfg, dict) and str(metric_cfg.get('type', '')).split('.')[-1] == 'CocoMetric'


def _has_mask_branch(node):
    if isinstance(node, dict):
        return any((isinstance(k, str) and 'mask' in k and v not in (None, False)) or _has_mask_branch(v)
                   for k, v in node.items())
    if isinstance(node, (list, tuple)):
        return any(_has_mask_branch(v) for v in node)
    return False


def apply_eval_metrics(cfg, metrics):
    """Replace the ``metric`` list of every CocoMetric in ``cfg.test_evaluator`` by ``metrics``."""
    metrics = check_eval_metrics(metrics)
    evaluator = cfg.get('test_evaluator')
    entries = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    if isinstance(evaluator, dict) and isinstance(evaluator.get('metrics'), (list, tuple, dict)):
        inner = evaluator['metrics']
        entries = inner if isinstance(inner, (list, tuple)) else [inner]
    coco = [e for e in entries if _is_coco_metric(e)]
    if not coco:
        types = [e.get('type') if isinstance(e, dict) else type(e).__name__ for e in entries]
        raise ConfigError(f'--eval maps onto a CocoMetric in test_evaluator, but test_evaluator has '
                          f'type(s) {types}')
    if 'segm' in metrics and not _has_mask_branch(cfg.get('model')):
        raise ConfigError(f"--eval segm needs a model with a mask branch; model.type = "
                          f"{cfg.model.get('type')!r} has none (use --eval bbox)")
    for entry in coco:
        entry['metric'] = list(metrics)
    return metrics


def _apply_tta(cfg):
    if 'tta_model' not in cfg:
        warnings.warn('Cannot find ``tta_model`` in config, we will set it as default.')
        cfg.tta_model = dict(type='DetTTAModel',
                             tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    if 'tta_pipeline' not in cfg:
        warnings.warn('Cannot find ``tta_pipeline`` in config, we will set it as default.')
        test_data_cfg = cfg.test_dataloader.dataset
        while 'dataset' in test_data_cfg:
            test_data_cfg = test_data_cfg['dataset']
        cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
        flip_tta = dict(type='TestTimeAug', transforms=[
            [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
            [dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                                   'scale_factor', 'flip', 'flip_direction'))]])
        cfg.tta_pipeline[-1] = flip_tta
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def prepare_test_config(config, checkpoint, *, work_dir=None, cfg_options=None, launcher='none',
                        eval_metrics=None, out=None, show=False, show_dir=None, wait_time=2.0, tta=False,
                        allow_partial_load=False, log=None):
    """The final, validated test config (raises :class:`ConfigError`; writes nothing).

    Args:
        config (str), checkpoint (str): the config file and the checkpoint to test.
        work_dir, cfg_options, launcher: as for :func:`cbn_mmdet.engine.training.prepare_train_config`.
        eval_metrics (list[str], optional): mmdet 2.x's ``--eval``: the CocoMetric's metric list.
        out (str, optional): a ``.pkl`` file for the predictions (checked here, written by :func:`test`).
        show, show_dir, wait_time: mmdet's visualisation options.
        tta (bool): test-time augmentation.
        allow_partial_load (bool): accept a checkpoint that does not match the model (reported via ``log``);
            by default missing/unexpected keys or shape mismatches raise a :class:`ConfigError`.
    """
    check_launcher_env(launcher)
    if eval_metrics is not None:
        check_eval_metrics(eval_metrics)          # before the config is even read
    if out is not None and not out.endswith(('.pkl', '.pickle')):
        raise ConfigError(f'--out {out!r}: the dump file must be a .pkl/.pickle file')
    register_modules()
    cfg = load_config(config, cfg_options, launcher, work_dir)
    if eval_metrics is not None:
        apply_eval_metrics(cfg, eval_metrics)
    validate_config(cfg, 'test', world_size=launcher_world_size(launcher))
    if not osp.isfile(osp.expanduser(checkpoint)) and '://' not in checkpoint:
        raise ConfigError(f'checkpoint {checkpoint!r} does not exist')
    # mmengine loads non-strictly: another model's checkpoint would give metrics of random heads.
    check_checkpoint_matches_config(cfg, checkpoint, allow_partial=allow_partial_load, log=log)
    cfg.load_from = checkpoint
    if show or show_dir:
        from mmdet.engine.hooks.utils import trigger_visualization_hook
        options = types.SimpleNamespace(show=show, show_dir=show_dir, wait_time=wait_time)
        cfg = trigger_visualization_hook(cfg, options)
    if tta:
        _apply_tta(cfg)
    return cfg


def test(cfg, out=None):
    """Build the Runner for a prepared config and test; returns the metrics dict."""
    setup_cpu_distributed(cfg, cfg.get('launcher', 'none'))
    runner = build_runner(cfg)
    if out is not None:
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=out))
    with trusted_checkpoints(paths=[cfg.load_from], dirs=[cfg.work_dir]), data_errors_named():
        metrics = runner.test()
    return metrics
