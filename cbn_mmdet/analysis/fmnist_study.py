"""Small-batch classification on Fashion-MNIST: the CBN paper's accuracy-vs-batch-size figure in miniature.

The study behind ``tools/analysis/fashion_mnist_study.py`` (see ``docs/fidelity.md``): the
:class:`~cbn_mmdet.analysis.basic_resnet.BasicResNet` (a ResNet-8 whose convs and norms are built by
mmcv from ``conv_cfg``/``norm_cfg``) is trained with each norm at batch sizes 1 to 32 and several seeds
on a fixed, class-balanced subset of the Fashion-MNIST training split, and evaluated in eval mode
(running statistics where the layer has them) on a fixed, class-balanced subset of the test split.

Norms (the names of the digits study, :data:`cbn_mmdet.analysis.nets.NORMS`, plus ``brn``)::

    bn            conv + BN                        gn     conv + GN(num_groups)
    bcn           WSConv + BCN(estimate_stats)     mabn   CenConv + MABN(B=b, real_B=mabn_real_batch)
    cbn           conv + CBN(buffer_num)           naive  the same with rho=0 (no compensation)
    cbn_fullgrad  CBN with grad_through_window     brn    conv + BRN (r_max 1 -> 3, d_max 0 -> 5)

Budget: like the paper, every batch size gets the same number of epochs (``epochs`` passes over the
subset), so a batch of ``b`` takes ``epochs * train_images / b`` iterations. SGD with momentum and the
linear scaling rule ``lr = base_lr * b / base_batch``, linear warm-up then cosine decay to zero. The
iteration-counted schedules are fractions of the run: CBN's burn-in and MABN's warm-up
(``burnin_fraction``), and BRN's clipping schedule (``brn_warmup_fraction``, ``brn_r_end_fraction``,
``brn_d_end_fraction``, the paper's 5k / 40k / 25k steps of 100k).
"""
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from . import study_tables as tables
from .fashion_mnist import load_fashion_mnist
from .nets import NORMS as DIGITS_NORMS
from .small_batch import LABELS as DIGITS_LABELS

__all__ = ['NORMS', 'LABELS', 'FMNISTConfig', 'variant_cfgs', 'load_subsets', 'build_net', 'train_one',
           'aggregate', 'markdown_table', 'plot_study', 'run_study']

NORMS = (*DIGITS_NORMS, 'brn')
LABELS = {**DIGITS_LABELS, 'cbn_fullgrad': 'CBN, grad through window', 'brn': 'BRN'}
# Fashion-MNIST training-split pixel statistics are taken from the subset in use (see load_subsets).


