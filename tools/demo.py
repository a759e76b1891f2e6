"""End-to-end demo: synthetic data -> train baseline/CBN (+GN, SyncBN if time allows) -> evaluate.

    .venv/bin/python tools/demo.py [--work-dir work_dirs/demo] [--variants baseline cbn gn syncbn]
                                   [--budget 540]

Usually started as ``bash tools/demo.sh`` (which first sets up .venv). About 10 minutes on 2 CPU
cores; writes results.md, results.json and loss_curves.png into the work dir. The logic lives in
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
                        help='which demo configs to train (baseline and cbn always run first)')
    parser.add_argument('--budget', type=float, default=540.0,
                        help='seconds; optional variants (gn, syncbn) start only if they fit (default 540)')
    parser.add_argument('--jobs', type=int, default=None,
                        help='runs trained side by side (default: min(2, CPUs)), each with CPUs/jobs threads')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='extra key=value overrides passed to every tools/train.py run')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        _, _, ok = run_demo(ROOT, args.work_dir, args.variants, args.budget, args.cfg_options, args.jobs,
                            say=lambda message='': print(message, flush=True))
    except DemoError as err:
        raise SystemExit(f'demo failed: {err}') from None
    if not ok:
        raise SystemExit('demo failed: a required model did not learn (see the table above)')


if __name__ == '__main__':
    main()
