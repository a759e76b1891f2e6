"""Statistics error of BN, naive cross-iteration averaging and CBN against large-batch statistics.

Trains a small conv net on the 8x8 digits (global batch 16 per SGD step, BN per "GPU" chunk of b images,
as data-parallel detector training without SyncBN) and, at chosen iterations, compares per
layer the mean/variance each estimator would use with the statistics of a 256-image reference set at
the current weights. Writes CSVs, a Markdown summary and PNG plots to ``--out``. See docs/fidelity.md.

    python tools/analysis/stats_error.py                     # the documented run (a few minutes, 2 cores)
    python tools/analysis/stats_error.py --quick --dataset synthetic --out /tmp/se
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))   # run from a checkout

from cbn_mmdet.analysis.data import DATASETS  # noqa: E402
from cbn_mmdet.analysis.stats_error import StatsErrorConfig, run_stats_error  # noqa: E402
from cbn_mmdet.utils.cli import add_study_args, float_list, int_list, study_config  # noqa: E402

# the StatsErrorConfig fields settable from the command line (besides --out, --dataset, --threads)
OPTIONS = ('batch_sizes', 'global_batch', 'windows', 'seeds', 'iters', 'num_evals', 'lr', 'lr_sweep',
           'lr_sweep_batch')


def parse_args(argv=None):
    d = StatsErrorConfig()
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_study_args(p, d, DATASETS)
    p.add_argument('--batch-sizes', type=int_list, help=f'comma-separated (default: {d.batch_sizes})')
    p.add_argument('--global-batch', type=int,
                   help=f'images per SGD step, BN per chunk of --batch-sizes (default: {d.global_batch})')
    p.add_argument('--windows', type=int_list, help=f'window sizes k = buffer_num + 1 (default: {d.windows})')
    p.add_argument('--seeds', type=int_list, help=f'default: {d.seeds}')
    p.add_argument('--iters', type=int, help=f'training iterations per trajectory (default: {d.iters})')
    p.add_argument('--num-evals', type=int, help=f'evaluation iterations per trajectory (default: {d.num_evals})')
    p.add_argument('--lr', type=float, help=f'learning rate of the main sweep (default: {d.lr})')
    p.add_argument('--lr-sweep', type=float_list,
                   help=f'extra learning rates at --lr-sweep-batch (default: {d.lr_sweep})')
    p.add_argument('--lr-sweep-batch', type=int, help=f'default: {d.lr_sweep_batch}')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_stats_error(study_config(StatsErrorConfig, args, OPTIONS), log=print)


if __name__ == '__main__':
    main()
