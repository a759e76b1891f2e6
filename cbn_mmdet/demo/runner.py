"""The end-to-end demo behind ``tools/demo.py`` (``bash tools/demo.sh``).

On the synthetic shapes dataset (generated into ``data/synthetic_coco/`` on first use), with the small
Mask R-CNN R-18-FPN demo configs (``configs/demo/``), run the way the paper runs, in miniature:

1. evaluates an UNTRAINED (randomly initialised) model, the reference that shows learning happens;
2. trains every variant (:data:`~cbn_mmdet.demo.variants.VARIANTS`) with ``tools/dist_train.sh CFG 2``
   (gloo on CPU, one image per process), once per seed; the configs' ``PreciseBNHook`` re-estimates the
   running statistics after the last epoch and keeps the model with the original ones;
3. evaluates both versions of every model with ``tools/test.py ... --eval bbox segm`` (side by side,
   one process each; the detections go to COCO result files), and measures the training loss on
   validation images in train mode and in eval mode (:mod:`cbn_mmdet.demo.val_loss`);
4. gives every AP a 95 % bootstrap interval over the validation images, compares every variant with
   the baseline and with BN (paired bootstrap; over seeds too with ``seeds >= 2``) and writes
   ``results.md``, ``results.json`` and ``loss_curves.png`` into the work dir (:mod:`.report`).

Every train/test step is a subprocess of the real tools (their full output goes to ``<run>/*.log``),
so the demo exercises exactly what a user runs.
"""
import json
import os
import os.path as osp
import re
import socket
import subprocess
import sys
import threading
import time

from ..evaluation.metrics import read_test_metrics
from .report import ap, fmt_ap, plot_losses, results_markdown, summarize
from .variants import BN_TYPE, MIN_AP_GAIN, REQUIRED, UNTRAINED, VARIANTS

__all__ = ['DemoError', 'save_untrained_checkpoint', 'run_demo', 'ORIGINAL_CHECKPOINT']

# Validation during training is switched off: each model is evaluated by tools/test.py afterwards.
NO_VAL = ['val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']
# What the demo configs' PreciseBNHook saves before re-estimating the statistics.
ORIGINAL_CHECKPOINT = 'original_stats.pth'

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


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _run_tool(cmd, log_path, label, run, max_epochs=None, threads=None):
    """Run a tool, logging everything to ``log_path`` and printing a progress line per log interval."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHON=_python(), PORT=str(_free_port()))
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
                run.say(f'[{run.stamp()}]   {label:<16} epoch {epoch}{of}  iter {int(it):>3}/{per_epoch}  '
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
    ckpts = sorted((p for p in os.listdir(work_dir) if p.endswith('.pth') and p != ORIGINAL_CHECKPOINT),
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


def _test(config, checkpoint, out_dir, label, run, test_args=(), threads=1):
    """``tools/test.py`` (one process): metrics, and the detections as COCO result files."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = osp.join(out_dir, 'detections')
    cmd = [_python(), osp.join(run.root, 'tools', 'test.py'), config, checkpoint, '--work-dir', out_dir,
           '--eval', 'bbox', 'segm', '--cfg-options', f'test_evaluator.outfile_prefix={prefix}', *test_args]
    seconds = _run_tool(cmd, osp.join(out_dir, 'test.log'), label, run, threads=threads)
    metrics = read_test_metrics(out_dir)
    if metrics is None:
        raise DemoError(f'{label}: tools/test.py wrote no metrics into {out_dir}')
    files = {iou: f'{prefix}.{iou}.json' for iou in ('bbox', 'segm')}
    missing = [p for p in files.values() if not osp.isfile(p)]
    if missing:
        raise DemoError(f'{label}: tools/test.py wrote no detections file {missing[0]}')
    return metrics, files, seconds


def _run_parallel(tasks):
    """Run ``(key, fn, args)`` tasks in threads (each drives its own subprocess); ``{key: result}``."""
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


def _max_epochs(config):
    from mmengine.config import Config
    return Config.fromfile(config).train_cfg.max_epochs


