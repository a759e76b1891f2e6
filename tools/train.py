"""Train a detector: mmdet 3.x's ``tools/train.py`` with cbn_mmdet's layers registered.

Same arguments as mmdet's (config, --work-dir, --resume [CKPT], --amp, --auto-scale-lr, --cfg-options,
--launcher, --local-rank). In addition the config is validated before anything is written (missing
dataset paths, unknown norm/conv types, a process count that does not divide ``global_batch_size``),
checkpoints written by our own runs load under torch>=2.6, and ``--launcher pytorch`` also works on a
CPU-only machine (gloo). The logic lives in ``cbn_mmdet.apis.train``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))   # run from a checkout, uninstalled

from cbn_mmdet.apis.train import main  # noqa: E402

if __name__ == '__main__':
    main()
