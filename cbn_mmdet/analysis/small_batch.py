"""Small-batch classification benchmark: every norm of cbn_mmdet in the same small CNN.

The study behind ``tools/analysis/small_batch_bench.py`` (see ``docs/fidelity.md``):
:class:`~cbn_mmdet.analysis.nets.SmallConvNet` with BN, GN, BCN (+WS conv), MABN (+centred conv), CBN
and naive cross-iteration BN (CBN with ``rho=0``) is trained on the 8x8 digits at several batch sizes
and seeds, and evaluated on the held-out split in eval mode (running statistics where the layer has
them).

Budget: every run sees the same number of training samples (``epochs`` passes over the training
split), so a batch of ``b`` gets ``epochs · N_train / b`` iterations. SGD with momentum; the learning
rate follows the linear scaling rule ``lr = base_lr · b / base_batch`` with a linear warm-up and a
cosine decay to zero (per iteration).
"""
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from . import study_tables as tables
from .nets import NORMS, SmallConvNet
from .study_config import StudyConfig

__all__ = ['BenchConfig', 'train_one', 'run_bench', 'markdown_table', 'plot_bench', 'LABELS']

LABELS = {'bn': 'BN', 'gn': 'GN', 'bcn': 'BCN+WS', 'mabn': 'MABN+CenConv', 'cbn': 'CBN',
          'naive': 'naive CBN (rho=0)', 'cbn_fullgrad': 'CBN, grad through window (diag.)'}


@dataclass
class BenchConfig(StudyConfig):
    """Settings of the benchmark (defaults: the documented run, under 15 minutes on 2 CPU cores)."""
    norms: tuple = NORMS
    batch_sizes: tuple = (1, 2, 4, 16)
    seeds: tuple = (0, 1, 2)
    epochs: float = 2.0
    base_lr: float = 0.1
    base_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    num_groups: int = 8            # GN and BCN groups (16/32/64 channels: 2/4/8 per group)
    cbn_buffer: int = 3            # window of 4 iterations
    cbn_burnin: int = 50           # training forwards of plain BN before the window is used
    mabn_real_batch: int = 16      # MABN averages over real_B / b iterations
    mabn_warmup: int = 100

    QUICK: ClassVar[dict] = dict(batch_sizes=(2, 8), seeds=(0,), epochs=0.1, cbn_burnin=3, mabn_warmup=3,
                                 mabn_real_batch=8)


# Number formats of markdown_table's metrics (the rest: '.1f'): the per-step move is tiny, and the
# cosine, the loss and the weight growth vary in the 2nd or 3rd decimal.
FORMATS = {'step_move': '.1e', 'final_loss': '.3f', 'cos_w_grad': '.3f', 'weight_growth': '.2f'}
EVAL_BATCH = 512   # chunk of the eval forwards (memory only, not the result)