@dataclass
class FMNISTConfig:
    """Settings of the study (defaults: the documented run)."""
    out: str = 'work_dirs/fidelity'
    data_root: str = None          # a directory with the four .gz files; default: system dir, then cache
    norms: tuple = ('bn', 'gn', 'bcn', 'mabn', 'naive', 'cbn', 'cbn_fullgrad', 'brn')
    batch_sizes: tuple = (1, 2, 4, 8, 16, 32)
    seeds: tuple = (0, 1, 2)
    train_images: int = 3000       # class-balanced subset of the 60k training images
    test_images: int = 2000        # class-balanced subset of the 10k test images
    epochs: float = 1.0
    base_lr: float = 0.1
    base_batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05  # lr warm-up, share of the iterations
    num_groups: int = 8            # GN and BCN groups (16/32/64 channels: 2/4/8 per group)
    cbn_buffer: int = 3            # window of 4 iterations
    burnin_fraction: float = 0.05  # CBN burn-in and MABN warm-up, share of the iterations
    mabn_real_batch: int = 32      # MABN averages over real_B / b iterations
    brn_momentum: float = 0.1      # running-statistic update weight of BRN (BN: torch's 0.1)
    brn_warmup_fraction: float = 0.05
    brn_r_end_fraction: float = 0.40
    brn_d_end_fraction: float = 0.25
    data_seed: int = 0             # picks the subsets (independent of the training seeds)
    workers: int = 2               # processes (each with threads torch threads)
    threads: int = 1

    QUICK: ClassVar[dict] = dict(batch_sizes=(2, 8), seeds=(0,), train_images=80, test_images=50, workers=1)

    @classmethod
    def quick(cls, **overrides):
        """A run of a few seconds (the tests): ``QUICK`` updated by ``overrides``."""
        return cls(**{**cls.QUICK, **overrides})

    def __post_init__(self):
        self.norms, self.batch_sizes, self.seeds = tuple(self.norms), tuple(self.batch_sizes), tuple(self.seeds)
        unknown = [n for n in self.norms if n not in NORMS]
        if unknown or not self.norms:
            raise ValueError(f'FMNISTConfig: norms must be a non-empty subset of {NORMS}, got {self.norms!r}')
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f'FMNISTConfig: batch_sizes must be positive ints, got {self.batch_sizes!r}')
        if not self.seeds:
            raise ValueError(f'FMNISTConfig: seeds must not be empty, got {self.seeds!r}')
        for name, limit in (('train_images', 60000), ('test_images', 10000)):
            value = getattr(self, name)
            if not isinstance(value, int) or not 10 <= value <= limit or value % 10:
                raise ValueError(f'FMNISTConfig: {name} must be a multiple of 10 in [10, {limit}] (balanced '
                                 f'classes), got {value!r}')
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ValueError(f'FMNISTConfig: epochs must be > 0, got {self.epochs!r}')
        for name in ('workers', 'threads', 'base_batch', 'mabn_real_batch'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f'FMNISTConfig: {name} must be an int >= 1, got {getattr(self, name)!r}')


def variant_cfgs(norm, batch_size, iters, cfg):
    """``(conv_cfg, norm_cfg)`` of a norm variant for a run of ``iters`` iterations at ``batch_size``."""
    burnin = int(round(cfg.burnin_fraction * iters))
    if norm == 'bn':
        return None, dict(type='BN')
    if norm == 'gn':
        return None, dict(type='GN', num_groups=cfg.num_groups)
    if norm == 'bcn':
        return dict(type='WSConv'), dict(type='BCN', num_groups=cfg.num_groups, estimate_stats=True)
    if norm == 'mabn':
        real_batch = max(cfg.mabn_real_batch, batch_size)
        real_batch -= real_batch % batch_size
        return dict(type='CenConv'), dict(type='MABN', B=batch_size, real_B=real_batch, warmup_iters=burnin)
    if norm in ('cbn', 'naive', 'cbn_fullgrad'):
        return None, dict(type='CBN', buffer_num=cfg.cbn_buffer, burnin=burnin,
                          rho=0.0 if norm == 'naive' else 1.0, grad_through_window=norm == 'cbn_fullgrad')
    if norm == 'brn':
        warmup = int(round(cfg.brn_warmup_fraction * iters))
        return None, dict(type='BRN', momentum=cfg.brn_momentum, warmup_iters=warmup,
                          r_ramp_iters=max(0, int(round(cfg.brn_r_end_fraction * iters)) - warmup),
                          d_ramp_iters=max(0, int(round(cfg.brn_d_end_fraction * iters)) - warmup))
    raise ValueError(f'variant_cfgs: norm must be one of {NORMS}, got {norm!r}')


def _balanced(labels, count, seed):
    gen = np.random.default_rng(seed)
    per_class = count // 10
    picks = [np.flatnonzero(labels == k) for k in range(10)]
    idx = np.concatenate([gen.permutation(p)[:per_class] for p in picks])
    return np.sort(idx)


