"""The training loss of a demo model on validation images, in train mode and in eval mode.

    python -m torch.distributed.run --nproc_per_node 2 -m cbn_mmdet.demo.val_loss CONFIG \\
        --checkpoint original=A.pth --checkpoint precise=B.pth --num-images 100 --out losses.json

Run with as many processes as training had and one image per process and forward, so that every norm
layer sees in train mode exactly what it saw in training (per-process BN one image, SyncBN the images of
all processes, CBN one image per iteration over its window). The same images, the same sampled RoIs
(seeded) and the same loss are computed

* in **eval mode** with each checkpoint's running statistics (what the test uses), and
* in **train mode** (batch statistics; the running statistics play no part, so once, with the first
  checkpoint's weights; nothing is backpropagated, CBN runs its window).

A train/eval gap much larger than that of a model without norm layers in train mode says that the
running statistics do not describe what the layers see in training. Writes ``{"eval": {name: loss},
"train": loss, "num_images": N}`` (the mean total loss per image over all processes) to ``--out``.
"""
import argparse
import json
import os

__all__ = ['main']


def _parse(argv):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='training loss on validation images, train vs eval mode')
    parser.add_argument('config')
    parser.add_argument('--checkpoint', action='append', required=True, metavar='NAME=PATH',
                        help='a checkpoint to evaluate in eval mode (repeatable); the first one also in train mode')
    parser.add_argument('--num-images', type=int, default=100, help='first N validation images (default 100)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', required=True, help='JSON file written by rank 0')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={}, metavar='KEY=VALUE',
                        help='overrides of the config (e.g. the test data set)')
    args = parser.parse_args(argv)
    checkpoints = []
    for item in args.checkpoint:
        name, sep, path = item.partition('=')
        if not sep or not name or not path:
            parser.error(f'--checkpoint must be NAME=PATH, got {item!r}')
        checkpoints.append((name, path))
    if args.num_images < 1:
        parser.error(f'--num-images must be >= 1, got {args.num_images}')
    return args, checkpoints


def _losses(model, dataset, indices, training, seed):
    import torch
    from mmengine.dataset import pseudo_collate
    model.train(training)
    torch.manual_seed(seed)
    total, count = 0.0, 0
    grad = torch.enable_grad() if training else torch.no_grad()   # CBN's window needs the graph
    with grad:
        for i in indices:
            data = model.data_preprocessor(pseudo_collate([dataset[i]]), True)
            loss, _ = model.parse_losses(model(**data, mode='loss'))
            total += float(loss.detach())
            count += 1
    return total, count


def main(argv=None):
    args, checkpoints = _parse(argv)
    import torch
    import torch.distributed as dist
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    from ..engine.checkpoint import trusted_checkpoints
    from ..engine.runner_setup import register_modules
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('gloo')
    register_modules()
    from mmdet.registry import DATASETS, MODELS
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    num_images = min(args.num_images, len(dataset))
    num_images -= num_images % world                 # every process the same number of forwards
    indices = list(range(rank, num_images, world))
    model = MODELS.build(cfg.model)
    result = dict(eval={}, num_images=num_images)
    sums = []
    with trusted_checkpoints([path for _, path in checkpoints]):    # our own runs' checkpoints (torch>=2.6)
        for name, path in checkpoints:
            load_checkpoint(model, path, map_location='cpu', logger='silent')
            sums.append(_losses(model, dataset, indices, False, args.seed + rank))
        load_checkpoint(model, checkpoints[0][1], map_location='cpu', logger='silent')
        sums.append(_losses(model, dataset, indices, True, args.seed + rank))
    flat = torch.tensor([v for pair in sums for v in pair], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(flat)
    means = [float(flat[2 * i] / flat[2 * i + 1]) for i in range(len(sums))]
    for (name, _), value in zip(checkpoints, means):
        result['eval'][name] = value
    result['train'] = means[-1]
    if rank == 0:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
        print('[cbn_mmdet] val loss: ' + json.dumps(result), flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