def train_one(cfg, data, norm, batch_size, seed):
    """Train one (norm, batch size, seed); returns a dict with test/train accuracy and timings."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    net = SmallConvNet(norm, batch_size=batch_size, num_groups=cfg.num_groups, cbn_buffer=cfg.cbn_buffer,
                       cbn_burnin=cfg.cbn_burnin, mabn_real_batch=cfg.mabn_real_batch,
                       mabn_warmup=cfg.mabn_warmup)
    lr, opt = tables.scaled_sgd(cfg, net, batch_size)
    total = max(1, int(round(cfg.epochs * x_train.shape[0] / batch_size)))
    sampler = tables.batches(x_train.shape[0], batch_size, torch.Generator().manual_seed(20_000 + seed))
    losses, moves, cosines = [], [], []
    convs = list(net.convs)
    start_norms = [c.weight.detach().norm().item() for c in convs]
    start = time.perf_counter()
    net.train()
    for it, idx in tables.schedule(cfg, opt, lr, total, sampler):
        loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            before = [c.weight.clone() for c in convs]
            if it % 10 == 0 and it >= total // 10:
                # A norm layer that makes the loss invariant to the conv weight's scale gives cos = 0 (the
                # gradient is orthogonal to W); anything else changes |W| at first order in the lr.
                cosines.append(float(np.mean([
                    ((c.weight * c.weight.grad).sum()
                     / (c.weight.norm() * c.weight.grad.norm()).clamp_min(1e-30)).item() for c in convs])))
        opt.step()
        losses.append(loss.item())
        with torch.no_grad():   # relative conv-weight change of this step (how far a window reaches back)
            moves.append(float(np.mean([((c.weight - w).norm() / w.norm()).item() for c, w in zip(convs, before)])))
    train_seconds = time.perf_counter() - start
    diverged = not all(math.isfinite(v) for v in losses[-50:])
    result = dict(norm=norm, batch_size=batch_size, seed=seed, iters=total, lr=lr,
                  test_acc=tables.accuracy(net, x_test, y_test, EVAL_BATCH),
                  train_acc=tables.accuracy(net, x_train, y_train, EVAL_BATCH),
                  final_loss=float(np.mean(losses[-max(1, total // 10):])), diverged=diverged,
                  step_move=float(np.mean(moves)),
                  weight_growth=float(np.mean([c.weight.detach().norm().item() / n
                                               for c, n in zip(convs, start_norms)])),
                  cos_w_grad=float(np.mean(cosines)) if cosines else float('nan'),
                  train_seconds=train_seconds, ms_per_iter=1e3 * train_seconds / total)
    result['cbn_fallbacks'] = tables.cbn_fallbacks(net.norms)
    return result


def _aggregate(results, cfg):
    """One row per (norm, batch size): test accuracy over seeds (%) and the seed means of the diagnostics."""
    columns = dict(train_acc=tables.seed_mean('train_acc', 100))
    columns.update({key: tables.seed_mean(key) for key in
                    ('ms_per_iter', 'step_move', 'final_loss', 'weight_growth', 'cos_w_grad')})
    return tables.aggregate_seeds(results, cfg, columns)


def markdown_table(rows, cfg, metric='acc'):
    """One row per norm, one column per batch size.

    ``metric``: ``'acc'`` (test accuracy %, mean ± std over seeds), ``'train_acc'`` (eval-mode accuracy
    on the training split, %), ``'final_loss'`` (training loss over the last 10% of iterations, train
    mode), ``'step_move'`` (mean relative conv-weight change per iteration), ``'weight_growth'``
    (final / initial conv-weight norm) or ``'cos_w_grad'`` (mean cosine between a conv weight and its
    loss gradient).
    """
    return tables.markdown_table(rows, cfg, LABELS, FORMATS, metric)


def plot_bench(rows, cfg, path):
    plt = tables.pyplot()
    colors = tables.COLORS
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for i, norm in enumerate(cfg.norms):
        pts, xs = tables.dodged(rows, norm, i, cfg, 0.03)
        ax.errorbar(xs, [r['acc_mean'] for r in pts], yerr=[r['acc_std'] for r in pts], marker='o', ms=4,
                    capsize=2, lw=1.3, color=colors.get(norm), label=LABELS[norm])
        ax2.plot(xs, [r['weight_growth'] for r in pts], marker='o', ms=4, lw=1.3, color=colors.get(norm),
                 label=LABELS[norm])
    for axis in (ax, ax2):
        tables.batch_axis(axis, cfg, 'batch size (same number of samples seen)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'{cfg.dataset}: {cfg.epochs:g} epochs, mean ± std over {len(cfg.seeds)} seeds', fontsize=9)
    ax.legend(fontsize=7)
    ax2.set_ylabel('conv-weight norm, end / start')
    ax2.set_title('weight-norm growth (larger = smaller effective lr)', fontsize=9)
    return tables.save_figure(fig, path)


# The tables after the accuracy one in small_batch_table.md: (caption, metric of markdown_table).
SECTIONS = (
    tables.LOSS_SECTION,
    ('Accuracy on the training split in eval mode (%, mean over seeds)', 'train_acc'),
    ('Mean relative conv-weight change per iteration', 'step_move'),
    ('Conv-weight norm at the end / at the start (mean over the 4 convs and seeds)', 'weight_growth'),
    ('Mean cosine between a conv weight and its loss gradient (every 10th step after the first 10%; '
     '0 = scale-invariant)', 'cos_w_grad'),
)


def run_bench(cfg, log=None):
    """Train every (norm, batch size, seed); write CSV, Markdown table and plot to ``cfg.out``."""
    log = log or (lambda message: None)   # the tools pass print
    data = cfg.start()
    results = []
    start = time.perf_counter()
    for seed in cfg.seeds:
        for b in cfg.batch_sizes:
            for norm in cfg.norms:
                r = train_one(cfg, data, norm, b, seed)
                results.append(r)
                log(f"[small_batch] {norm:>5} b={b:<2} seed={seed}: test {100 * r['test_acc']:.1f}% "
                    f"train {100 * r['train_acc']:.1f}% ({r['iters']} it, {r['train_seconds']:.1f} s)")
    total = time.perf_counter() - start
    rows = _aggregate(results, cfg)
    files = tables.study_files(cfg.out, 'small_batch')
    intro = (f'Test accuracy (%) on {cfg.dataset}, mean ± std over seeds {list(cfg.seeds)}; '
             f'{cfg.epochs:g} epochs per run; total {total:.0f} s.\n\n')
    tables.write_outputs(files, results, rows, cfg, intro, markdown_table, SECTIONS)
    plot_bench(rows, cfg, files['plot'])
    log(f'[small_batch] done in {total:.1f} s; wrote {sorted(files.values())}')
    return dict(results=results, summary=rows, files=files, seconds=total)
