"""Benchmark conv + norm + ReLU training steps: BN, GN, BCN, MABN, CBN (exact, fast, official algorithm).

Torch only (imports ``cbn_mmdet.ops`` and ``cbn_mmdet.benchmark``; no mmcv), so it runs on a bare CUDA box.
The measurements live in ``cbn_mmdet.benchmark``; this script parses arguments and reports. It runs from a
checkout: the official algorithm it times (case ``CBN-official``) is the test oracle's module
(``tests/oracles/official_cbn.py``), handed to the benchmark as a factory.

    python tools/benchmark_norm.py                    # CPU-feasible subset of shapes
    python tools/benchmark_norm.py --full --device cuda
    python tools/benchmark_norm.py --markdown         # also write its sections of docs/benchmarks.md
    python tools/benchmark_norm.py --profile          # torch.profiler tables of BN / CBN / official
    python tools/benchmark_norm.py --fast-error       # error of stat_grad_sample on the window statistics
"""
import argparse
import os
import os.path as osp
import sys

os.environ.setdefault('TORCH_CPP_LOG_LEVEL', 'ERROR')     # silence the CPU memory profiler's warnings
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)   # run from a checkout: cbn_mmdet (uninstalled) and tests.oracles

import torch  # noqa: E402

from cbn_mmdet.benchmark.fast_mode import fast_mode_error  # noqa: E402
from cbn_mmdet.benchmark.norm_bench import (  # noqa: E402
    NORMS,
    ConvShape,
    default_shapes,
    memory_rows,
    op_rows,
    profile_case,
    run_norm_benchmark,
    time_rows,
)
from cbn_mmdet.benchmark.report import machine_info, machine_line, markdown_table, text_table, write_doc_section  # noqa: E402
from tests.oracles.official_cbn import OfficialCBNModule  # noqa: E402

