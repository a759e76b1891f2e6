"""What the two accuracy-vs-batch-size studies share (the digits one, :mod:`.small_batch`, and the
Fashion-MNIST one, :mod:`.fmnist_study`): the training schedule and sampling, the eval accuracy, the
aggregation over seeds, the Markdown tables, the plot's axes and the files a run writes.

Each study keeps its own public functions (``markdown_table``, ``aggregate`` ...) as thin wrappers that
pass its labels, columns and number formats, so their outputs stay exactly what they were.
"""
import math
import os
from dataclasses import asdict

import numpy as np
import torch

from .study_config import write_csv

__all__ = ['COLORS', 'lr_at', 'scaled_sgd', 'batches', 'schedule', 'accuracy', 'cbn_fallbacks', 'seed_mean',
           'aggregate_seeds', 'markdown_table', 'pyplot', 'dodged', 'batch_axis', 'save_figure', 'LOSS_SECTION',
           'study_files', 'write_outputs']

# One colour per norm across both studies' plots, so a norm looks the same in every figure.
COLORS = {'bn': 'tab:gray', 'gn': 'tab:green', 'bcn': 'tab:orange', 'mabn': 'tab:purple', 'cbn': 'tab:blue',
          'naive': 'tab:red', 'cbn_fullgrad': 'tab:cyan', 'brn': 'tab:brown'}


def lr_at(cfg, lr, it, total):
    """Learning rate of iteration ``it`` of ``total``: linear warm-up over ``cfg.warmup_fraction`` of the
    run, then a cosine decay to zero."""
    warmup = max(1, int(cfg.warmup_fraction * total))
    if it < warmup:
        return lr * (it + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))


def scaled_sgd(cfg, net, batch_size):
    """``(lr, opt)``: SGD with momentum at the linear scaling rule ``lr = base_lr * b / base_batch``, so
    that the batch sizes of a study are compared at the same lr per sample."""
    lr = cfg.base_lr * batch_size / cfg.base_batch
    return lr, torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def batches(num, batch_size, gen):
    """Endless index batches over ``num`` samples: a fresh permutation from ``gen`` whenever the current
    one cannot fill a whole batch (the remainder is dropped, so every batch has ``batch_size`` samples)."""
    order, pos = torch.randperm(num, generator=gen), 0
    while True:
        if pos + batch_size > order.numel():
            order, pos = torch.randperm(num, generator=gen), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def schedule(cfg, opt, lr, total, sampler):
    """``(it, idx)`` for the ``total`` iterations of a run, each after setting ``opt``'s lr to
    :func:`lr_at` (per iteration, not per epoch: a batch of 1 and one of 32 see the same curve)."""
    for it, idx in zip(range(total), sampler):
        for group in opt.param_groups:
            group['lr'] = lr_at(cfg, lr, it, total)
        yield it, idx


@torch.no_grad()
def accuracy(net, x, y, batch):
    """Eval-mode accuracy of ``net`` on ``(x, y)`` in chunks of ``batch`` (running statistics where the
    layers have them)."""
    net.eval()
    correct = 0
    for start in range(0, x.shape[0], batch):
        correct += int((net(x[start:start + batch]).argmax(1) == y[start:start + batch]).sum())
    return correct / x.shape[0]


def cbn_fallbacks(modules):
    """Total ``num_fallbacks`` of the CBN layers among ``modules``; ``''`` where there are none (an empty
    CSV cell rather than a misleading 0)."""
    fallbacks = [int(m.num_fallbacks) for m in modules if hasattr(m, 'num_fallbacks')]
    return sum(fallbacks) if fallbacks else ''


def seed_mean(key, scale=1):
    """A column of :func:`aggregate_seeds`: the mean of ``scale * run[key]`` over the seeds."""
    return lambda runs: float(np.mean([scale * r[key] for r in runs]))


