"""Benchmark conv + norm + ReLU training steps: BN, GN, BCN, MABN, CBN (exact, fast, official algorithm).

Torch only (imports ``cbn_mmdet.ops`` and ``cbn_mmdet.benchmark``; no mmcv), so it runs on a bare CUDA box.
The logic lives in ``cbn_mmdet.benchmark.norm_cli``.

    python tools/benchmark_norm.py                    # CPU-feasible subset of shapes
    python tools/benchmark_norm.py --full --device cuda
    python tools/benchmark_norm.py --markdown         # also write its sections of docs/benchmarks.md
    python tools/benchmark_norm.py --profile          # torch.profiler tables of BN / CBN / official
    python tools/benchmark_norm.py --fast-error       # error of stat_grad_sample on the window statistics
"""
import os
import os.path as osp
import sys

os.environ.setdefault('TORCH_CPP_LOG_LEVEL', 'ERROR')     # silence the CPU memory profiler's warnings
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))   # run from a checkout, uninstalled

from cbn_mmdet.benchmark.norm_cli import main  # noqa: E402

if __name__ == '__main__':
    main()