DOC = osp.join(ROOT, 'docs', 'benchmarks.md')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Benchmark conv + norm + ReLU training steps.')
    parser.add_argument('--full', action='store_true', help='every FPN level x batch 1, 2, 4 and RoI shape')
    parser.add_argument('--shape', action='append', default=None, metavar='N,CIN,H,W,K[,COUT]',
                        help='benchmark this conv shape instead of the default set (repeatable)')
    parser.add_argument('--norms', default=','.join(NORMS), help=f'comma list from {",".join(NORMS)}')
    parser.add_argument('--repeats', type=int, default=9, help='interleaved timed rounds (median reported)')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps per case (>= buffer_num + 1)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    parser.add_argument('--no-peak', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--no-op-count', action='store_true', help='skip the aten-op count per step')
    parser.add_argument('--markdown', nargs='?', const=DOC, default=None, metavar='PATH',
                        help='write the generated sections of docs/benchmarks.md (or PATH)')
    parser.add_argument('--profile', action='store_true', help='profile BN / CBN / official at one shape')
    parser.add_argument('--profile-shape', default='2,256,25,42,3', metavar='N,CIN,H,W,K[,COUT]',
                        help='the shape profiled by --profile (default: FPN P5 3x3 at batch 2)')
    parser.add_argument('--profile-norms', default='BN,CBN,CBN-fast,CBN-official', help='cases for --profile')
    parser.add_argument('--doc-tag', default='', help='suffix of the generated section names (e.g. before)')
    parser.add_argument('--fast-error', action='store_true', help='measure the fast mode error')
    parser.add_argument('--skip-timing', action='store_true', help='only --profile / --fast-error')
    return parser.parse_args(argv)


def _parse_shape(text, option='--shape'):
    """``N,CIN,H,W,K[,COUT]``; a geometry of the built-in set keeps its name (e.g. 'P5 fpn 3x3')."""
    try:
        values = [int(v) for v in text.split(',')]
    except ValueError:
        values = []
    if len(values) not in (5, 6) or min(values) < 1:
        raise SystemExit(f'{option} expects N,CIN,H,W,K[,COUT] (positive integers), got {text!r}')
    n, cin, h, w, k = values[:5]
    cout = values[5] if len(values) == 6 else 256
    for known in default_shapes(full=True):
        if (known.n, known.cin, known.cout, known.h, known.w, known.k) == (n, cin, cout, h, w, k):
            return known
    return ConvShape('custom', 'custom', n, cin, cout, h, w, k)


def run_timing(args, log):
    norms = [n.strip() for n in args.norms.split(',') if n.strip()]
    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        raise SystemExit(f'unknown norm(s) {unknown}; choose from {", ".join(NORMS)}')
    shapes = [_parse_shape(text) for text in args.shape] if args.shape else default_shapes(full=args.full)
    log(f'{len(shapes)} shapes x {len(norms)} norms, {args.repeats} interleaved repeats after '
        f'{args.warmup} warm-up steps')
    results = run_norm_benchmark(shapes, norms, repeats=args.repeats, warmup=args.warmup, device=args.device,
                                 measure_peak=not args.no_peak, log=log, official=OfficialCBNModule,
                                 count_ops=not args.no_op_count)
    return norms, results


def run_profile(args):
    shape = _parse_shape(args.profile_shape, '--profile-shape')
    tables = {}
    for name in (n.strip() for n in args.profile_norms.split(',') if n.strip()):
        tables[name] = profile_case(name, shape, device=args.device, official=OfficialCBNModule)
    return shape, tables


FAST_ERROR_CASES = (
    # (label, kwargs): FPN-like and RoI-like maps, feature-like (smooth) and white-noise inputs, weights
    # moving by 1% or 0.1% of |W| per step
    ('FPN P5 2x256x25x42, smooth (x4), 1% steps', dict(n=2, h=25, w=42, smooth=True, step_size=0.01)),
    ('FPN P5 2x256x25x42, smooth (x4), 0.1% steps', dict(n=2, h=25, w=42, smooth=True, step_size=0.001)),
    ('RoI 64x256x7x7, smooth (x2), 1% steps', dict(n=64, h=7, w=7, smooth=True, upsample=2, step_size=0.01)),
    ('RoI 64x256x7x7, smooth (x2), 0.1% steps', dict(n=64, h=7, w=7, smooth=True, upsample=2, step_size=0.001)),
    ('FPN P5 2x256x25x42, white noise, 1% steps', dict(n=2, h=25, w=42, smooth=False, step_size=0.01)),
    ('FPN P5 2x256x25x42, white noise, 0.1% steps', dict(n=2, h=25, w=42, smooth=False, step_size=0.001)),
)


def run_fast_error(log):
    rows = []
    for label, kwargs in FAST_ERROR_CASES:
        r = fast_mode_error(sample=0.25, steps=10, **kwargs)
        rows.append([label] + [f"{r[key]['median']:.1e} / {r[key]['p99']:.1e}"
                               for key in ('var', 'nu', 'taylor', 'naive', 'float32')])
        log(f'  fast-mode error: {label} done')
    header = ['case (3x3 conv, window 4, stat_grad_sample=0.25)', 'σ̄² fast vs exact', 'ν_τ(W_t) fast vs exact',
              'exact Taylor vs truth', 'naive (rho=0) vs truth', 'float32 offsets vs float64']
    return header, rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = print
    load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None
    sections = {}
    if not args.skip_timing:
        norms, results = run_timing(args, log)
        header, rows = time_rows(results, norms)
        print('\nTraining step (forward + backward) median time, ratio to conv + BN:')
        print(text_table(header, rows))
        oheader, orows = op_rows(results, norms) if not args.no_op_count else (None, None)
        if oheader:
            print('\nTop-level aten ops per training step (forward + backward), without conv / with conv:')
            print(text_table(oheader, orows))
        mheader, mrows = memory_rows(results)
        print('\nMemory (extra persistent state of one layer vs BN; peak of one step):')
        print(text_table(mheader, mrows))
        sections['norm-benchmark'] = (header, rows, oheader, orows, mheader, mrows)
    if args.profile:
        shape, tables = run_profile(args)
        for name, table in tables.items():
            print(f'\nProfile, conv + {name}, {shape.label}, 5 steps:\n{table}')
        sections['norm-profile'] = (shape, tables)
    if args.fast_error:
        fheader, frows = run_fast_error(log)
        print('\nFast mode (stat_grad_sample=0.25): relative error, median / 99th percentile over channels:')
        print(text_table(fheader, frows))
        sections['fast-mode-error'] = (fheader, frows)
    info = machine_info(args.device)
    machine = machine_line(info, load_before)
    print('\n' + machine)
    if args.markdown:
        write_markdown(args.markdown, sections, machine, args)
        print(f'wrote {args.markdown}')


def write_markdown(path, sections, machine, args):
    cmd = 'python tools/benchmark_norm.py ' + ' '.join(a for a in sys.argv[1:])
    tag = f'-{args.doc_tag}' if args.doc_tag else ''
    if 'norm-benchmark' in sections:
        header, rows, oheader, orows, mheader, mrows = sections['norm-benchmark']
        body = [f'Measured with `{cmd.strip()}` on: {machine}.', '',
                'Median forward + backward time of `relu(norm(conv(x)))` (SGD step between steps, window '
                f'full, {args.repeats} interleaved repeats), and the ratio to conv + BN. *CBN − floor*: '
                'CBN\'s ratio minus that of `BN+wgrad` (conv + BN + one extra conv weight-gradient, the '
                'compute floor of exact CBN), both from the same run:', '',
                markdown_table(header, rows), '']
        if oheader:
            body += ['Top-level aten ops of one training step (forward + backward, window full, CBN bound to its '
                     'conv; `cbn_mmdet.benchmark.op_count`, deterministic): *without conv* / *with conv* '
                     '(without = with − the ops of a plain conv of the same geometry):', '',
                     markdown_table(oheader, orows), '']
        body += ['Memory: *extra state* = bytes of the storages behind the layer\'s state_dict tensors, buffers '
                'and kept attribute tensors, each storage once (official: its Python-list window) minus those of '
                '`nn.BatchNorm2d`; *step peak* = the peak of tensors '
                'allocated during one training step (CPU: torch.profiler memory timeline; CUDA: '
                '`max_memory_allocated`). The budget is our `n·(3|W| + 2C) + 2|W|` floats; the '
                'compared total is extra state + (CBN step peak − BN step peak).', '',
                markdown_table(mheader, mrows)]
        write_doc_section(path, 'norm-benchmark' + tag, '\n'.join(body))
    if 'norm-profile' in sections:
        shape, tables = sections['norm-profile']
        body = [f'`{cmd.strip()}` on: {machine}. {shape.label}, 5 warmed-up steps each (self CPU time):', '']
        for name, table in tables.items():
            body += [f'conv + {name}:', '', '```', table.strip(), '```', '']
        write_doc_section(path, 'norm-profile' + tag, '\n'.join(body))
    if 'fast-mode-error' in sections:
        header, rows = sections['fast-mode-error']
        body = [f'`{cmd.strip()}` on: {machine}.', '', 'Relative error, median / 99th percentile over '
                'channels (and window entries), steps after the window is full:', '', markdown_table(header, rows)]
        write_doc_section(path, 'fast-mode-error' + tag, '\n'.join(body))


if __name__ == '__main__':
    main()