def aggregate_seeds(results, cfg, columns):
    """One row per (norm, batch size) of ``cfg``: test accuracy mean/std/min over seeds (%), the number of
    seeds, ``columns`` (name -> function of the runs, in the order given) and the number of diverged runs.

    The key order is the CSV column order, hence the fixed head, then ``columns``, then ``diverged``.
    """
    rows = []
    for norm in cfg.norms:
        for b in cfg.batch_sizes:
            runs = [r for r in results if r['norm'] == norm and r['batch_size'] == b]
            acc = np.array([100 * r['test_acc'] for r in runs])
            row = dict(norm=norm, batch_size=b, acc_mean=float(acc.mean()),
                       acc_std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                       acc_min=float(acc.min()), num_seeds=len(acc))
            row.update({name: column(runs) for name, column in columns.items()})
            row['diverged'] = sum(r['diverged'] for r in runs)
            rows.append(row)
    return rows


def _cell(row, metric, formats):
    if metric == 'acc':
        cell = f"{row['acc_mean']:.1f} ± {row['acc_std']:.1f}"
        return cell + (f" ({row['diverged']} diverged)" if row['diverged'] else '')
    return format(row[metric], formats.get(metric, '.1f'))


def markdown_table(rows, cfg, labels, formats, metric='acc'):
    """Rows: ``cfg.norms`` (named by ``labels``); columns: ``cfg.batch_sizes``. ``metric`` ``'acc'`` is
    the test accuracy as mean ± std (and the diverged runs); any other is the row's value formatted with
    ``formats[metric]`` (default ``'.1f'``)."""
    lines = ['| norm | ' + ' | '.join(f'b={b}' for b in cfg.batch_sizes) + ' |',
             '|' + '---|' * (len(cfg.batch_sizes) + 1)]
    for norm in cfg.norms:
        cells = [_cell(next(r for r in rows if r['norm'] == norm and r['batch_size'] == b), metric, formats)
                 for b in cfg.batch_sizes]
        lines.append(f'| {labels[norm]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: imported only when a plot is drawn (headless runs, and
    importing a study stays cheap)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def dodged(rows, norm, i, cfg, spread):
    """The rows of ``norm`` (the ``i``-th of ``cfg.norms``) and their batch sizes shifted by a relative
    ``spread`` per norm, so that the error bars of different norms do not hide each other."""
    pts = [r for r in rows if r['norm'] == norm]
    return pts, [r['batch_size'] * (1 + spread * (i - len(cfg.norms) / 2)) for r in pts]


def batch_axis(axis, cfg, xlabel):
    """A log2 x axis ticked at the batch sizes of ``cfg``, with a grid."""
    axis.set_xscale('log', base=2)
    axis.set_xticks(list(cfg.batch_sizes))
    axis.set_xticklabels([str(b) for b in cfg.batch_sizes])
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)


def save_figure(fig, path):
    """Lay out, write (110 dpi) and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


# The training-loss table both studies write after the accuracy one: (caption, metric).
LOSS_SECTION = ('Training loss (train mode, last 10% of iterations, mean over seeds)', 'final_loss')


def study_files(out, prefix):
    """The paths a study run writes in ``out``: per-run CSV, summary CSV, Markdown tables, plot."""
    return dict(runs=os.path.join(out, f'{prefix}_runs.csv'), summary=os.path.join(out, f'{prefix}_summary.csv'),
                table=os.path.join(out, f'{prefix}_table.md'), plot=os.path.join(out, f'{prefix}_acc.png'))


def write_outputs(files, results, rows, cfg, intro, table, sections):
    """Write both CSVs and the Markdown file: ``intro``, the accuracy table, one ``(caption, metric)``
    table per entry of ``sections`` (``table(rows, cfg, metric)``), and the settings of ``cfg``."""
    write_csv(files['runs'], results)
    write_csv(files['summary'], rows)
    with open(files['table'], 'w') as f:
        f.write(intro)
        f.write(table(rows, cfg))
        for caption, metric in sections:
            f.write(f'\n{caption}:\n\n')
            f.write(table(rows, cfg, metric))
        f.write('\nSettings: ' + ', '.join(f'{k}={v}' for k, v in asdict(cfg).items()) + '\n')
