"""Print the CBN paper's results table (Markdown) with our numbers beside the paper's.

    python tools/analysis/results_table.py work_dirs/mask_rcnn_r50_fpn_cbn_buffer3_burnin8_1x ... \
        [--markdown results.md]

Each WORK_DIR is a training run, or a folder holding runs below it (``work_dirs`` itself): a run is a
directory with mmengine's ``<timestamp>/`` folders. Its numbers are the metrics of its latest
``tools/test.py`` run (``<ts>/<ts>.json``), else of its last validation (``<ts>/vis_data/scalars.json``).
Its row (model and norm) comes from the config mmengine dumped into it, else from its name. Rows without
results show "–". A path that does not exist, or no run at all, is an error.
The logic lives in ``cbn_mmdet.evaluation``.
"""
import argparse
import os
import os.path as osp
import re
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))   # run from a checkout

from cbn_mmdet.evaluation import results_table  # noqa: E402

_TIMESTAMP = re.compile(r'^\d{8}_\d{6}$')     # mmengine's <work_dir>/<timestamp>/ folders


def _is_run(directory):
    return any(_TIMESTAMP.match(name) and osp.isdir(osp.join(directory, name)) for name in os.listdir(directory))


def find_runs(paths, warn=None):
    """The run directories of ``paths``: each one itself if it is a run, else the runs found below it.

    Raises ``SystemExit`` naming a path that is not a directory, or when no path holds any run (a path
    without runs is reported through ``warn``).
    """
    runs = []
    for path in paths:
        if not osp.isdir(path):
            raise SystemExit(f'results_table: WORK_DIR {path!r} does not exist or is not a directory')
        found = []
        for base, dirs, _ in os.walk(path):
            dirs.sort()
            if _is_run(base):
                found.append(base)
                dirs[:] = []            # a run's own subfolders are not runs
        if not found and warn is not None:
            warn(f'{path}: no training run (a directory with <timestamp>/ folders) in or below it')
        runs += found
    if not runs:
        raise SystemExit(f'results_table: no training run (a directory with <timestamp>/ folders) in or below '
                         f'{", ".join(map(repr, paths))}')
    return list(dict.fromkeys(runs))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('work_dirs', nargs='+', metavar='WORK_DIR')
    parser.add_argument('--markdown', metavar='FILE', help='also write the table to FILE')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    def warn(message):
        print(f'note: {message}', file=sys.stderr)
    table = results_table(find_runs(args.work_dirs, warn), warn=warn)
    print(table, end='')
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(table)
        print(f'written to {args.markdown}', file=sys.stderr)


if __name__ == '__main__':
    main()
