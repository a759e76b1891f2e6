"""Small-batch classification benchmark: BN, GN, BCN, MABN, CBN and naive CBN on the 8x8 digits.

Trains the same small CNN with every norm at several batch sizes and seeds (same number of samples
seen per run), then writes a Markdown table, a CSV and a plot of test accuracy vs batch size to
``--out``. See docs/fidelity.md.

    python tools/analysis/small_batch_bench.py               # the documented run (< 15 min, 2 cores)
    python tools/analysis/small_batch_bench.py --quick --dataset synthetic --out /tmp/sb
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))   # run from a checkout

from cbn_mmdet.analysis.data import DATASETS  # noqa: E402
from cbn_mmdet.analysis.nets import NORMS  # noqa: E402
from cbn_mmdet.analysis.small_batch import BenchConfig, run_bench  # noqa: E402
from cbn_mmdet.utils.cli import add_study_args, choice_list, int_list, study_config  # noqa: E402

# the BenchConfig fields settable from the command line (besides --out, --dataset, --threads)
OPTIONS = ('norms', 'batch_sizes', 'seeds', 'epochs', 'base_lr', 'base_batch', 'cbn_buffer', 'cbn_burnin')


def parse_args(argv=None):
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_study_args(p, d, DATASETS)
    p.add_argument('--norms', type=choice_list(NORMS), help=f'comma-separated subset of {NORMS}')
    p.add_argument('--batch-sizes', type=int_list, help=f'default: {d.batch_sizes}')
    p.add_argument('--seeds', type=int_list, help=f'default: {d.seeds}')
    p.add_argument('--epochs', type=float, help=f'passes over the training split per run (default: {d.epochs})')
    p.add_argument('--base-lr', type=float, help=f'lr at batch --base-batch, scaled linearly (default: {d.base_lr})')
    p.add_argument('--base-batch', type=int, help=f'default: {d.base_batch}')
    p.add_argument('--cbn-buffer', type=int, help=f'CBN buffer_num (default: {d.cbn_buffer})')
    p.add_argument('--cbn-burnin', type=int, help=f'CBN burn-in in training forwards (default: {d.cbn_burnin})')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_bench(study_config(BenchConfig, args, OPTIONS), log=print)


if __name__ == '__main__':
    main()