def load_subsets(cfg):
    """``(x_train, y_train, x_test, y_test, directory)``: the class-balanced subsets as float32 tensors
    ``(N, 1, 28, 28)`` standardised with the training subset's pixel mean/std, and where the files were."""
    train_images, train_labels, directory = load_fashion_mnist('train', cfg.data_root)
    test_images, test_labels, _ = load_fashion_mnist('test', directory)
    tr = _balanced(train_labels, cfg.train_images, 10_000 + cfg.data_seed)
    te = _balanced(test_labels, cfg.test_images, 20_000 + cfg.data_seed)
    x_train = torch.from_numpy(train_images[tr].astype(np.float32) / 255.0).unsqueeze(1)
    x_test = torch.from_numpy(test_images[te].astype(np.float32) / 255.0).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std, torch.from_numpy(train_labels[tr]), (x_test - mean) / std,
            torch.from_numpy(test_labels[te]), directory)


def build_net(norm, batch_size, iters, cfg):
    from .basic_resnet import BasicResNet  # needs mmcv: imported only when a net is built
    conv_cfg, norm_cfg = variant_cfgs(norm, batch_size, iters, cfg)
    return BasicResNet(conv_cfg=conv_cfg, norm_cfg=norm_cfg)


EVAL_BATCH = 500   # images per eval forward


def train_one(cfg, data, norm, batch_size, seed):
    """Train one (norm, batch size, seed) and evaluate it; returns a dict (accuracies in [0, 1])."""
    x_train, y_train, x_test, y_test = data[:4]
    total = max(1, int(round(cfg.epochs * x_train.shape[0] / batch_size)))
    torch.manual_seed(seed)
    net = build_net(norm, batch_size, total, cfg)
    lr, opt = tables.scaled_sgd(cfg, net, batch_size)
    sampler = tables.batches(x_train.shape[0], batch_size, torch.Generator().manual_seed(30_000 + seed))
    losses, diverged = [], False
    start = time.perf_counter()
    net.train()
    for it, idx in tables.schedule(cfg, opt, lr, total, sampler):
        loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
        value = float(loss.detach())   # CPU: no device sync to avoid
        losses.append(value)
        if not math.isfinite(value):
            diverged = True   # evaluated as it is (chance level, or NaN outputs counted wrong)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10):]
    result = dict(norm=norm, batch_size=batch_size, seed=seed, iters=total, lr=lr,
                  test_acc=tables.accuracy(net, x_test, y_test, EVAL_BATCH),
                  train_acc=tables.accuracy(net, x_train[:1000], y_train[:1000], EVAL_BATCH),
                  final_loss=float(np.mean(tail)), diverged=diverged, train_seconds=train_seconds,
                  ms_per_iter=1e3 * train_seconds / max(1, len(losses)))
    result['cbn_fallbacks'] = tables.cbn_fallbacks(net.modules())
    return result


_WORKER = {}


def _init_worker(cfg, data):
    torch.set_num_threads(cfg.threads)
    _WORKER.update(cfg=cfg, data=data)


def _run_job(job):
    return train_one(_WORKER['cfg'], _WORKER['data'], *job)


def aggregate(results, cfg):
    """One row per (norm, batch size): test accuracy mean/std/min over seeds (%), train accuracy, loss."""
    columns = dict(train_acc=tables.seed_mean('train_acc', 100), final_loss=tables.seed_mean('final_loss'),
                   ms_per_iter=tables.seed_mean('ms_per_iter'),
                   seconds=lambda runs: float(np.sum([r['train_seconds'] for r in runs])))
    return tables.aggregate_seeds(results, cfg, columns)


def markdown_table(rows, cfg, metric='acc'):
    """Rows: norms; columns: batch sizes. ``metric``: ``'acc'`` (test accuracy %, mean ± std over
    seeds), ``'train_acc'`` (%), ``'final_loss'`` or ``'ms_per_iter'``."""
    return tables.markdown_table(rows, cfg, LABELS, {'final_loss': '.3f'}, metric)


COLORS = tables.COLORS   # the name this module has always exported


