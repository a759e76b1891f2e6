"""Small-batch classification on Fashion-MNIST: BN, GN, BCN+WS, MABN+CenConv, naive CBN, CBN, CBN with the
gradient through the window, and BRN in a ResNet-8 at batch sizes 1-32 (same epochs for every batch size).

Writes a Markdown table, CSVs and a plot of test accuracy vs batch size to --out. See docs/fidelity.md.
The data come from the package dataset-fashion-mnist: `bash tools/misc/get_fashion_mnist.sh` first.

    python tools/analysis/fashion_mnist_study.py                   # the documented run (2 worker processes)
    python tools/analysis/fashion_mnist_study.py --quick --out /tmp/fm
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))   # run from a checkout

from cbn_mmdet.analysis.fmnist_study import NORMS, FMNISTConfig, run_study  # noqa: E402
from cbn_mmdet.utils.cli import choice_list, config_overrides, int_list  # noqa: E402

# the FMNISTConfig fields settable from the command line
OPTIONS = ('norms', 'batch_sizes', 'seeds', 'train_images', 'test_images', 'epochs', 'base_lr', 'base_batch',
           'workers', 'threads', 'data_root', 'brn_momentum', 'burnin_fraction')


def parse_args(argv=None):
    d = FMNISTConfig()
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=d.out, help='output folder (default: %(default)s)')
    p.add_argument('--quick', action='store_true', help='a run of a few seconds (for tests and smoke checks)')
    p.add_argument('--norms', type=choice_list(NORMS), help=f'comma-separated subset of {NORMS}')
    p.add_argument('--batch-sizes', type=int_list, help=f'default: {d.batch_sizes}')
    p.add_argument('--seeds', type=int_list, help=f'default: {d.seeds}')
    p.add_argument('--train-images', type=int, help=f'class-balanced training subset (default: {d.train_images})')
    p.add_argument('--test-images', type=int, help=f'class-balanced test subset (default: {d.test_images})')
    p.add_argument('--epochs', type=float, help=f'passes over the training subset per run (default: {d.epochs})')
    p.add_argument('--base-lr', type=float, help=f'lr at batch --base-batch, scaled linearly (default: {d.base_lr})')
    p.add_argument('--base-batch', type=int, help=f'default: {d.base_batch}')
    p.add_argument('--brn-momentum', type=float,
                   help=f'BRN running-statistic update weight (default: {d.brn_momentum})')
    p.add_argument('--burnin-fraction', type=float,
                   help=f'CBN burn-in and MABN warm-up, share of the iterations (default: {d.burnin_fraction})')
    p.add_argument('--workers', type=int, help=f'worker processes (default: {d.workers}; --quick: 1)')
    p.add_argument('--threads', type=int, help=f'torch threads per worker (default: {d.threads})')
    p.add_argument('--data-root', help='directory with the four .gz files (default: the system directory '
                                       '/usr/share/datasets/fashion-mnist, then the cache of get_fashion_mnist.sh)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = dict(config_overrides(args, OPTIONS), out=args.out)
    try:
        cfg = FMNISTConfig.quick(**overrides) if args.quick else FMNISTConfig(**overrides)
    except ValueError as err:
        raise SystemExit(f'fashion_mnist_study.py: {err}') from None
    try:
        return run_study(cfg, log=print)
    except FileNotFoundError as err:
        raise SystemExit(f'fashion_mnist_study.py: {err}') from None


if __name__ == '__main__':
    main()
