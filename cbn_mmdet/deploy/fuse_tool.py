"""Logic of ``tools/deploy/fuse_norm.py``: build a detector, load a checkpoint, fuse, verify, save."""
import argparse
import copy

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Fold eval-mode norm layers (BN, SyncBN, CBN, BCN\'s BN '
                                     'part, MABN) into their convs and verify the fused detector')
    parser.add_argument('config')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='checkpoint to load (omit to fuse a freshly initialised model)')
    parser.add_argument('--out', help='save the fused model (torch.save of the whole module)')
    parser.add_argument('--shape', type=int, nargs=2, default=(320, 320), help='verification input H W')
    parser.add_argument('--atol', type=float, default=1e-3, help='max abs difference allowed')
    return parser.parse_args(argv)


def verify(model, fused, shape, seed=0):
    """Max abs difference of the backbone+neck features of the two models on a random batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, *shape, generator=gen)
    with torch.no_grad():
        ref, out = model.extract_feat(x), fused.extract_feat(x)
    ref = ref if isinstance(ref, (tuple, list)) else (ref, )
    out = out if isinstance(out, (tuple, list)) else (out, )
    return max(float((a - b).abs().max()) for a, b in zip(ref, out))


def main(argv=None):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    import cbn_mmdet  # noqa: F401  (registration)
    from cbn_mmdet.apis.checkpoint import trusted_checkpoints
    from cbn_mmdet.deploy import fuse_norm_layers

    args = parse_args(argv)
    register_all_modules()
    cfg = Config.fromfile(args.config)
    model = MODELS.build(cfg.model)
    if args.checkpoint:
        with trusted_checkpoints(paths=[args.checkpoint]):
            load_checkpoint(model, args.checkpoint, map_location='cpu')
    model.eval()
    fused = copy.deepcopy(model)
    report = fuse_norm_layers(fused)
    diff = verify(model, fused, tuple(args.shape))
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
