"""Benchmark a whole Mask R-CNN R-50-FPN training step with each norm config of the CBN paper.

Built from ``configs/cbn/`` (baseline, SyncBN, GN, CBN buffer3) plus a BN config derived from the SyncBN
one (``type='BN'`` in the same places), CBN with ``stat_grad_sample=0.25`` and CBN computed the official
way; same heads, same inputs (2 images 320x480), interleaved steps. Needs mmdet. The logic lives in
``cbn_mmdet.benchmark.model_cli``.

    python tools/benchmark_model.py                   # all variants, ~5-8 min on 2 CPU cores
    python tools/benchmark_model.py --variants BN,CBN --repeats 5 --markdown
"""
import os
import os.path as osp
import sys

os.environ.setdefault('TORCH_CPP_LOG_LEVEL', 'ERROR')     # silence the CPU memory profiler's warnings
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))   # run from a checkout, uninstalled

from cbn_mmdet.benchmark.model_cli import main  # noqa: E402

if __name__ == '__main__':
    main()
