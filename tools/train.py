"""Train a detector: mmdet 3.x's ``tools/train.py`` with cbn_mmdet's layers registered.

Same arguments as mmdet's (config, --work-dir, --resume [CKPT], --amp, --auto-scale-lr, --cfg-options,
--launcher, --local-rank). In addition the config is validated before anything is written (missing
dataset paths, unknown norm/conv types, a process count that does not divide ``global_batch_size``),
checkpoints written by our own runs load under torch>=2.6, and ``--launcher pytorch`` also works on a
CPU-only machine (gloo). The logic lives in ``cbn_mmdet.engine.training``.
"""
import argparse
import os.path as osp
import sys
from importlib.util import find_spec

# An installed cbn_mmdet wins; only an uninstalled checkout puts itself on the path.
if find_spec('cbn_mmdet') is None:
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from cbn_mmdet.engine.config_checks import ConfigError  # noqa: E402
from cbn_mmdet.engine.data_errors import DataError  # noqa: E402
from cbn_mmdet.engine.training import finish_distributed, prepare_train_config, train  # noqa: E402
from cbn_mmdet.utils.cli import config_error_exit, parse_mmdet_tool_args  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector (mmdet 3.x + cbn_mmdet)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true', help='enable automatically scaling LR.')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from the given checkpoint, or (no value) from the latest checkpoint '
                        'in the work directory')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='let --resume load a checkpoint whose keys/shapes do not match the model')
    parser.add_argument('--allow-nonfinite-loss', action='store_true',
                        help='do not add NonFiniteLossHook (which stops the run at a NaN/Inf loss)')
    return parse_mmdet_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = prepare_train_config(args.config, work_dir=args.work_dir, cfg_options=args.cfg_options,
                                   launcher=args.launcher, amp=args.amp, auto_scale_lr=args.auto_scale_lr,
                                   resume=args.resume, log=lambda m: print(f'[cbn_mmdet] {m}', flush=True),
                                   allow_partial_load=args.allow_partial_load,
                                   nonfinite_check=not args.allow_nonfinite_loss)
        runner = train(cfg)
        finish_distributed()
        return runner
    except ConfigError as err:      # includes a work_dir held by a live run (refused before training)
        raise config_error_exit('tools/train.py', err) from None
    except DataError as err:        # a corrupt image met by the dataloader
        raise SystemExit(f'tools/train.py: data error: {err}') from None
    except FloatingPointError as err:   # NonFiniteLossHook / NormHealthHook stopped the run
        raise SystemExit(f'tools/train.py: stopped: {err}') from None


if __name__ == '__main__':
    main()
