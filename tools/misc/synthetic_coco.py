"""Generate (or reuse) the synthetic COCO-format shapes dataset of the demo and the tests.

    python tools/misc/synthetic_coco.py [OUT_DIR] [--seed S] [--num-train N] ...

OUT_DIR must be new, or hold the generator's set of the same parameters (reused). Anything else is
refused, never overwritten: delete an old synthetic set yourself, or choose another directory.

The logic lives in ``cbn_mmdet.datasets.synthetic_coco``.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))   # run from a checkout

from cbn_mmdet.datasets import DEFAULT_PARAMS, ensure_synthetic_coco  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Generate the synthetic COCO-format shapes dataset')
    parser.add_argument('out_dir', nargs='?', default='data/synthetic_coco')
    for key, value in DEFAULT_PARAMS.items():
        parser.add_argument('--' + key.replace('_', '-'), type=int, default=value)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    params = {key: getattr(args, key) for key in DEFAULT_PARAMS}
    try:
        made = ensure_synthetic_coco(args.out_dir, **params)
    except (TypeError, ValueError) as err:     # SyntheticDataError: an existing directory that is not ours
        raise SystemExit(f'tools/misc/synthetic_coco.py: {err}') from None
    print(f"{'generated' if made else 'reused'} {args.out_dir}")


if __name__ == '__main__':
    main()
