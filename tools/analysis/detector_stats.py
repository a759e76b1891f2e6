"""Statistics error of per-GPU BN, SyncBN, the naive window and CBN inside the demo's Mask R-CNN.

Trains the demo config (the same Runner and hooks as tools/train.py, validation off) and, before chosen
iterations, compares for every conv + norm of the FPN, the box head and the mask head the statistics
each estimator would normalise with against those of a large held-out batch at the current weights.
Writes CSVs, a Markdown summary and PNG plots to --out. See docs/fidelity.md.

    python tools/analysis/detector_stats.py                       # the documented run (~10 min, 2 cores)
    python tools/analysis/detector_stats.py --quick --out work_dirs/ds_quick   # seconds: one point, window 2
"""
import argparse
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))   # run from a checkout

from cbn_mmdet.analysis.detector_stats import DetectorStatsConfig, run_detector_stats  # noqa: E402
from cbn_mmdet.utils.cli import add_cfg_options_arg  # noqa: E402

OPTIONS = ('config', 'windows', 'points', 'num_points', 'ref_size', 'out', 'threads')


def parse_args(argv=None):
    d = DetectorStatsConfig()
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', help=f'the detector config to train (default: {d.config})')
    p.add_argument('--windows', type=int, nargs='+', help=f'window sizes k (default: {" ".join(map(str, d.windows))})')
    p.add_argument('--points', type=int, nargs='+',
                   help='training iterations to measure at (default: --num-points spread over the run)')
    p.add_argument('--num-points', type=int, help=f'points when --points is not given (default: {d.num_points})')
    p.add_argument('--ref-size', type=int, help=f'held-out images of the truth (default: {d.ref_size})')
    p.add_argument('--out', help=f'output folder (default: {d.out})')
    p.add_argument('--threads', type=int, help=f'torch threads (default: {d.threads})')
    p.add_argument('--quick', action='store_true', help='a tiny run (one point, window 2, 2 reference images)')
    add_cfg_options_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    given = {k: tuple(v) if isinstance(v, list) else v for k in OPTIONS if (v := getattr(args, k)) is not None}
    if args.cfg_options:
        given['cfg_options'] = dict(args.cfg_options)
    cfg = DetectorStatsConfig.quick(**given) if args.quick else DetectorStatsConfig(**given)
    try:
        return run_detector_stats(cfg, log=lambda message: print(message, flush=True))
    except ValueError as err:
        raise SystemExit(f'detector_stats: {err}' if not str(err).startswith('detector_stats') else str(err)) from None


if __name__ == '__main__':
    main()
