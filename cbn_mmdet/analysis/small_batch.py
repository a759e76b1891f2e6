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
import os
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .nets import NORMS, SmallConvNet
from .study_config import StudyConfig, write_csv

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


def _lr_at(cfg, lr, it, total):
    warmup = max(1, int(cfg.warmup_fraction * total))
    if it < warmup:
        return lr * (it + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))


@torch.no_grad()
def _accuracy(net, x, y, batch=512):
    net.eval()
    correct = 0
    for start in range(0, x.shape[0], batch):
        correct += (net(x[start:start + batch]).argmax(1) == y[start:start + batch]).sum().item()
    return correct / x.shape[0]


def train_one(cfg, data, norm, batch_size, seed):
    """Train one (norm, batch size, seed); returns a dict with test/train accuracy and timings."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    net = SmallConvNet(norm, batch_size=batch_size, num_groups=cfg.num_groups, cbn_buffer=cfg.cbn_buffer,
                       cbn_burnin=cfg.cbn_burnin, mabn_real_batch=cfg.mabn_real_batch,
                       mabn_warmup=cfg.mabn_warmup)
    lr = cfg.base_lr * batch_size / cfg.base_batch
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total = max(1, int(round(cfg.epochs * x_train.shape[0] / batch_size)))
    gen = torch.Generator().manual_seed(20_000 + seed)
    order, pos = torch.randperm(x_train.shape[0], generator=gen), 0
    losses, moves, cosines = [], [], []
    convs = list(net.convs)
    start_norms = [c.weight.detach().norm().item() for c in convs]
    start = time.perf_counter()
    net.train()
    for it in range(total):
        if pos + batch_size > order.numel():
            order, pos = torch.randperm(x_train.shape[0], generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group['lr'] = _lr_at(cfg, lr, it, total)
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
                  test_acc=_accuracy(net, x_test, y_test), train_acc=_accuracy(net, x_train, y_train),
                  final_loss=float(np.mean(losses[-max(1, total // 10):])), diverged=diverged,
                  step_move=float(np.mean(moves)),
                  weight_growth=float(np.mean([c.weight.detach().norm().item() / n
                                               for c, n in zip(convs, start_norms)])),
                  cos_w_grad=float(np.mean(cosines)) if cosines else float('nan'),
                  train_seconds=train_seconds, ms_per_iter=1e3 * train_seconds / total)
    fallbacks = [int(m.num_fallbacks) for m in net.norms if hasattr(m, 'num_fallbacks')]
    result['cbn_fallbacks'] = sum(fallbacks) if fallbacks else ''
    return result


def _aggregate(results, cfg):
    rows = []
    for norm in cfg.norms:
        for b in cfg.batch_sizes:
            runs = [r for r in results if r['norm'] == norm and r['batch_size'] == b]
            acc = np.array([100 * r['test_acc'] for r in runs])
            rows.append(dict(norm=norm, batch_size=b, acc_mean=float(acc.mean()),
                             acc_std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                             acc_min=float(acc.min()), num_seeds=len(acc),
                             train_acc=float(np.mean([100 * r['train_acc'] for r in runs])),
                             ms_per_iter=float(np.mean([r['ms_per_iter'] for r in runs])),
                             step_move=float(np.mean([r['step_move'] for r in runs])),
                             final_loss=float(np.mean([r['final_loss'] for r in runs])),
                             weight_growth=float(np.mean([r['weight_growth'] for r in runs])),
                             cos_w_grad=float(np.mean([r['cos_w_grad'] for r in runs])),
                             diverged=sum(r['diverged'] for r in runs)))
    return rows


def markdown_table(rows, cfg, metric='acc'):
    """One row per norm, one column per batch size.

    ``metric``: ``'acc'`` (test accuracy %, mean ± std over seeds), ``'train_acc'`` (eval-mode accuracy
    on the training split, %), ``'final_loss'`` (training loss over the last 10% of iterations, train
    mode), ``'step_move'`` (mean relative conv-weight change per iteration), ``'weight_growth'``
    (final / initial conv-weight norm) or ``'cos_w_grad'`` (mean cosine between a conv weight and its
    loss gradient).
    """
    header = '| norm | ' + ' | '.join(f'b={b}' for b in cfg.batch_sizes) + ' |'
    lines = [header, '|' + '---|' * (len(cfg.batch_sizes) + 1)]
    for norm in cfg.norms:
        cells = []
        for b in cfg.batch_sizes:
            r = next(r for r in rows if r['norm'] == norm and r['batch_size'] == b)
            if metric == 'acc':
                cell = f"{r['acc_mean']:.1f} ± {r['acc_std']:.1f}"
                if r['diverged']:
                    cell += f" ({r['diverged']} diverged)"
            elif metric == 'step_move':
                cell = f"{r['step_move']:.1e}"
            elif metric in ('final_loss', 'cos_w_grad'):
                cell = f"{r[metric]:.3f}"
            elif metric == 'weight_growth':
                cell = f"{r[metric]:.2f}"
            else:
                cell = f'{r[metric]:.1f}'
            cells.append(cell)
        lines.append(f'| {LABELS[norm]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def plot_bench(rows, cfg, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    colors = {'bn': 'tab:gray', 'gn': 'tab:green', 'bcn': 'tab:orange', 'mabn': 'tab:purple',
              'cbn': 'tab:blue', 'naive': 'tab:red', 'cbn_fullgrad': 'tab:cyan'}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for i, norm in enumerate(cfg.norms):
        pts = [r for r in rows if r['norm'] == norm]
        xs = [r['batch_size'] * (1 + 0.03 * (i - len(cfg.norms) / 2)) for r in pts]   # dodge overlaps
        ax.errorbar(xs, [r['acc_mean'] for r in pts], yerr=[r['acc_std'] for r in pts], marker='o', ms=4,
                    capsize=2, lw=1.3, color=colors.get(norm), label=LABELS[norm])
        ax2.plot(xs, [r['weight_growth'] for r in pts], marker='o', ms=4, lw=1.3, color=colors.get(norm),
                 label=LABELS[norm])
    for axis in (ax, ax2):
        axis.set_xscale('log', base=2)
        axis.set_xticks(list(cfg.batch_sizes))
        axis.set_xticklabels([str(b) for b in cfg.batch_sizes])
        axis.set_xlabel('batch size (same number of samples seen)')
        axis.grid(alpha=0.3)
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'{cfg.dataset}: {cfg.epochs:g} epochs, mean ± std over {len(cfg.seeds)} seeds', fontsize=9)
    ax.legend(fontsize=7)
    ax2.set_ylabel('conv-weight norm, end / start')
    ax2.set_title('weight-norm growth (larger = smaller effective lr)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    files = dict(runs=os.path.join(cfg.out, 'small_batch_runs.csv'),
                 summary=os.path.join(cfg.out, 'small_batch_summary.csv'),
                 table=os.path.join(cfg.out, 'small_batch_table.md'),
                 plot=os.path.join(cfg.out, 'small_batch_acc.png'))
    write_csv(files['runs'], results)
    write_csv(files['summary'], rows)
    with open(files['table'], 'w') as f:
        f.write(f'Test accuracy (%) on {cfg.dataset}, mean ± std over seeds {list(cfg.seeds)}; '
                f'{cfg.epochs:g} epochs per run; total {total:.0f} s.\n\n')
        f.write(markdown_table(rows, cfg))
        f.write('\nTraining loss (train mode, last 10% of iterations, mean over seeds):\n\n')
        f.write(markdown_table(rows, cfg, 'final_loss'))
        f.write('\nAccuracy on the training split in eval mode (%, mean over seeds):\n\n')
        f.write(markdown_table(rows, cfg, 'train_acc'))
        f.write('\nMean relative conv-weight change per iteration:\n\n')
        f.write(markdown_table(rows, cfg, 'step_move'))
        f.write('\nConv-weight norm at the end / at the start (mean over the 4 convs and seeds):\n\n')
        f.write(markdown_table(rows, cfg, 'weight_growth'))
        f.write('\nMean cosine between a conv weight and its loss gradient (every 10th step after the first '
                '10%; 0 = scale-invariant):\n\n')
        f.write(markdown_table(rows, cfg, 'cos_w_grad'))
        f.write('\nSettings: ' + ', '.join(f'{k}={v}' for k, v in asdict(cfg).items()) + '\n')
    plot_bench(rows, cfg, files['plot'])
    log(f'[small_batch] done in {total:.1f} s; wrote {sorted(files.values())}')
    return dict(results=results, summary=rows, files=files, seconds=total)
