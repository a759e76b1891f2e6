"""The end-to-end demo behind ``tools/demo.py`` (``bash tools/demo.sh``).

On the synthetic shapes dataset (generated into ``data/synthetic_coco/`` on first use), with the small
Mask R-CNN R-18-FPN demo configs (``configs/demo/``):

1. evaluates an UNTRAINED (randomly initialised) model, the reference that shows learning happens;
2. trains the baseline (no norm in the FPN/heads) and CBN through ``tools/train.py``, then GN and
   SyncBN while the time budget allows, and evaluates each with ``tools/test.py ... --eval bbox segm``;
   two runs at a time, single-threaded on a 2-core machine (small CPU ops scale poorly over threads,
   processes side by side do not);
3. writes ``results.md`` (Markdown table), ``results.json`` and ``loss_curves.png`` into the work dir.

Every train/test step is a subprocess of the real tools (their full output goes to ``<run>/*.log``),
so the demo exercises exactly what a user runs.
"""
import argparse
import json
import os
import os.path as osp
import re
import subprocess
import sys
import threading
import time
import warnings

from .metrics import METRICS, read_test_metrics, read_train_losses

__all__ = ['VARIANTS', 'REQUIRED', 'run_demo', 'main']

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# name -> (norm in the FPN and the RoI heads, config)
VARIANTS = {
    'baseline': ('–', 'configs/demo/mask_rcnn_r18_fpn_baseline_demo.py'),
    'cbn': ('CBN', 'configs/demo/mask_rcnn_r18_fpn_cbn_demo.py'),
    'gn': ('GN', 'configs/demo/mask_rcnn_r18_fpn_gn_demo.py'),
    'syncbn': ('SyncBN', 'configs/demo/mask_rcnn_r18_fpn_syncbn_demo.py'),
}
REQUIRED = ('baseline', 'cbn')
UNTRAINED = 'untrained'
# A trained model must beat the untrained one by this much box AP (in [0, 1]) to count as learning.
MIN_AP_GAIN = 0.05
# Validation during training is switched off: each model is evaluated once, by tools/test.py.
NO_VAL = ['val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']

_TRAIN_LINE = re.compile(r'Epoch\(train\)\s+\[(\d+)\]\[\s*(\d+)/(\d+)\].*?\sloss: ([\d.]+)')


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def _say(message=''):
    print(message, flush=True)


class _Clock:
    def __init__(self):
        self.start = time.time()

    @property
    def elapsed(self):
        return time.time() - self.start

    def stamp(self):
        return f'{self.elapsed:6.0f} s'


