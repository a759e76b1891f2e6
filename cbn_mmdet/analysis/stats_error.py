"""How well do BN, naive cross-iteration averaging and CBN estimate the statistics at the current weights?

The study behind ``tools/analysis/stats_error.py`` (see ``docs/fidelity.md``):

1. Train :class:`~cbn_mmdet.analysis.nets.SmallConvNet` with SGD (momentum) the way detectors are
   trained without SyncBN: each iteration takes a global batch of ``global_batch`` images, split into
   "per-GPU" chunks of ``b`` images that BN normalises separately (:class:`GhostBatchNorm2d`), and one
   step with the learning rate ``lr`` of the global batch. This is the weight trajectory
   ``θ_0, θ_1, ...``; the estimators below see the stream of chunk 0 (what one GPU's CBN sees).
2. At chosen iterations ``t`` compare, per conv layer, the statistics each estimator would normalise with
   against the *true* statistics: those of a fixed reference set of ``ref_size`` held-out images at the
   current weights ``θ_t`` (every earlier layer normalised with its own reference statistics, i.e. what
   BN with a very large batch computes).
3. The estimators see the mini-batches of iterations ``t, t−1, ..., t−k+1``. To measure the estimator
   alone, each mini-batch is recorded with the earlier layers normalised by the true statistics of its
   own iteration ("oracle upstream"), so the only errors are sampling noise, staleness of past entries
   and the Taylor approximation, not the compounding of earlier layers' errors.

Estimators (``window`` k = ``buffer_num + 1``; at k = 1 all equal ``bn``):

* ``bn``: the current mini-batch alone;
* ``naive``: CBN with ``rho=0`` (past statistics used as they were recorded);
* ``cbn``: CBN's compensated estimate (Taylor step in the layer's own weight, μ and ν);
* ``cbn_mean_only``: μ compensated, ν not;

  (these three are what the real ``CrossIterationBatchNorm2d`` normalises with, see ``cbn_probe``)
* ``own_layer`` (diagnostic): past inputs, the layer's current weight applied *exactly*: the best any
  compensation in the layer's own weight can do (equal to ``cbn`` for μ, which is linear in ``W``);
* ``recompute`` (oracle): the past mini-batches re-run through the whole current network: only
  sampling noise is left (the floor of any cross-iteration estimator with this window).

A second table ("drift") isolates the compensation: for every past entry ``τ`` it compares the raw and
the compensated statistics with the exact ``μ_{t−τ}(θ_t)``, ``ν_{t−τ}(θ_t)``.
"""
import collections
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cbn_probe import cbn_window_statistics
from .nets import POOL_AFTER, SmallConvNet
from .stat_estimators import ESTIMATORS, compensate, exact_entry, mean_error, pooled_moments, record_entry, var_error
from .study_config import StudyConfig, write_csv
from .study_tables import save_figure

__all__ = ['StatsErrorConfig', 'GhostBatchNorm2d', 'probe_forward', 'run_trajectory', 'run_stats_error', 'summarise',
           'markdown_summary', 'plot_stats_error', 'ALL_ESTIMATORS']

ALL_ESTIMATORS = ('bn', 'naive', 'cbn', 'cbn_mean_only', 'own_layer', 'recompute')


