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
import json
import os
import os.path as osp
import re
import subprocess
import sys
import threading
import time

from ..evaluation.metrics import read_test_metrics
from .report import ap, fmt_ap, plot_losses, results_markdown
from .variants import MIN_AP_GAIN, REQUIRED, UNTRAINED, VARIANTS

__all__ = ['DemoError', 'save_untrained_checkpoint', 'run_demo']

# Validation during training is switched off: each model is evaluated once, by tools/test.py.
NO_VAL = ['val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']

_TRAIN_LINE = re.compile(r'Epoch\(train\)\s+\[(\d+)\]\[\s*(\d+)/(\d+)\].*?\sloss: ([\d.]+)')


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


class _Run:
    """One demo run: the checkout it drives, where progress goes, and the time since the start."""

    def __init__(self, root, say):
        self.root, self.say = root, say
        self.start = time.time()

    @property
    def elapsed(self):
        return time.time() - self.start

    def stamp(self):
        return f'{self.elapsed:6.0f} s'


def _run_tool(cmd, log_path, label, run, max_epochs=None, threads=None):
    """Run a tool, logging everything to ``log_path`` and printing a progress line per log interval."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    with open(log_path, 'w') as log:
        log.write('$ ' + ' '.join(cmd) + '\n')
        proc = subprocess.Popen(cmd, cwd=run.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            match = _TRAIN_LINE.search(line)
            if match:
                epoch, it, per_epoch, loss = match.groups()
                of = f'/{max_epochs}' if max_epochs else ''
                run.say(f'[{run.stamp()}]   {label:<9} epoch {epoch}{of}  iter {int(it):>3}/{per_epoch}  '
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
    from mmengine.logging import MMLogger
    from mmengine.runner import set_random_seed

    from ..engine.runner_setup import register_modules
    register_modules()
    from mmdet.registry import MODELS
    cfg = Config.fromfile(config)
    set_random_seed(seed)
    # init_weights logs every parameter to the current logger: keep the demo's console readable
    MMLogger.get_instance('cbn_mmdet_demo_quiet', log_level='WARNING')
    model = MODELS.build(cfg.model)
    model.init_weights()
    os.makedirs(osp.dirname(path), exist_ok=True)
    torch.save(dict(meta=dict(note='untrained: random initialisation, no training step', seed=seed),
                    state_dict=model.state_dict()), path)
    return path


def _test(config, checkpoint, work_dir, label, run, threads=None):
    cmd = [_python(), osp.join(run.root, 'tools', 'test.py'), config, checkpoint, '--work-dir', work_dir,
           '--eval', 'bbox', 'segm']
    seconds = _run_tool(cmd, osp.join(work_dir, 'test.log'), label, run, threads=threads)
    metrics = read_test_metrics(work_dir)
    if metrics is None:
        raise DemoError(f'{label}: tools/test.py wrote no metrics into {work_dir}')
    return metrics, seconds


def _max_epochs(config):
    from mmengine.config import Config
    return Config.fromfile(config).train_cfg.max_epochs


def _train_and_test(name, work_dir, train_args, run, threads, epochs):
    # Runs in a worker thread: only subprocesses and file reading here (mmengine's Config parsing is
    # not thread-safe, so everything config-related is done by the caller).
    norm, config = VARIANTS[name]
    run_dir = osp.join(work_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    run.say(f'[{run.stamp()}] training {name} (norm {norm}): {config}, {epochs} epochs')
    cmd = [_python(), osp.join(run.root, 'tools', 'train.py'), config, '--work-dir', run_dir,
           '--cfg-options', *NO_VAL, *train_args]
    train_s = _run_tool(cmd, osp.join(run_dir, 'train.log'), name, run, max_epochs=epochs, threads=threads)
    run.say(f'[{run.stamp()}] evaluating {name} ...')
    metrics, test_s = _test(config, _latest_checkpoint(run_dir), run_dir, name, run, threads=threads)
    run.say(f'[{run.stamp()}]   {name}: AP^b {fmt_ap(ap(metrics))}  AP^m '
            f'{fmt_ap(ap(metrics, "coco/segm_mAP"))}  (train {train_s:.0f} s, test {test_s:.0f} s)')
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


def run_demo(root, work_dir='work_dirs/demo', variants=tuple(VARIANTS), budget=540.0, train_args=(), jobs=None,
             say=print):
    """Run the demo; returns ``(results, untrained, ok)``. See the module docstring.

    Args:
        root (str): the checkout whose ``tools/`` and ``configs/demo/`` are run (the subprocesses' cwd).
        work_dir (str): outputs, relative to ``root`` unless absolute.
        variants (tuple): names of :data:`VARIANTS` to train.
        budget (float): seconds; optional variants start only if they fit.
        train_args (tuple): extra ``key=value`` overrides for every ``tools/train.py`` run.
        jobs (int, optional): runs side by side (default ``min(2, CPUs)``).
        say (callable): receives the progress lines and the final report.
    """
    run = _Run(root, say)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise DemoError(f'unknown variant(s) {unknown}; known: {list(VARIANTS)}')
    missing = [VARIANTS[v][1] for v in ('baseline', *variants) if not osp.isfile(osp.join(root, VARIANTS[v][1]))]
    if missing:
        raise DemoError(f'root={root!r} is not a cbn_mmdet checkout: no {missing[0]}')
    work_dir = osp.abspath(osp.join(root, work_dir) if not osp.isabs(work_dir) else work_dir)
    os.makedirs(work_dir, exist_ok=True)
    cpus = os.cpu_count() or 1
    jobs = jobs or min(2, cpus)
    threads = max(1, cpus // jobs)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    run.say(f'cbn_mmdet demo: Mask R-CNN R-18-FPN on synthetic shapes; outputs in {work_dir}')
    run.say(f'  variants: {", ".join(variants)} (required: {", ".join(v for v in REQUIRED if v in variants)}); '
            f'time budget {budget:.0f} s')
    run.say(f'  {cpus} CPU(s), load average {load:.1f}: {jobs} run(s) at a time, {threads} thread(s) each')

    from mmengine.config import Config

    from ..datasets import ensure_synthetic_coco
    baseline_config = osp.join(root, VARIANTS['baseline'][1])
    spec = dict(Config.fromfile(baseline_config).synthetic_data)
    data_dir = osp.join(root, spec.pop('out_dir'))
    made = ensure_synthetic_coco(data_dir, **spec)
    run.say(f'[{run.stamp()}] dataset: {"generated" if made else "reused"} {data_dir} '
            f'({spec["num_train"]} train / {spec["num_val"]} val images, {spec["image_size"]} px, 3 classes)')

    # 1. the untrained reference
    run_dir = osp.join(work_dir, UNTRAINED)
    os.makedirs(run_dir, exist_ok=True)
    ckpt = save_untrained_checkpoint(baseline_config, osp.join(run_dir, 'untrained.pth'))
    run.say(f'[{run.stamp()}] evaluating the untrained (randomly initialised) baseline model ...')
    metrics, test_s = _test(VARIANTS['baseline'][1], ckpt, run_dir, UNTRAINED, run)
    untrained = dict(metrics=metrics, test_seconds=test_s, work_dir=run_dir)
    run.say(f'[{run.stamp()}]   untrained: AP^b {fmt_ap(ap(metrics))}  AP^m {fmt_ap(ap(metrics, "coco/segm_mAP"))}')

    # 2. train + test the variants, `jobs` at a time (the required ones first): on a small CPU,
    #    single-threaded processes side by side use the cores far better than one multi-threaded run
    order = [v for v in REQUIRED if v in variants] + [v for v in variants if v not in REQUIRED]
    batches = [order[i:i + jobs] for i in range(0, len(order), jobs)]
    epochs = {name: _max_epochs(osp.join(root, VARIANTS[name][1])) for name in order}
    results, batch_seconds = {}, []
    for batch in batches:
        if batch_seconds and not all(v in REQUIRED for v in batch):
            estimate = max(batch_seconds)   # the later variants (GN, SyncBN) are cheaper than CBN
            if run.elapsed + estimate > budget:
                reason = (f'time budget: {run.elapsed:.0f} s used, ~{estimate:.0f} s more needed, '
                          f'budget {budget:.0f} s')
                for name in batch:
                    run.say(f'[{run.stamp()}] skipping {name} ({reason})')
                    results[name] = dict(skipped=reason)
                continue
        start = time.time()
        batch_results = _run_parallel(
            [(name, _train_and_test, (name, work_dir, train_args, run, threads, epochs[name]))
             for name in batch])
        batch_seconds.append(time.time() - start)
        for name in batch:
            results[name] = batch_results[name]

    # 3. report
    base_ap = ap(untrained['metrics']) or 0.0
    ok = True
    for name, res in results.items():
        if res.get('skipped'):
            continue
        gain = (ap(res['metrics']) or 0.0) - base_ap
        res['learned'] = gain >= MIN_AP_GAIN
        if not res['learned'] and name in REQUIRED:
            ok = False
    setting = (f'{_max_epochs(baseline_config)} epochs of {spec["num_train"]} synthetic '
               f'{spec["image_size"]}x{spec["image_size"]} images, batch 2, one process')
    table = results_markdown(results, untrained, run.elapsed, setting)
    md_path = osp.join(work_dir, 'results.md')
    with open(md_path, 'w') as f:
        f.write(table)
    with open(osp.join(work_dir, 'results.json'), 'w') as f:
        json.dump(dict(untrained=untrained, runs=results, total_seconds=run.elapsed), f, indent=1)
    trained_dirs = {n: r['work_dir'] for n, r in results.items() if not r.get('skipped')}
    png_path = plot_losses(trained_dirs, osp.join(work_dir, 'loss_curves.png'))

    run.say('')
    run.say(table)
    for name, res in results.items():
        if not res.get('skipped') and not res['learned']:
            run.say(f'WARNING: {name} did not learn: AP^b {fmt_ap(ap(res["metrics"]))} vs untrained '
                    f'{fmt_ap(base_ap)} (needs +{100 * MIN_AP_GAIN:.0f})')
    run.say(f'Demo finished in {run.elapsed:.0f} s.')
    run.say(f'  results table : {md_path}')
    run.say(f'  results (json): {osp.join(work_dir, "results.json")}')
    run.say(f'  loss curves   : {png_path}')
    run.say('  runs          : ' + ', '.join(osp.join(work_dir, n) for n in [UNTRAINED, *trained_dirs]))
    return results, untrained, ok
