"""Test (and evaluate) a detector: mmdet 3.x's ``tools/test.py`` with cbn_mmdet's layers registered.

Same arguments as mmdet's (config, checkpoint, --work-dir, --out, --show, --show-dir, --cfg-options,
--launcher, --tta), plus mmdet 2.x's ``--eval bbox segm`` (mapped onto the CocoMetric of
``test_evaluator``). The logic lives in ``cbn_mmdet.engine.testing``.
"""
import argparse
import json
import os.path as osp
import sys
from importlib.util import find_spec

# An installed cbn_mmdet wins; only an uninstalled checkout puts itself on the path.
if find_spec('cbn_mmdet') is None:
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from cbn_mmdet.engine.config_checks import ConfigError  # noqa: E402
from cbn_mmdet.engine.data_errors import DataError  # noqa: E402
from cbn_mmdet.engine.testing import COCO_METRICS, prepare_test_config, test  # noqa: E402
from cbn_mmdet.utils.cli import config_error_exit, parse_mmdet_tool_args  # noqa: E402


def parse_args(argv=None):
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
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='test even if the checkpoint\'s keys/shapes do not match the model (partly random)')
    return parse_mmdet_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = prepare_test_config(args.config, args.checkpoint, work_dir=args.work_dir,
                                  cfg_options=args.cfg_options, launcher=args.launcher, eval_metrics=args.eval,
                                  out=args.out, show=args.show, show_dir=args.show_dir,
                                  wait_time=args.wait_time, tta=args.tta, allow_partial_load=args.allow_partial_load,
                                  log=lambda m: print(f'[cbn_mmdet] {m}', flush=True))
    except ConfigError as err:
        raise config_error_exit('tools/test.py', err) from None
    try:
        metrics = test(cfg, out=args.out)
    except DataError as err:        # a corrupt image met by the dataloader
        raise SystemExit(f'tools/test.py: data error: {err}') from None
    from mmengine.dist import is_main_process
    if is_main_process():
        print('[cbn_mmdet] test metrics: ' + json.dumps({k: v for k, v in (metrics or {}).items()
                                                          if isinstance(v, (int, float))}), flush=True)
    return metrics


if __name__ == '__main__':
    main()