def _train_and_test(name, seed, run_dir, train_args, test_args, run, epochs, procs, loss_images):
    norm, config = VARIANTS[name]
    label = f'{name}/seed {seed}'
    os.makedirs(run_dir, exist_ok=True)
    run.say(f'[{run.stamp()}] training {label} (norm {norm}): tools/dist_train.sh {config} {procs}, {epochs} epochs')
    cmd = ['bash', osp.join(run.root, 'tools', 'dist_train.sh'), config, str(procs), '--work-dir', run_dir,
           '--cfg-options', *NO_VAL, f'randomness.seed={seed}', *train_args]
    train_s = _run_tool(cmd, osp.join(run_dir, 'train.log'), label, run, max_epochs=epochs, threads=1)
    checkpoints = dict(original=osp.join(run_dir, ORIGINAL_CHECKPOINT), precise=_latest_checkpoint(run_dir))
    if not osp.isfile(checkpoints['original']):
        raise DemoError(f'{label}: training wrote no {ORIGINAL_CHECKPOINT} (is PreciseBNHook in custom_hooks of '
                        f'{config}?)')
    # A variant without running statistics (no BN-type layer anywhere: GN backbone) leaves PreciseBN
    # nothing to change: its PreciseBN model is the same model, tested once and reported for both.
    same_model = name not in BN_TYPE
    tested = {'original': checkpoints['original']} if same_model else checkpoints
    run.say(f'[{run.stamp()}] evaluating {label}: ' + ('no running statistics, one test' if same_model else
                                                        'original running statistics, then PreciseBN ...'))
    result = dict(seed=seed, work_dir=run_dir, train_seconds=train_s, metrics={}, detections={})
    # the tests side by side, one process each (inference needs no synchronisation); a lone test takes
    # both threads
    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // len(tested))
    tests = _run_parallel([(kind, _test, (config, ckpt, osp.join(run_dir, f'test_{kind}'), label, run, test_args,
                                          threads)) for kind, ckpt in tested.items()])
    for kind, (metrics, files, _) in tests.items():
        result['metrics'][kind], result['detections'][kind] = metrics, files
    if same_model:
        result['metrics']['precise'], result['detections']['precise'] = tests['original'][:2]
    result['test_seconds'] = time.time() - start
    loss_path = osp.join(run_dir, 'val_loss.json')
    cmd = [_python(), '-m', 'torch.distributed.run', '--nproc_per_node', str(procs), '--master_port',
           str(_free_port()), '-m', 'cbn_mmdet.demo.val_loss', config, '--num-images', str(loss_images),
           *[arg for kind, ckpt in tested.items() for arg in ('--checkpoint', f'{kind}={ckpt}')], '--out', loss_path]
    if test_args:
        cmd += ['--cfg-options', *test_args]
    result['loss_seconds'] = _run_tool(cmd, osp.join(run_dir, 'val_loss.log'), label, run, threads=1)
    with open(loss_path) as f:
        result['val_loss'] = json.load(f)
    if same_model:
        result['val_loss']['eval']['precise'] = result['val_loss']['eval']['original']
    m = result['metrics']
    run.say(f'[{run.stamp()}]   {label}: AP^b {fmt_ap(ap(m["original"]))} (PreciseBN {fmt_ap(ap(m["precise"]))})  '
            f'AP^m {fmt_ap(ap(m["original"], "coco/segm_mAP"))} (PreciseBN '
            f'{fmt_ap(ap(m["precise"], "coco/segm_mAP"))})  val loss train/eval mode '
            f'{result["val_loss"]["train"]:.3f}/{result["val_loss"]["eval"]["original"]:.3f}  '
            f'(train {train_s:.0f} s, test {result["test_seconds"]:.0f} s, loss {result["loss_seconds"]:.0f} s)')
    return result


