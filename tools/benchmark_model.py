"""Benchmark a whole Mask R-CNN R-50-FPN training step with each norm config of the CBN paper.

Built from ``configs/cbn/`` (baseline, SyncBN, GN, CBN buffer3) plus a BN config derived from the SyncBN
one (``type='BN'`` in the same places), CBN with ``stat_grad_sample=0.25``, CBN computed the official
way (the test oracle's module, ``tests/oracles/official_cbn.py``) and exact CBN's compute floor ``BN+wgrad``
(BN in each CBN layer's place plus its conv's dν/dW weight-gradient); same heads, same inputs (2 images
320x480), interleaved steps. Needs mmdet and a checkout (the configs, the oracle). The measurements live in
``cbn_mmdet.benchmark``; this script parses arguments and reports.

    python tools/benchmark_model.py                   # all variants, ~5-8 min on 2 CPU cores
    python tools/benchmark_model.py --variants BN,CBN --repeats 5 --markdown
"""
import argparse
import os
import os.path as osp
import sys

os.environ.setdefault('TORCH_CPP_LOG_LEVEL', 'ERROR')     # silence the CPU memory profiler's warnings
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)   # run from a checkout: cbn_mmdet (uninstalled) and tests.oracles

import torch  # noqa: E402

from cbn_mmdet.benchmark.model_bench import DEFAULT_VARIANTS, MODEL_VARIANTS, model_rows, run_model_benchmark  # noqa: E402
from cbn_mmdet.benchmark.report import machine_info, machine_line, markdown_table, text_table, write_doc_section  # noqa: E402
from tests.oracles.official_cbn import OfficialCBNModule  # noqa: E402

DOC = osp.join(ROOT, 'docs', 'benchmarks.md')
CONFIG_DIR = osp.join(ROOT, 'configs', 'cbn')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Mask R-CNN R-50-FPN training step with each norm config.')
    parser.add_argument('--variants', default=','.join(DEFAULT_VARIANTS),
                        help=f'comma list from {",".join(MODEL_VARIANTS)}')
    parser.add_argument('--repeats', type=int, default=3, help='interleaved timed rounds (median reported)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps per model (fills the CBN window)')
    parser.add_argument('--rois-per-image', type=int, default=128,
                        help="RoI sampler's num per image (paper: 512; 0 keeps the config's)")
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    parser.add_argument('--no-peak', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--markdown', nargs='?', const=DOC, default=None, metavar='PATH',
                        help='write its section of docs/benchmarks.md (or PATH)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    unknown = [v for v in variants if v not in MODEL_VARIANTS]
    if unknown:
        raise SystemExit(f'unknown variant(s) {unknown}; choose from {", ".join(MODEL_VARIANTS)}')
    load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None
    results = run_model_benchmark(CONFIG_DIR, variants, repeats=args.repeats, warmup=args.warmup, device=args.device,
                                  measure_peak=not args.no_peak, rois_per_image=args.rois_per_image or None,
                                  log=print, official=OfficialCBNModule)
    header, rows = model_rows(results)
    print('\nMask R-CNN R-50-FPN, 2 images 320x480, training step (median), ratios to the BN config and the '
          'baseline:')
    print(text_table(header, rows))
    machine = machine_line(machine_info(args.device), load_before)
    print('\n' + machine)
    if args.markdown:
        cmd = 'python tools/benchmark_model.py ' + ' '.join(sys.argv[1:])
        body = [f'Measured with `{cmd.strip()}` on: {machine}.', '',
                f'Median of {args.repeats} interleaved steps after {args.warmup} warm-up steps per model; a '
                'step = preprocessing + forward with losses + backward + SGD step. Peak memory: tensors '
                'allocated during one step (CPU: torch.profiler memory timeline; CUDA: max_memory_allocated). '
                'Norm state: bytes of the norm layers\' state (state_dict, buffers, attribute tensors such as the '
                'official layer\'s list window) in the FPN and the RoI heads. RoIs: mean number of RoIs '
                'entering the box / mask head per step.', '',
                markdown_table(header, rows)]
        write_doc_section(args.markdown, 'model-benchmark', '\n'.join(body))
        print(f'wrote {args.markdown}')


if __name__ == '__main__':
    main()
