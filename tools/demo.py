"""End-to-end demo: synthetic data -> train every variant on 2 processes -> evaluate with bootstrap intervals.

    .venv/bin/python tools/demo.py [--work-dir work_dirs/demo] [--variants baseline bn syncbn gn cbn cbn_gtw]
                                   [--seeds 1] [--procs 2]

Usually started as ``bash tools/demo.sh`` (which first sets up .venv). About 10 minutes on 2 CPU cores
for one seed; writes results.md, results.json and loss_curves.png into the work dir. The logic lives in
``cbn_mmdet.demo``.
"""
import argparse
import os.path as osp
import sys
import warnings

# setuptools<82 (needed by mmengine/mmcv) warns about pkg_resources on every import: keep the console readable
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)   # run from a checkout, uninstalled

from cbn_mmdet.demo import VARIANTS, DemoError, run_demo  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='cbn_mmdet end-to-end demo (synthetic data, CPU, ~10 min)')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='where the runs and the report go')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS),
                        help='which demo configs to train (default: all)')
    parser.add_argument('--seeds', type=int, default=1,
                        help='runs per variant (seeds 0..N-1); the report gives mean ± std over them (default 1)')
    parser.add_argument('--procs', type=int, default=2,
                        help='processes per run, one image each (tools/dist_train.sh CFG N; default 2)')
    parser.add_argument('--bootstrap-samples', type=int, default=1000,
                        help='resamples of the validation images for the intervals (default 1000)')
    parser.add_argument('--loss-images', type=int, default=40,
                        help='validation images of the train/eval-mode loss measurement (default 40)')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='extra key=value overrides passed to every training run')
    parser.add_argument('--test-cfg-options', nargs='+', default=[],
                        help='extra key=value overrides of every test and loss measurement')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        _, _, ok = run_demo(ROOT, args.work_dir, args.variants, seeds=args.seeds, train_args=args.cfg_options,
                            test_args=args.test_cfg_options,
                            procs=args.procs, num_samples=args.bootstrap_samples, loss_images=args.loss_images,
                            say=lambda message='': print(message, flush=True))
    except DemoError as err:
        raise SystemExit(f'demo failed: {err}') from None
    if not ok:
        raise SystemExit('demo failed: a required model did not learn (see the table above)')


if __name__ == '__main__':
    main()
