#!/usr/bin/env python
"""Fold eval-mode norm layers into their convs and verify: tools/deploy/fuse_norm.py CONFIG [CKPT] [--out F]."""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

import torch  # noqa: E402

from cbn_mmdet.deploy.fuse_detector import fuse_detector  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Fold eval-mode norm layers (BN, SyncBN, CBN, BCN\'s BN '
                                     'part, MABN) into their convs and verify the fused detector')
    parser.add_argument('config')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='checkpoint to load (omit to fuse a freshly initialised model)')
    parser.add_argument('--out', help='save the fused model (torch.save of the whole module)')
    parser.add_argument('--shape', type=int, nargs=2, default=(320, 320), help='verification input H W')
    parser.add_argument('--atol', type=float, default=1e-3, help='max abs difference allowed')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='fuse even if the checkpoint\'s keys/shapes do not match the config\'s model')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from cbn_mmdet.engine.config_checks import ConfigError
    if not osp.isfile(args.config):
        raise SystemExit(f'fuse_norm: config file {args.config!r} does not exist')
    try:
        fused, report, diff = fuse_detector(args.config, args.checkpoint, tuple(args.shape),
                                            allow_partial_load=args.allow_partial_load,
                                            log=lambda m: print(f'fuse_norm: {m}', flush=True))
    except ConfigError as err:
        raise SystemExit(f'fuse_norm: {err}') from None
    print(f'fused {len(report["fused"])} norm layers; kept {len(report["kept"])}')
    for name, reason in report['kept'].items():
        print(f'  kept {name}: {reason}')
    print(f'max |fused - unfused| on backbone+neck features: {diff:.3g} (allowed {args.atol:g})')
    if diff > args.atol:
        raise SystemExit(f'fuse_norm: verification failed, max abs difference {diff:.3g} > --atol {args.atol:g}')
    if args.out:
        torch.save(fused, args.out)
        print(f'saved the fused model to {args.out}')
    return report, diff


if __name__ == '__main__':
    main()
