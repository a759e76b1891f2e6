"""Print the CBN paper's results table (Markdown) with our numbers beside the paper's.

    python tools/analysis/results_table.py work_dirs/mask_rcnn_r50_fpn_cbn_buffer3_burnin8_1x ... \
        [--markdown results.md]

Each WORK_DIR is one training run: its numbers are the metrics of its latest ``tools/test.py`` run
(``<ts>/<ts>.json``), else of its last validation (``<ts>/vis_data/scalars.json``). Its row (model and
norm) comes from the config mmengine dumped into it, else from its name. Rows without results show "–".
The logic lives in ``cbn_mmdet.evaluation``.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))   # run from a checkout

from cbn_mmdet.evaluation import results_table  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('work_dirs', nargs='+', metavar='WORK_DIR')
    parser.add_argument('--markdown', metavar='FILE', help='also write the table to FILE')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    table = results_table(args.work_dirs, warn=lambda m: print(f'note: {m}', file=sys.stderr))
    print(table, end='')
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(table)
        print(f'written to {args.markdown}', file=sys.stderr)


if __name__ == '__main__':
    main()