@dataclass
class StatsErrorConfig(StudyConfig):
    """Settings of the study (defaults: the documented run, a few minutes on 2 CPU cores)."""
    batch_sizes: tuple = (1, 2, 4, 8)             # BN ("per-GPU") batch b
    global_batch: int = 16                        # images per SGD step (a multiple of every b)
    windows: tuple = (1, 2, 3, 4, 5, 6, 7, 8)     # k = buffer_num + 1
    seeds: tuple = (0, 1, 2)
    iters: int = 500
    num_evals: int = 10
    eval_start: int = 30
    lr: float = 0.1                               # for the global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_sweep_batch: int = 2
    lr_sweep: tuple = (0.01, 0.03, 0.3, 1.0)     # extra trajectories at lr_sweep_batch (besides lr)
    ref_size: int = 256

    QUICK: ClassVar[dict] = dict(batch_sizes=(1, 4), global_batch=4, windows=(1, 2, 4), seeds=(0,), iters=40,
                                 num_evals=2, eval_start=10, lr_sweep=(1.0,), ref_size=64)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BN whose training statistics are those of each consecutive chunk of ``chunk`` samples.

    The per-GPU BN of data-parallel training without SyncBN, in one process: a batch of ``g·chunk``
    images is normalised as ``g`` independent batches (one ``F.batch_norm`` call on a reshaped input).
    Running statistics are not tracked (the study never evaluates the driver net).
    """

    def __init__(self, num_features, chunk, eps=1e-5):
        super().__init__(num_features, eps=eps, track_running_stats=False)
        self.chunk = chunk

    def forward(self, x):
        n, c, h, w = x.shape
        if n % self.chunk:
            raise ValueError(f'GhostBatchNorm2d: batch {n} is not a multiple of chunk={self.chunk}')
        g = n // self.chunk
        xr = x.view(g, self.chunk, c, h, w).transpose(0, 1).reshape(self.chunk, g * c, h, w)
        out = F.batch_norm(xr, None, None, self.weight.repeat(g), self.bias.repeat(g), True, 0.0, self.eps)
        return out.view(self.chunk, g, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def _driver_net(batch_size):
    net = SmallConvNet('bn')
    net.norms = nn.ModuleList(GhostBatchNorm2d(n.num_features, batch_size) for n in net.norms)
    return net.double()


# ----------------------------------------------------------------------------------------------- probing
@torch.no_grad()
def probe_forward(net, x, stats=None, eps=1e-5):
    """Run ``net``'s blocks on ``x``; block ``l`` normalises with ``stats[l] = (μ, σ²)``.

    With ``stats=None`` every block normalises with ``x``'s own batch statistics (biased variance), as
    BN in training does. The norm layers' affine parameters are applied; running statistics are
    neither used nor updated. Returns ``(conv_inputs, own_stats)``: the input of every conv, and the
    ``(μ, σ²)`` of every conv output over ``x``.
    """
    inputs, own = [], []
    h = x
    for index, (conv, norm) in enumerate(zip(net.convs, net.norms)):
        inputs.append(h)
        y = conv(h)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        own.append((mean, var))
        m, v = (mean, var) if stats is None else stats[index]
        h = (y - m.view(1, -1, 1, 1)) * torch.rsqrt(v + eps).view(1, -1, 1, 1)
        if norm.weight is not None:
            h = h * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
        h = h.relu()
        if index == POOL_AFTER:
            h = F.max_pool2d(h, 2)
    return inputs, own


def _probe_logits(net, x):
    """The net's output with every layer normalised by ``x``'s own statistics (large-batch BN)."""
    inputs, stats = probe_forward(net, x)
    conv, norm = net.convs[-1], net.norms[-1]
    mean, var = stats[-1]
    y = conv(inputs[-1])
    h = (y - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + 1e-5).view(1, -1, 1, 1)
    h = (h * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)).relu()
    return net.fc(h.mean((2, 3)))


def _eval_iterations(cfg, windows_max):
    first = max(cfg.eval_start, windows_max - 1)
    if cfg.num_evals == 1:
        return [cfg.iters - 1]
    return sorted({int(round(v)) for v in np.linspace(first, cfg.iters - 1, cfg.num_evals)})


def _rel_norm(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------- one run
def run_trajectory(cfg, data, batch_size, lr, seed, sweep='main'):
    """Train one trajectory and evaluate every estimator at ``cfg``'s evaluation iterations.

    Returns ``(error_rows, drift_rows, info)``: lists of dicts (see ``run_stats_error`` for the columns)
    and a dict with the run's training loss, weight movement per iteration and duration.
    """
    x_train, y_train, x_test, _ = data
    k_max = max(cfg.windows)
    evals = _eval_iterations(cfg, k_max)
    needed = {i for e in evals for i in range(e - k_max + 1, e + 1)}
    if cfg.global_batch % batch_size:
        raise ValueError(f'stats_error: global_batch={cfg.global_batch} is not a multiple of batch {batch_size}')
    torch.manual_seed(seed)
    net = _driver_net(batch_size)
    x_train, x_ref = x_train.double(), x_test[:cfg.ref_size].double()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(10_000 + seed)
    history = collections.deque(maxlen=k_max)
    step_moves = [[] for _ in net.convs]
    losses, error_rows, drift_rows = [], [], []
    start = time.perf_counter()
    base = dict(sweep=sweep, batch_size=batch_size, lr=lr, seed=seed)
    for it in range(cfg.iters):
        idx = torch.randint(0, x_train.shape[0], (cfg.global_batch,), generator=gen)
        x_global, y_global = x_train[idx], y_train[idx]
        xb = x_global[:batch_size]        # chunk 0: the stream one GPU's norm layers see
        if it in needed:
            _, truth = probe_forward(net, x_ref)
            inputs, _ = probe_forward(net, xb, stats=truth)
            entries = [record_entry(conv, inp) for conv, inp in zip(net.convs, inputs)]
            history.append(dict(it=it, x=xb, inputs=inputs, entries=entries))
            if it in evals:
                rows, drift = _evaluate(cfg, net, history, truth)
                error_rows += [dict(base, iter=it, **row) for row in rows]
                drift_rows += [dict(base, iter=it, **row) for row in drift]
        before = [conv.weight.detach().clone() for conv in net.convs]
        net.train()
        loss = F.cross_entropy(net(x_global), y_global)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for moves, conv, old in zip(step_moves, net.convs, before):
            moves.append(_rel_norm(conv.weight.detach(), old))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f'stats_error: loss diverged (batch {batch_size}, lr {lr}, seed {seed})')
    tail = max(1, len(losses) // 10)
    with torch.no_grad():   # the driver net in "large-batch BN" mode on held-out images
        acc = (_probe_logits(net, x_test.double()).argmax(1) == data[3]).double().mean().item()
    info = dict(base, final_loss=float(np.mean(losses[-tail:])), test_acc=acc, seconds=time.perf_counter() - start,
                **{f'step_move_l{layer}': float(np.mean(m)) for layer, m in enumerate(step_moves)})
    return error_rows, drift_rows, info


@torch.no_grad()
def _evaluate(cfg, net, history, truth):
    """Error rows (every layer × window × estimator) and drift rows (every layer × past entry)."""
    hist = list(history)[::-1]                       # newest first: hist[0] is the current iteration
    num_past = len(hist) - 1
    # The past mini-batches re-run through the current network (oracle upstream at θ_t).
    if num_past:
        past_x = torch.cat([h['x'] for h in hist[1:]])
        past_inputs, _ = probe_forward(net, past_x, stats=truth)
        sizes = [h['x'].shape[0] for h in hist[1:]]
    rows, drift = [], []
    for layer, conv in enumerate(net.convs):
        weight_t = conv.weight.detach()
        mean_true, var_true = truth[layer]
        sq_true = var_true + mean_true * mean_true
        current = hist[0]['entries'][layer]
        recompute = [exact_entry(conv, chunk, weight_t) for chunk in past_inputs[layer].split(sizes)] \
            if num_past else []
        own_layer = [exact_entry(conv, h['inputs'][layer], weight_t) for h in hist[1:]]
        past = [h['entries'][layer] for h in hist[1:]]
        past_runs = [(h['inputs'][layer], h['entries'][layer].weight) for h in hist[1:]]
        for k in cfg.windows:
            if k - 1 > num_past:
                continue
            estimates = {'bn': pooled_moments([current])}
            for name, (rho, compensate_sq) in ESTIMATORS.items():
                # the real CBN layer fed this window (a window of one is BN on the current batch)
                estimates[name] = cbn_window_statistics(conv, past_runs[:k - 1], hist[0]['inputs'][layer], weight_t,
                                                        rho, compensate_sq) if k > 1 else estimates['bn']
            estimates['own_layer'] = pooled_moments([current] + own_layer[:k - 1])
            estimates['recompute'] = pooled_moments([current] + recompute[:k - 1])
            drift_k = _rel_norm(weight_t, past[k - 2].weight) if k > 1 else 0.0
            for name in ALL_ESTIMATORS:
                mean, var = estimates[name]
                rows.append(dict(layer=layer, window=k, estimator=name, weight_drift=drift_k,
                                 mean_err=mean_error(mean, mean_true, var_true),
                                 var_err=var_error(var, var_true)))
        for tau in range(1, num_past + 1):
            entry = past[tau - 1]
            target_mean, target_sq = recompute[tau - 1]
            candidates = {'naive': (entry.mean, entry.sq), 'cbn': compensate(entry, weight_t),
                          'own_layer': own_layer[tau - 1]}
            for name, (mean, sq) in candidates.items():
                drift.append(dict(layer=layer, tau=tau, estimator=name,
                                  weight_drift=_rel_norm(weight_t, entry.weight),
                                  mean_err=((mean - target_mean).abs() / var_true.sqrt()).mean().item(),
                                  sq_err=((sq - target_sq).abs() / var_true).mean().item(),
                                  invalid=(sq - mean * mean < 0).double().mean().item(),
                                  sq_rel_true=(sq_true / var_true).mean().item()))
    return rows, drift


# ----------------------------------------------------------------------------------------------- study
def summarise(rows, keys, values=('mean_err', 'var_err')):
    """Mean (and standard error over seeds) of ``values`` grouped by ``keys``; a list of dicts.

    Errors are first averaged within each seed (over iterations and layers), then over seeds.
    """
    per_seed = collections.defaultdict(list)
    for row in rows:
        per_seed[tuple(row[k] for k in keys) + (row['seed'],)].append(row)
    grouped = collections.defaultdict(list)
    for key, group in per_seed.items():
        grouped[key[:-1]].append({v: float(np.mean([r[v] for r in group])) for v in values})
    out = []
    for key in sorted(grouped, key=lambda k: tuple(str(x) if isinstance(x, str) else x for x in k)):
        seeds = grouped[key]
        row = dict(zip(keys, key))
        for v in values:
            vals = np.array([s[v] for s in seeds])
            row[v] = float(vals.mean())
            row[v + '_sem'] = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0
        row['num_seeds'] = len(seeds)
        out.append(row)
    return out


def run_stats_error(cfg, log=None):
    """Run the whole study, write CSVs and PNGs to ``cfg.out``; return the summary rows and file paths."""
    log = log or (lambda message: None)   # the tools pass print
    data = cfg.start()
    runs = [('main', b, cfg.lr) for b in cfg.batch_sizes]
    runs += [('lr', cfg.lr_sweep_batch, lr) for lr in cfg.lr_sweep if lr != cfg.lr]
    errors, drifts, infos = [], [], []
    start = time.perf_counter()
    for sweep, batch_size, lr in runs:
        for seed in cfg.seeds:
            e, d, info = run_trajectory(cfg, data, batch_size, lr, seed, sweep)
            errors += e
            drifts += d
            infos.append(info)
            log(f'[stats_error] b={batch_size} lr={lr:g} seed={seed}: final loss {info["final_loss"]:.3f}, '
                f'test acc {100 * info["test_acc"]:.1f}%, '
                f'per-step weight move {np.mean([info[f"step_move_l{layer}"] for layer in range(4)]):.2e}, '
                f'{info["seconds"]:.1f} s')
    # The lr sweep's centre point is the main run at lr_sweep_batch.
    lr_rows = [r for r in errors if r['batch_size'] == cfg.lr_sweep_batch]
    files = dict(raw=os.path.join(cfg.out, 'stats_error_raw.csv'),
                 drift=os.path.join(cfg.out, 'stats_error_drift.csv'),
                 runs=os.path.join(cfg.out, 'stats_error_runs.csv'),
                 summary=os.path.join(cfg.out, 'stats_error_summary.csv'))
    write_csv(files['raw'], errors)
    write_csv(files['drift'], drifts)
    write_csv(files['runs'], infos)
    summary = summarise(errors, ('sweep', 'batch_size', 'lr', 'window', 'estimator'))
    summary_main = [r for r in summary if r['sweep'] == 'main']
    summary_lr = summarise(lr_rows, ('batch_size', 'lr', 'window', 'estimator'))
    drift_summary = summarise([r for r in drifts if r['sweep'] == 'main'],
                              ('batch_size', 'tau', 'estimator'),
                              values=('mean_err', 'sq_err', 'weight_drift', 'invalid'))
    drift_lr = summarise([r for r in drifts if r['batch_size'] == cfg.lr_sweep_batch],
                         ('lr', 'tau', 'estimator'), values=('mean_err', 'sq_err', 'weight_drift'))
    drift_layers = summarise([r for r in drifts if r['sweep'] == 'main'], ('layer', 'tau', 'estimator'),
                             values=('mean_err', 'sq_err', 'weight_drift', 'invalid'))
    evals = sorted({r['iter'] for r in errors})
    cut = evals[len(evals) // 3] if len(evals) > 2 else evals[-1] + 1
    phases = summarise([dict(r, phase='early' if r['iter'] < cut else 'late') for r in errors
                        if r['sweep'] == 'main'], ('phase', 'window', 'estimator'))
    write_csv(files['summary'], summary)
    files.update(plot_stats_error(cfg, summary_main, summary_lr, drift_summary, drift_lr))
    files['markdown'] = os.path.join(cfg.out, 'stats_error_summary.md')
    with open(files['markdown'], 'w') as f:
        f.write(markdown_summary(cfg, summary_main, summary_lr, drift_layers, phases, infos, cut,
                                 time.perf_counter() - start))
    config_path = os.path.join(cfg.out, 'stats_error_config.txt')
    with open(config_path, 'w') as f:
        for key, value in asdict(cfg).items():
            f.write(f'{key} = {value}\n')
        f.write(f'total_seconds = {time.perf_counter() - start:.1f}\n')
    files['config'] = config_path
    log(f'[stats_error] done in {time.perf_counter() - start:.1f} s; wrote {sorted(files.values())}')
    return dict(summary=summary, summary_lr=summary_lr, drift=drift_summary, drift_lr=drift_lr,
                runs=infos, files=files)


def _fmt(row, metric):
    return f"{row[metric]:.4f} ± {row[metric + '_sem']:.4f}" if row.get('num_seeds', 1) > 1 else f'{row[metric]:.4f}'


def markdown_summary(cfg, summary_main, summary_lr, drift_layers, phases, infos, cut, seconds):
    """The study's key numbers as Markdown tables (mean ± s.e.m. over seeds)."""
    names = ('bn', 'naive', 'cbn', 'cbn_mean_only', 'own_layer', 'recompute')
    lines = [f'# Statistics error study ({cfg.dataset}; seeds {list(cfg.seeds)}; {seconds:.0f} s)', '',
             f'Training: {cfg.iters} SGD steps of a global batch of {cfg.global_batch} images (lr {cfg.lr:g} unless '
             'swept), BN per chunk of b images (per-GPU BN of data-parallel training); the estimators see chunk 0. '
             f'Reference set: {cfg.ref_size} held-out images. '
             'Errors averaged over channels, the 4 conv layers and the evaluation iterations, then over seeds '
             '(± standard error over seeds). mean error = |mu_hat - mu|/sigma, variance error = '
             '|s2_hat - s2|/s2, against the reference statistics at the current weights.', '']
    for metric, title in (('mean_err', 'mean error'), ('var_err', 'variance error')):
        for k in sorted({k for k in (2, 4, max(cfg.windows)) if k in cfg.windows}):
            lines += [f'## {title}, window k={k} (buffer_num={k - 1}), lr {cfg.lr:g}', '',
                      '| batch | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
            for b in cfg.batch_sizes:
                cells = []
                for name in names:
                    row = _select(summary_main, batch_size=b, window=k, estimator=name)
                    cells.append(_fmt(row[0], metric) if row else '')
                lines.append(f'| {b} | ' + ' | '.join(cells) + ' |')
            lines.append('')
    k = max(cfg.windows)
    lines += [f'## learning-rate sweep, batch {cfg.lr_sweep_batch}, window {k}', '',
              '| lr | per-step weight move | ' + ' | '.join(f'{n} mean / var' for n in names) + ' |',
              '|---' * (len(names) + 2) + '|']
    for lr in sorted({r['lr'] for r in summary_lr}):
        moves = [np.mean([i[f'step_move_l{layer}'] for layer in range(4)]) for i in infos
                 if i['batch_size'] == cfg.lr_sweep_batch and i['lr'] == lr]
        cells = []
        for name in names:
            row = _select(summary_lr, lr=lr, window=k, estimator=name)
            cells.append(f"{row[0]['mean_err']:.4f} / {row[0]['var_err']:.4f}" if row else '')
        lines.append(f'| {lr:g} | {np.mean(moves):.2e} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    lines += ['## training runs', '',
              '| sweep | batch | lr | seed | final loss | test acc | per-step weight move (layers 0-3) |',
              '|---|---|---|---|---|---|---|']
    for i in infos:
        moves = ', '.join(f"{i[f'step_move_l{layer}']:.1e}" for layer in range(4))
        lines.append(f"| {i['sweep']} | {i['batch_size']} | {i['lr']:g} | {i['seed']} | {i['final_loss']:.3f} | "
                     f"{100 * i['test_acc']:.1f}% | {moves} |")
    lines.append('')
    taus = sorted({r['tau'] for r in drift_layers})
    pick = [t for t in (1, 3, taus[-1]) if t in taus] if taus else []
    lines += ['## one stale entry against its exact value at the current weights (main runs, all batch sizes)', '',
              'mean: |mu_hat - mu_exact|/sigma; second moment: |nu_hat - nu_exact|/s2; drift: |W_t - W_tau|/|W_t|.', '',
              '| layer | tau | weight drift | naive mean | cbn mean | naive nu | cbn nu | own-layer-exact nu '
              '| cbn entries with nu < mu^2 |', '|---|---|---|---|---|---|---|---|---|']
    for layer in sorted({r['layer'] for r in drift_layers}):
        for tau in sorted(set(pick)):
            get = {n: _select(drift_layers, layer=layer, tau=tau, estimator=n)[0]
                   for n in ('naive', 'cbn', 'own_layer')}
            lines.append(f"| {layer} | {tau} | {get['cbn']['weight_drift']:.3f} | {get['naive']['mean_err']:.4f} | "
                         f"{get['cbn']['mean_err']:.4f} | {get['naive']['sq_err']:.4f} | {get['cbn']['sq_err']:.4f} | "
                         f"{get['own_layer']['sq_err']:.4f} | {get['cbn']['invalid']:.2%} |")
    lines.append('')
    lines += [f'## early (iteration < {cut}) vs late evaluations, all batch sizes, window {k}', '',
              '| phase | ' + ' | '.join(f'{n} mean / var' for n in names) + ' |', '|---' * (len(names) + 1) + '|']
    for phase in ('early', 'late'):
        cells = []
        for name in names:
            row = _select(phases, phase=phase, window=k, estimator=name)
            cells.append(f"{row[0]['mean_err']:.4f} / {row[0]['var_err']:.4f}" if row else '')
        lines.append(f'| {phase} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------------------------- plots
_STYLE = {'bn': ('tab:gray', 'o', 'BN (current batch)'), 'naive': ('tab:red', 's', 'naive (rho=0)'),
          'cbn': ('tab:blue', '^', 'CBN (compensated)'), 'cbn_mean_only': ('tab:purple', 'v', 'CBN, mean only'),
          'own_layer': ('tab:green', 'x', 'exact own-layer (diag.)'),
          'recompute': ('black', '.', 'recompute (oracle)')}


def _select(rows, **where):
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _plot_estimators(ax, rows, x_key, metric, **where):
    """One error-bar line per estimator: ``metric`` (± s.e.m.) of ``rows`` matching ``where`` against
    ``x_key``, log y axis (the diagnostic and oracle estimators dashed)."""
    for name in ALL_ESTIMATORS:
        pts = _select(rows, estimator=name, **where)
        if not pts:
            continue
        color, marker, text = _STYLE[name]
        ax.errorbar([p[x_key] for p in pts], [p[metric] for p in pts], yerr=[p[metric + '_sem'] for p in pts],
                    color=color, marker=marker, ms=4, lw=1.2, capsize=2, label=text,
                    ls='--' if name in ('own_layer', 'recompute') else '-')
    ax.set_yscale('log')
    ax.grid(alpha=0.3, which='both')


def _label_grid(ax, row, col, title, xlabel, ylabel):
    """Labels of a 2-row grid: titles on the top row, x labels on the bottom one, y labels on the left."""
    if row == 0:
        ax.set_title(title)
    if row == 1:
        ax.set_xlabel(xlabel)
    if col == 0:
        ax.set_ylabel(ylabel, fontsize=8)


def plot_stats_error(cfg, summary_main, summary_lr, drift_main, drift_lr):
    """Write the PNGs; returns ``{name: path}``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    files = {}
    metrics = (('mean_err', 'mean error  |mu_hat - mu| / sigma'), ('var_err', 'variance error  |s2_hat - s2| / s2'))
    # 1. error vs window, one column per batch size.
    fig, axes = plt.subplots(2, len(cfg.batch_sizes), figsize=(3.4 * len(cfg.batch_sizes), 6.2), squeeze=False)
    for col, b in enumerate(cfg.batch_sizes):
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            _plot_estimators(ax, summary_main, 'window', metric, batch_size=b)
            _label_grid(ax, row, col, f'batch {b}, lr {cfg.lr:g}', 'window k = buffer_num + 1', label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    files['plot_window'] = save_figure(fig, os.path.join(cfg.out, 'stats_error_vs_window.png'))
    # 2. error vs batch size at each window in a small set.
    ks = [k for k in (2, 4, max(cfg.windows)) if k in cfg.windows] or [max(cfg.windows)]
    fig, axes = plt.subplots(2, len(ks), figsize=(3.6 * len(ks), 6.2), squeeze=False)
    for col, k in enumerate(ks):
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            _plot_estimators(ax, summary_main, 'batch_size', metric, window=k)
            ax.set_xscale('log', base=2)
            _label_grid(ax, row, col, f'window k={k} (buffer_num={k - 1}), lr {cfg.lr:g}', 'batch size', label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    files['plot_batch'] = save_figure(fig, os.path.join(cfg.out, 'stats_error_vs_batch.png'))
    # 3. learning-rate sweep at lr_sweep_batch: error vs lr at the largest window; drift vs tau.
    lrs = sorted({r['lr'] for r in summary_lr})
    k = max(cfg.windows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for metric, ax, label in (('mean_err', axes[0], 'mean error'), ('var_err', axes[1], 'variance error')):
        _plot_estimators(ax, summary_lr, 'lr', metric, window=k)
        ax.set_xscale('log')
        ax.set_xlabel('learning rate')
        ax.set_title(f'{label}, batch {cfg.lr_sweep_batch}, window {k}')
    axes[0].legend(fontsize=7)
    ax = axes[2]
    for lr_value, color in zip(lrs, ('tab:olive', 'tab:orange', 'tab:red', 'tab:brown', 'tab:pink', 'tab:cyan')):
        for name, ls in (('naive', ':'), ('cbn', '-')):
            pts = _select(drift_lr, lr=lr_value, estimator=name)
            if pts:
                ax.plot([p['tau'] for p in pts], [p['sq_err'] for p in pts], color=color, ls=ls, marker='.',
                        label=f'lr {lr_value:g} {name}')
    ax.set_yscale('log')
    ax.grid(alpha=0.3, which='both')
    ax.set_xlabel('age tau of the past entry (iterations)')
    ax.set_title('one stale entry vs exact: |nu_hat - nu| / s2')
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    files['plot_lr'] = save_figure(fig, os.path.join(cfg.out, 'stats_error_vs_lr.png'))
    # 4. drift of single entries at the main lr, per batch size.
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for metric, ax, label in (('mean_err', axes[0], '|mu_hat - mu_exact| / sigma'),
                              ('sq_err', axes[1], '|nu_hat - nu_exact| / s2')):
        for b, color in zip(cfg.batch_sizes, ('tab:red', 'tab:orange', 'tab:green', 'tab:blue', 'tab:purple')):
            for name, ls in (('naive', ':'), ('cbn', '-')):
                pts = _select(drift_main, batch_size=b, estimator=name)
                if pts:
                    ax.plot([p['tau'] for p in pts], [max(p[metric], 1e-12) for p in pts], color=color, ls=ls,
                            marker='.', label=f'b={b} {name}')
        ax.set_yscale('log')
        ax.grid(alpha=0.3, which='both')
        ax.set_xlabel('age tau of the past entry (iterations)')
        ax.set_title(label + f', lr {cfg.lr:g}', fontsize=9)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    files['plot_drift'] = save_figure(fig, os.path.join(cfg.out, 'stats_error_drift.png'))
    return files