def _run_tool(cmd, log_path, label, clock, max_epochs=None, threads=None):
    """Run a tool, logging everything to ``log_path`` and printing a progress line per log interval."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    with open(log_path, 'w') as log:
        log.write('$ ' + ' '.join(cmd) + '\n')
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            match = _TRAIN_LINE.search(line)
            if match:
                epoch, it, per_epoch, loss = match.groups()
                of = f'/{max_epochs}' if max_epochs else ''
                _say(f'[{clock.stamp()}]   {label:<9} epoch {epoch}{of}  iter {int(it):>3}/{per_epoch}  '
                     f'loss {float(loss):.3f}')
        code = proc.wait()
    if code != 0:
        with open(log_path) as f:
            tail = ''.join(f.readlines()[-25:])
        raise DemoError(f'{label}: `{" ".join(cmd)}` failed with exit code {code}; log: {log_path}\n{tail}')
    return time.time() - start


def _python():
    return sys.executable or 'python'


def _latest_checkpoint(work_dir):
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            path = f.read().strip()
        if osp.isfile(path):
            return path
    ckpts = sorted((p for p in os.listdir(work_dir) if p.endswith('.pth')),
                   key=lambda p: osp.getmtime(osp.join(work_dir, p)))
    if not ckpts:
        raise DemoError(f'no checkpoint in {work_dir}')
    return osp.join(work_dir, ckpts[-1])


def save_untrained_checkpoint(config, path, seed=0):
    """A checkpoint of the randomly initialised model of ``config`` (what training starts from)."""
    import torch
    from mmengine.config import Config
    from mmengine.runner import set_random_seed

    from mmengine.logging import MMLogger

    from .common import register_modules
    register_modules()
    from mmdet.registry import MODELS
    cfg = Config.fromfile(osp.join(ROOT, config))
    set_random_seed(seed)
    # init_weights logs every parameter to the current logger: keep the demo's console readable
    MMLogger.get_instance('cbn_mmdet_demo_quiet', log_level='WARNING')
    model = MODELS.build(cfg.model)
    model.init_weights()
    os.makedirs(osp.dirname(path), exist_ok=True)
    torch.save(dict(meta=dict(note='untrained: random initialisation, no training step', seed=seed),
                    state_dict=model.state_dict()), path)
    return path


def _test(config, checkpoint, work_dir, label, clock, threads=None):
    cmd = [_python(), osp.join(ROOT, 'tools', 'test.py'), config, checkpoint, '--work-dir', work_dir,
           '--eval', 'bbox', 'segm']
    seconds = _run_tool(cmd, osp.join(work_dir, 'test.log'), label, clock, threads=threads)
    metrics = read_test_metrics(work_dir)
    if metrics is None:
        raise DemoError(f'{label}: tools/test.py wrote no metrics into {work_dir}')
    return metrics, seconds


def _max_epochs(config):
    from mmengine.config import Config
    return Config.fromfile(osp.join(ROOT, config)).train_cfg.max_epochs


def _ap(metrics, key='coco/bbox_mAP'):
    value = (metrics or {}).get(key)
    return None if value is None or value < 0 else float(value)


def _fmt(value):
    return '–' if value is None else f'{100 * value:.1f}'


def results_markdown(results, untrained, total_seconds, setting=''):
    header = ('| run | norm in FPN + heads | ' + ' | '.join(c for c, _ in METRICS) +
              ' | train (s) | test (s) |')
    lines = ['# cbn_mmdet demo: Mask R-CNN R-18-FPN on synthetic shapes', '',
             'COCO AP in % on the 40 validation images (pycocotools, `tools/test.py --eval bbox segm`).',
             'Untrained = the same model, randomly initialised, never trained.', '',
             header, '|---|---|' + '---|' * (len(METRICS) + 2)]
    rows = [(UNTRAINED, untrained)] + list(results.items())
    for name, res in rows:
        norm = '–' if name == UNTRAINED else VARIANTS[name][0]
        if res.get('skipped'):
            cells = ['–'] * len(METRICS) + ['skipped', '']
            lines.append(f'| {name} | {norm} | ' + ' | '.join(cells) + f' |  <!-- {res["skipped"]} -->')
            continue
        cells = [_fmt(_ap(res['metrics'], key)) for _, key in METRICS]
        cells += [f"{res.get('train_seconds', 0):.0f}" if name != UNTRAINED else '0',
                  f"{res.get('test_seconds', 0):.0f}"]
        lines.append(f'| {name} | {norm} | ' + ' | '.join(cells) + ' |')
    skipped = [f'{n} ({r["skipped"]})' for n, r in results.items() if r.get('skipped')]
    lines += ['', f'Total demo time: {total_seconds:.0f} s.']
    if skipped:
        lines.append('Skipped: ' + '; '.join(skipped) + '.')
    lines.append('')
    lines.append(f'Not comparable with the paper: a tiny model trained from scratch ({setting}); the demo '
                 'shows that the pipeline works and that the models learn.')
    return '\n'.join(lines) + '\n'


def plot_losses(work_dirs, path):
    """Loss curves (total and per head) of the trained runs, from mmengine's scalars.json."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = [('loss', 'total loss'), ('loss_cls', 'RoI classification'), ('loss_bbox', 'RoI box regression'),
            ('loss_mask', 'mask')]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for (key, title), ax in zip(keys, axes.flat):
        for name, work_dir in work_dirs.items():
            losses = read_train_losses(work_dir)
            steps = [s for s, e in losses.items() if key in e]
            if steps:
                ax.plot(steps, [losses[s][key] for s in steps], marker='o', markersize=2,
                        label=f'{name} ({VARIANTS[name][0]})')
        ax.set_title(title)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle('Mask R-CNN R-18-FPN on synthetic shapes: training losses (mmengine scalars.json)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _train_and_test(name, work_dir, train_args, clock, threads, epochs):
    # Runs in a worker thread: only subprocesses and file reading here (mmengine's Config parsing is
    # not thread-safe, so everything config-related is done by the caller).
    norm, config = VARIANTS[name]
    run_dir = osp.join(work_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    _say(f'[{clock.stamp()}] training {name} (norm {norm}): {config}, {epochs} epochs')
    cmd = [_python(), osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir', run_dir,
           '--cfg-options', *NO_VAL, *train_args]
    train_s = _run_tool(cmd, osp.join(run_dir, 'train.log'), name, clock, max_epochs=epochs, threads=threads)
    _say(f'[{clock.stamp()}] evaluating {name} ...')
    metrics, test_s = _test(config, _latest_checkpoint(run_dir), run_dir, name, clock, threads=threads)
    _say(f'[{clock.stamp()}]   {name}: AP^b {_fmt(_ap(metrics))}  AP^m '
         f'{_fmt(_ap(metrics, "coco/segm_mAP"))}  (train {train_s:.0f} s, test {test_s:.0f} s)')
    return dict(metrics=metrics, train_seconds=train_s, test_seconds=test_s, work_dir=run_dir)


def _run_parallel(tasks):
    """Run ``(key, fn, args)`` tasks in threads (each drives its own subprocesses); ``{key: result}``."""
    results, errors = {}, {}

    def target(key, fn, args):
        try:
            results[key] = fn(*args)
        except BaseException as err:   # re-raised in the caller's thread below
            errors[key] = err

    threads = [threading.Thread(target=target, args=task, daemon=True) for task in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise next(iter(errors.values()))
    return results


def run_demo(work_dir='work_dirs/demo', variants=tuple(VARIANTS), budget=540.0, train_args=(), jobs=None):
    """Run the demo; returns ``(results, untrained, ok)``. See the module docstring."""
    clock = _Clock()
    work_dir = osp.abspath(osp.join(ROOT, work_dir) if not osp.isabs(work_dir) else work_dir)
    os.makedirs(work_dir, exist_ok=True)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise DemoError(f'unknown variant(s) {unknown}; known: {list(VARIANTS)}')
    cpus = os.cpu_count() or 1
    jobs = jobs or min(2, cpus)
    threads = max(1, cpus // jobs)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    _say(f'cbn_mmdet demo: Mask R-CNN R-18-FPN on synthetic shapes; outputs in {work_dir}')
    _say(f'  variants: {", ".join(variants)} (required: {", ".join(v for v in REQUIRED if v in variants)}); '
         f'time budget {budget:.0f} s')
    _say(f'  {cpus} CPU(s), load average {load:.1f}: {jobs} run(s) at a time, {threads} thread(s) each')

    from mmengine.config import Config

    from cbn_mmdet.datasets import ensure_synthetic_coco
    spec = dict(Config.fromfile(osp.join(ROOT, VARIANTS['baseline'][1])).synthetic_data)
    data_dir = osp.join(ROOT, spec.pop('out_dir'))
    made = ensure_synthetic_coco(data_dir, **spec)
    _say(f'[{clock.stamp()}] dataset: {"generated" if made else "reused"} {data_dir} '
         f'({spec["num_train"]} train / {spec["num_val"]} val images, {spec["image_size"]} px, 3 classes)')

    # 1. the untrained reference
    run_dir = osp.join(work_dir, UNTRAINED)
    os.makedirs(run_dir, exist_ok=True)
    ckpt = save_untrained_checkpoint(VARIANTS['baseline'][1], osp.join(run_dir, 'untrained.pth'))
    _say(f'[{clock.stamp()}] evaluating the untrained (randomly initialised) baseline model ...')
    metrics, test_s = _test(VARIANTS['baseline'][1], ckpt, run_dir, UNTRAINED, clock)
    untrained = dict(metrics=metrics, test_seconds=test_s, work_dir=run_dir)
    _say(f'[{clock.stamp()}]   untrained: AP^b {_fmt(_ap(metrics))}  AP^m {_fmt(_ap(metrics, "coco/segm_mAP"))}')

    # 2. train + test the variants, `jobs` at a time (the required ones first): on a small CPU,
    #    single-threaded processes side by side use the cores far better than one multi-threaded run
    order = [v for v in REQUIRED if v in variants] + [v for v in variants if v not in REQUIRED]
    batches = [order[i:i + jobs] for i in range(0, len(order), jobs)]
    epochs = {name: _max_epochs(VARIANTS[name][1]) for name in order}
    results, batch_seconds = {}, []
    for batch in batches:
        if batch_seconds and not all(v in REQUIRED for v in batch):
            estimate = max(batch_seconds)   # the later variants (GN, SyncBN) are cheaper than CBN
            if clock.elapsed + estimate > budget:
                reason = (f'time budget: {clock.elapsed:.0f} s used, ~{estimate:.0f} s more needed, '
                          f'budget {budget:.0f} s')
                for name in batch:
                    _say(f'[{clock.stamp()}] skipping {name} ({reason})')
                    results[name] = dict(skipped=reason)
                continue
        start = time.time()
        batch_results = _run_parallel(
            [(name, _train_and_test, (name, work_dir, train_args, clock, threads, epochs[name]))
             for name in batch])
        batch_seconds.append(time.time() - start)
        for name in batch:
            results[name] = batch_results[name]

    # 3. report
    base_ap = _ap(untrained['metrics']) or 0.0
    ok = True
    for name, res in results.items():
        if res.get('skipped'):
            continue
        gain = (_ap(res['metrics']) or 0.0) - base_ap
        res['learned'] = gain >= MIN_AP_GAIN
        if not res['learned'] and name in REQUIRED:
            ok = False
    setting = (f'{_max_epochs(VARIANTS["baseline"][1])} epochs of {spec["num_train"]} synthetic '
               f'{spec["image_size"]}x{spec["image_size"]} images, batch 2, one process')
    table = results_markdown(results, untrained, clock.elapsed, setting)
    md_path = osp.join(work_dir, 'results.md')
    with open(md_path, 'w') as f:
        f.write(table)
    with open(osp.join(work_dir, 'results.json'), 'w') as f:
        json.dump(dict(untrained=untrained, runs=results, total_seconds=clock.elapsed), f, indent=1)
    trained_dirs = {n: r['work_dir'] for n, r in results.items() if not r.get('skipped')}
    png_path = plot_losses(trained_dirs, osp.join(work_dir, 'loss_curves.png'))

    _say('')
    _say(table)
    for name, res in results.items():
        if not res.get('skipped') and not res['learned']:
            _say(f'WARNING: {name} did not learn: AP^b {_fmt(_ap(res["metrics"]))} vs untrained '
                 f'{_fmt(base_ap)} (needs +{100 * MIN_AP_GAIN:.0f})')
    _say(f'Demo finished in {clock.elapsed:.0f} s.')
    _say(f'  results table : {md_path}')
    _say(f'  results (json): {osp.join(work_dir, "results.json")}')
    _say(f'  loss curves   : {png_path}')
    _say('  runs          : ' + ', '.join(osp.join(work_dir, n) for n in [UNTRAINED, *trained_dirs]))
    return results, untrained, ok


def main(argv=None):
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
    parser = argparse.ArgumentParser(description='cbn_mmdet end-to-end demo (synthetic data, CPU, ~10 min)')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='where the runs and the report go')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS),
                        help='which demo configs to train (baseline and cbn always run first)')
    parser.add_argument('--budget', type=float, default=540.0,
                        help='seconds; optional variants (gn, syncbn) start only if they fit (default 540)')
    parser.add_argument('--jobs', type=int, default=None,
                        help='runs trained side by side (default: min(2, CPUs)), each with CPUs/jobs threads')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='extra key=value overrides passed to every tools/train.py run')
    args = parser.parse_args(argv)
    try:
        _, _, ok = run_demo(args.work_dir, args.variants, args.budget, args.cfg_options, args.jobs)
    except DemoError as err:
        raise SystemExit(f'demo failed: {err}') from None
    if not ok:
        raise SystemExit('demo failed: a required model did not learn (see the table above)')
