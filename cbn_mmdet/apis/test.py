"""``tools/test.py``: mmdet 3.x's test tool plus mmdet 2.x's ``--eval`` and config validation.

mmdet 3.x computes metrics with the config's ``test_evaluator`` and has no ``--eval``. Here
``--eval bbox segm`` replaces the ``metric`` list of the ``CocoMetric`` in ``test_evaluator`` (an
unknown metric is refused before anything is built or written). The metrics mmengine computes are
dumped by its LoggerHook to ``<work_dir>/<timestamp>/<timestamp>.json``.
"""
import argparse
import json
import os.path as osp
import warnings
from copy import deepcopy

from mmengine.config import ConfigDict, DictAction

from .checkpoint import trusted_checkpoints
from .common import add_launcher_args, build_runner, load_config, register_modules, set_local_rank_env
from .dist import launcher_world_size, setup_cpu_distributed
from .validate import ConfigError, validate_config

__all__ = ['COCO_METRICS', 'parse_test_args', 'check_eval_metrics', 'apply_eval_metrics',
           'prepare_test_config', 'test', 'main']

# mmdet.evaluation.CocoMetric's allowed metrics (a local list in its __init__, so repeated here).
COCO_METRICS = ('bbox', 'segm', 'proposal', 'proposal_fast')


def parse_test_args(argv=None):
    parser = argparse.ArgumentParser(description='MMDet test (and eval) a model (mmdet 3.x + cbn_mmdet)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the directory to save the file containing evaluation metrics')
    parser.add_argument('--out', type=str, help='dump predictions to a pickle file for offline evaluation')
    parser.add_argument('--eval', nargs='+', metavar='METRIC',
                        help='mmdet 2.x style: the metrics of the CocoMetric in test_evaluator, e.g. '
                        f'"--eval bbox segm" (supported: {", ".join(COCO_METRICS)})')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='directory where painted images will be saved (inside '
                        'work_dir/timestamp/)')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs (xxx=yyy) merged into the config')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    add_launcher_args(parser)
    args = parser.parse_args(argv)
    set_local_rank_env(args.local_rank)
    return args


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


def prepare_test_config(args):
    """The final, validated test config for ``args`` (raises :class:`ConfigError`; writes nothing)."""
    if args.eval is not None:
        check_eval_metrics(args.eval)          # before the config is even read
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise ConfigError(f'--out {args.out!r}: the dump file must be a .pkl/.pickle file')
    register_modules()
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.eval is not None:
        apply_eval_metrics(cfg, args.eval)
    validate_config(cfg, 'test', world_size=launcher_world_size(args.launcher))
    if not osp.isfile(osp.expanduser(args.checkpoint)) and '://' not in args.checkpoint:
        raise ConfigError(f'checkpoint {args.checkpoint!r} does not exist')
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        from mmdet.engine.hooks.utils import trigger_visualization_hook
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        _apply_tta(cfg)
    return cfg


def test(cfg, out=None):
    """Build the Runner for a prepared config and test; returns the metrics dict."""
    setup_cpu_distributed(cfg, cfg.get('launcher', 'none'))
    runner = build_runner(cfg)
    if out is not None:
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=out))
    with trusted_checkpoints(paths=[cfg.load_from], dirs=[cfg.work_dir]):
        metrics = runner.test()
    return metrics


def main(argv=None):
    args = parse_test_args(argv)
    try:
        cfg = prepare_test_config(args)
    except ConfigError as err:
        raise SystemExit(f'tools/test.py: config error: {err}') from None
    metrics = test(cfg, out=args.out)
    from mmengine.dist import is_main_process
    if is_main_process():
        print('[cbn_mmdet] test metrics: ' + json.dumps({k: v for k, v in (metrics or {}).items()
                                                          if isinstance(v, (int, float))}), flush=True)
    return metrics