def plot_study(rows, cfg, path, title=''):
    """Test accuracy against batch size (log2 axis), one line per norm with ± std error bars."""
    plt = tables.pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for i, norm in enumerate(cfg.norms):
        pts, xs = tables.dodged(rows, norm, i, cfg, 0.025)
        ax.errorbar(xs, [r['acc_mean'] for r in pts], yerr=[r['acc_std'] for r in pts], marker='o', ms=4,
                    capsize=2, lw=1.4, color=COLORS.get(norm), label=LABELS[norm],
                    ls='--' if norm in ('naive', 'cbn_fullgrad') else '-')
    tables.batch_axis(ax, cfg, 'batch size (images per iteration; same epochs for all)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc='lower right')
    return tables.save_figure(fig, path)


# The tables after the accuracy one in fmnist_table.md: (caption, metric of markdown_table).
SECTIONS = (
    tables.LOSS_SECTION,
    ('Accuracy on 1000 of the training images in eval mode (%, mean over seeds)', 'train_acc'),
    ('Training time per iteration (ms, mean over seeds, 1 thread per run)', 'ms_per_iter'),
)


def run_study(cfg, log=None):
    """Train every (norm, batch size, seed); write CSVs, the Markdown table and the plot to ``cfg.out``."""
    log = log or (lambda message: None)   # the tool passes print
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    x_train, y_train, x_test, y_test, directory = load_subsets(cfg)
    log(f'[fmnist] data: {directory} ({x_train.shape[0]} training / {x_test.shape[0]} test images, '
        f'class-balanced subsets, data_seed={cfg.data_seed})')
    data = (x_train, y_train, x_test, y_test)
    # smallest batches first: they are the longest runs, so the workers finish together
    jobs = [(norm, b, seed) for b in sorted(cfg.batch_sizes) for seed in cfg.seeds for norm in cfg.norms]
    results = []
    start = time.perf_counter()

    def done(r):
        results.append(r)
        log(f"[fmnist] {r['norm']:>12} b={r['batch_size']:<2} seed={r['seed']}: test {100 * r['test_acc']:.1f}% "
            f"train {100 * r['train_acc']:.1f}% ({r['iters']} it, {r['train_seconds']:.1f} s) "
            f"[{len(results)}/{len(jobs)}, {time.perf_counter() - start:.0f} s]")

    if cfg.workers == 1:
        _init_worker(cfg, data)
        for job in jobs:
            done(_run_job(job))
    else:
        with ProcessPoolExecutor(cfg.workers, mp_context=get_context('spawn'), initializer=_init_worker,
                                 initargs=(cfg, data)) as pool:
            for r in pool.map(_run_job, jobs):
                done(r)
    total = time.perf_counter() - start
    key = {n: i for i, n in enumerate(cfg.norms)}
    results.sort(key=lambda r: (key[r['norm']], r['batch_size'], r['seed']))
    rows = aggregate(results, cfg)
    files = tables.study_files(cfg.out, 'fmnist')
    intro = (f'Fashion-MNIST test accuracy (%) on {x_test.shape[0]} test images, mean ± std over seeds '
             f'{list(cfg.seeds)}; {cfg.epochs:g} epoch(s) over {x_train.shape[0]} training images per run; '
             f'data from {directory}; total {total:.0f} s with {cfg.workers} worker(s).\n\n')
    tables.write_outputs(files, results, rows, cfg, intro, markdown_table, SECTIONS)
    title = (f'Fashion-MNIST, ResNet-8: {cfg.epochs:g} epoch(s) of {x_train.shape[0]} images, '
             f'{x_test.shape[0]} test images, mean ± std over {len(cfg.seeds)} seeds')
    plot_study(rows, cfg, files['plot'], title)
    log(f'[fmnist] done in {total:.1f} s; wrote {sorted(files.values())}')
    return dict(results=results, summary=rows, files=files, seconds=total, data_dir=directory)