def run_demo(root, work_dir='work_dirs/demo', variants=tuple(VARIANTS), seeds=1, train_args=(), test_args=(),
             procs=2, num_samples=1000, loss_images=40, say=print):
    """Run the demo; returns ``(results, untrained, ok)``. See the module docstring.

    Args:
        root (str): the checkout whose ``tools/`` and ``configs/demo/`` are run (the subprocesses' cwd).
        work_dir (str): outputs, relative to ``root`` unless absolute.
        variants (tuple): names of :data:`VARIANTS` to train.
        seeds (int): runs per variant (``randomness.seed`` 0 .. seeds-1).
        train_args (tuple): extra ``key=value`` overrides for every training run.
        test_args (tuple): extra ``key=value`` overrides for every test and loss measurement (the
            ground truth of the bootstrap is the config's ``test_evaluator.ann_file``, so these must not
            change which images are evaluated).
        procs (int): processes per run (``tools/dist_train.sh CFG procs``), one image each.
        num_samples (int): bootstrap resamples of the validation images.
        loss_images (int): validation images of the train/eval-mode loss measurement.
        say (callable): receives the progress lines and the final report.
    """
    run = _Run(root, say)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise DemoError(f'unknown variant(s) {unknown}; known: {list(VARIANTS)}')
    for name, value, low in (('seeds', seeds, 1), ('procs', procs, 1), ('num_samples', num_samples, 10),
                             ('loss_images', loss_images, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DemoError(f'{name} must be an int >= {low}, got {value!r}')
    missing = [VARIANTS[v][1] for v in ('baseline', *variants) if not osp.isfile(osp.join(root, VARIANTS[v][1]))]
    if missing:
        raise DemoError(f'root={root!r} is not a cbn_mmdet checkout: no {missing[0]}')
    work_dir = osp.abspath(osp.join(root, work_dir) if not osp.isabs(work_dir) else work_dir)
    os.makedirs(work_dir, exist_ok=True)
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    order = [v for v in VARIANTS if v in variants]
    run.say(f'cbn_mmdet demo: Mask R-CNN R-18-FPN on synthetic shapes; outputs in {work_dir}')
    run.say(f'  variants: {", ".join(order)}; {seeds} seed(s); {procs} process(es) per run, one image each '
            f'(tools/dist_train.sh CFG {procs})')
    run.say(f'  {cpus} CPU(s), load average {load:.1f}')

    from mmengine.config import Config

    from ..datasets import ensure_synthetic_coco
    baseline_config = osp.join(root, VARIANTS['baseline'][1])
    base_cfg = Config.fromfile(baseline_config)
    spec = dict(base_cfg.synthetic_data)
    data_dir = osp.join(root, spec.pop('out_dir'))
    made = ensure_synthetic_coco(data_dir, **spec)
    run.say(f'[{run.stamp()}] dataset: {"generated" if made else "reused"} {data_dir} '
            f'({spec["num_train"]} train / {spec["num_val"]} val images, {spec["image_size"]} px, 3 classes)')
    gt_file = base_cfg.test_evaluator.ann_file
    for item in test_args:
        if item.startswith('test_evaluator.ann_file='):
            gt_file = item.split('=', 1)[1]
    gt_file = gt_file if osp.isabs(gt_file) else osp.join(root, gt_file)

    # 1. the untrained reference
    run_dir = osp.join(work_dir, UNTRAINED)
    ckpt = save_untrained_checkpoint(baseline_config, osp.join(run_dir, 'untrained.pth'))
    run.say(f'[{run.stamp()}] evaluating the untrained (randomly initialised) baseline model ...')
    metrics, _, test_s = _test(VARIANTS['baseline'][1], ckpt, run_dir, UNTRAINED, run, test_args,
                               threads=os.cpu_count() or 1)     # alone on the machine: every core
    untrained = dict(metrics=metrics, test_seconds=test_s, work_dir=run_dir)
    run.say(f'[{run.stamp()}]   untrained: AP^b {fmt_ap(ap(metrics))}  AP^m {fmt_ap(ap(metrics, "coco/segm_mAP"))}')

    # 2.-3. train, test, measure: one run at a time, each on `procs` processes
    epochs = {name: _max_epochs(osp.join(root, VARIANTS[name][1])) for name in order}
    results = {name: [] for name in order}
    for seed in range(seeds):
        for name in order:
            results[name].append(_train_and_test(name, seed, osp.join(work_dir, name, f'seed_{seed}'), train_args,
                                                 test_args, run, epochs[name], procs, loss_images))

    # 4. report
    base_ap = ap(untrained['metrics']) or 0.0
    ok = True
    for name, runs in results.items():
        for res in runs:
            res['learned'] = (ap(res['metrics']['original']) or 0.0) - base_ap >= MIN_AP_GAIN
            if not res['learned'] and name in REQUIRED:
                ok = False
    run.say(f'[{run.stamp()}] bootstrap: {num_samples} resamples of the {spec["num_val"]} validation images ...')
    summary = summarize(results, gt_file, num_samples=num_samples)
    setting = (f'{_max_epochs(baseline_config)} epochs of {spec["num_train"]} synthetic '
               f'{spec["image_size"]}x{spec["image_size"]} images, {procs} processes x 1 image')
    table = results_markdown(summary, untrained, run.elapsed, setting)
    md_path = osp.join(work_dir, 'results.md')
    with open(md_path, 'w') as f:
        f.write(table)
    with open(osp.join(work_dir, 'results.json'), 'w') as f:
        json.dump(dict(untrained=untrained, runs=results, summary=summary, total_seconds=run.elapsed), f, indent=1)
    png_path = plot_losses({name: runs[0]['work_dir'] for name, runs in results.items()},
                           osp.join(work_dir, 'loss_curves.png'))

    run.say('')
    run.say(table)
    for name, runs in results.items():
        for res in runs:
            if not res['learned']:
                run.say(f'WARNING: {name} (seed {res["seed"]}) did not learn: AP^b '
                        f'{fmt_ap(ap(res["metrics"]["original"]))} vs untrained {fmt_ap(base_ap)} '
                        f'(needs +{100 * MIN_AP_GAIN:.0f})')
    run.say(f'Demo finished in {run.elapsed:.0f} s.')
    run.say(f'  results table : {md_path}')
    run.say(f'  results (json): {osp.join(work_dir, "results.json")}')
    run.say(f'  loss curves   : {png_path}')
    run.say('  runs          : ' + ', '.join(osp.join(work_dir, n) for n in [UNTRAINED, *results]))
    return results, untrained, ok
