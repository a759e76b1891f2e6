"""How well do per-GPU BN, SyncBN, naive cross-iteration averaging and CBN estimate the statistics
of the norm layers *inside the detector*, along a real training run?

The study behind ``tools/analysis/detector_stats.py`` (see ``docs/fidelity.md``, "Statistics inside the
detector"):

1. Train the demo's Mask R-CNN (default ``configs/demo/mask_rcnn_r18_fpn_cbn_demo.py``) exactly as
   ``tools/train.py`` does (same config, same Runner, same hooks; validation off), with one extra hook
   (:class:`DetectorStatsHook`) that looks at the model before chosen training iterations and never
   changes it (its work runs on a separate copy, with the random-number streams of the training saved
   and restored around it).
2. Before every iteration ``τ`` of the windows ending at an evaluation point ``t`` the weights ``W_τ``
   are copied into a *probe* model built from the same config, whose BN-type norm layers (the backbone's
   BN and the FPN/RoI-head norms) are taken over by :class:`NormProbe`:

   * **truth** at ``τ``: one forward (mmdet's ``loss`` path, so the RoI heads see the RoIs sampled as in
     training) of ``ref_size`` held-out images, every norm layer normalising with its own statistics over
     that large batch; the statistics ``(μ, σ²)`` of each layer are the truth;
   * **record** at ``τ``: the image of "GPU 0" in iteration ``τ`` (the first image of the training batch)
     pushed through the same weights with every norm normalising by the truth of ``τ`` ("oracle
     upstream", as in the digits study): the input ``x`` of every studied conv and the norm input
     ``y = conv(x)`` are kept.

3. At ``t`` every studied layer (each conv + BN-type norm of the FPN, the box head and the mask head)
   compares, for each window ``k``:

   * ``bn``: the statistics of ``y_t`` alone (BN on a per-GPU batch of 1 image; for the RoI heads, the
     RoIs of 1 image);
   * ``syncbn``: those of the same ``k`` images as the window (this iteration's and the ``k − 1``
     previous iterations' GPU-0 images), all run again at the current weights ``W_t``: SyncBN over ``k``
     GPUs of 1 image, and the floor of any window of ``k`` images (no staleness, only sampling noise);
   * ``naive``: the window of the last ``k`` iterations' statistics as they were computed (the real
     ``CrossIterationBatchNorm2d`` with ``rho=0`` and ``buffer_num = k − 1``);
   * ``cbn``: the real layer's compensated estimate (``rho=1``, ``buffer_num = k − 1``), see
     :mod:`cbn_mmdet.analysis.cbn_probe`;

   against the truth at ``t``. Errors per channel (:mod:`cbn_mmdet.analysis.stat_estimators`)::

       mean_err = mean_c |μ̂_c − μ_c| / σ_c     var_err = mean_c |σ̂²_c − σ²_c| / σ²_c
       logvar_err = mean_c |log σ̂²_c − log σ²_c|

The library prints nothing; :func:`run_detector_stats` takes a ``log`` callable for progress lines.
"""
import collections
import contextlib
import copy
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import numpy as np
import torch
from mmengine.hooks import Hook
from torch.nn.modules.batchnorm import _BatchNorm

from .cbn_probe import cbn_window_statistics
from .stat_estimators import mean_error, var_error
from .study_config import write_csv
from .study_tables import save_figure

__all__ = ['DetectorStatsConfig', 'NormProbe', 'DetectorStatsHook', 'ESTIMATORS', 'GROUPS', 'layer_group',
           'study_layers', 'batch_statistics', 'union_statistics', 'window_estimates', 'logvar_error',
           'evaluate_point', 'spread_points', 'run_detector_stats', 'summarise', 'gains', 'markdown_summary',
           'plot_detector_stats']

ESTIMATORS = ('bn', 'syncbn', 'naive', 'cbn')
GROUP_ORDER = ('FPN P2', 'FPN P3', 'FPN P4', 'FPN P5', 'FPN P6', 'box head', 'mask head')
# coarse groups of the per-iteration table
GROUPS = {'FPN': lambda g: g.startswith('FPN'), 'box head': lambda g: g == 'box head',
          'mask head': lambda g: g == 'mask head'}
DEFAULT_CONFIG = 'configs/demo/mask_rcnn_r18_fpn_cbn_demo.py'


@dataclass
class DetectorStatsConfig:
    """Settings of the study (defaults: the documented run, about 10 minutes on 2 CPU cores).

    ``points`` are training iterations (0-based, counted over the whole run) before which the
    estimators are compared; each needs ``max(windows) − 1`` earlier iterations. ``None``: ``num_points``
    iterations evenly spread from ``max(windows) − 1`` to the last one. Training stops at the last point.
    ``cfg_options`` are merged into the config like ``tools/train.py --cfg-options``.
    """
    config: str = DEFAULT_CONFIG
    windows: tuple = (2, 4, 8)        # k: images (SyncBN) or iterations (naive, CBN: buffer_num = k − 1)
    points: tuple = None
    num_points: int = 6
    ref_size: int = 32                # held-out images of the large batch that gives the truth
    out: str = 'work_dirs/detector_stats'
    threads: int = 1
    cfg_options: dict = field(default_factory=dict)

    QUICK: ClassVar[dict] = dict(windows=(2,), points=(1,), ref_size=2)

    @classmethod
    def quick(cls, **overrides):
        """A tiny run (a few training iterations, one point, window 2): ``QUICK`` updated by ``overrides``."""
        return cls(**{**cls.QUICK, **overrides})

    def check(self):
        """Raise ``ValueError`` naming the first bad field."""
        if not self.windows or any(not isinstance(k, int) or k < 2 for k in self.windows):
            raise ValueError(f'detector_stats: windows={self.windows!r}: need window sizes k >= 2 (integers)')
        if self.points is None:
            if not isinstance(self.num_points, int) or self.num_points < 1:
                raise ValueError(f'detector_stats: num_points={self.num_points!r}: need a positive integer')
        else:
            if not self.points or any(not isinstance(p, int) or p < 0 for p in self.points):
                raise ValueError(f'detector_stats: points={self.points!r}: need training iterations >= 0 '
                                 '(integers)')
            first = max(self.windows) - 1
            if min(self.points) < first:
                raise ValueError(f'detector_stats: points={self.points!r}: the first point must be >= '
                                 f'max(windows) - 1 = {first} (its window needs that many earlier iterations)')
            if len(set(self.points)) != len(self.points):
                raise ValueError(f'detector_stats: points={self.points!r}: repeated iteration')
        if not isinstance(self.ref_size, int) or self.ref_size < 2:
            raise ValueError(f'detector_stats: ref_size={self.ref_size!r}: need at least 2 images')
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f'detector_stats: threads={self.threads!r}: need a positive integer')


# ----------------------------------------------------------------------------------------------- layers
def layer_group(name, start_level=0):
    """The group of a studied layer from its module name in the detector (``None``: not studied)."""
    match = re.fullmatch(r'neck\.(?:lateral|fpn)_convs\.(\d+)', name)
    if match:
        return f'FPN P{start_level + int(match.group(1)) + 2}'
    if name.startswith('neck.'):
        return 'FPN other'
    if name.startswith('roi_head.bbox_head.'):
        return 'box head'
    if name.startswith('roi_head.mask_head.'):
        return 'mask head'
    return None


def study_layers(model):
    """``{name: (conv, norm, group)}``: every conv → BN-type norm block of the FPN and the RoI heads.

    A block is an mmcv ``ConvModule`` (conv, then norm). Raises ``ValueError`` when there is none (a
    config without a BN-type norm in the neck and heads) or when a block's norm does not follow its conv.
    """
    from mmcv.cnn import ConvModule
    start = getattr(getattr(model, 'neck', None), 'start_level', 0)
    layers = {}
    for name, module in model.named_modules():
        group = layer_group(name, start)
        if group is None or not isinstance(module, ConvModule) or not module.with_norm:
            continue
        if not isinstance(module.norm, _BatchNorm):
            continue
        if module.order.index('conv') > module.order.index('norm'):
            raise ValueError(f'detector_stats: {name}: order={module.order!r}, the norm must follow the conv')
        layers[name] = (module.conv, module.norm, group)
    if not layers:
        raise ValueError('detector_stats: the model has no BN-type norm layer (BN, SyncBN, CBN, ...) in its FPN '
                         'or RoI heads: nothing to study')
    return layers


class NormProbe:
    """Takes over every BN-type norm layer of a probe copy of a detector.

    ``mode='batch'``: each layer normalises with its input's own channel mean and (biased) variance
    and keeps them in ``stats`` (the large-batch truth). ``mode='fixed'``: each layer normalises with
    ``fixed[name]``. Either way ``x[name]`` (the conv input) and ``y[name]`` (the norm input) of the
    studied layers of the last forward are kept. Normalisation: ``γ (y − μ)/sqrt(σ² + eps) + β`` with each
    layer's own ``eps``, γ and β; nothing of the layers' state (running statistics, CBN windows) is used
    or changed.
    """

    def __init__(self, model):
        self.model = model
        self.layers = study_layers(model)
        self.mode, self.fixed = 'batch', None
        self.stats, self.x, self.y = {}, {}, {}
        self.norm_names = []
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                module.forward = self._norm_forward(name, module)
                self.norm_names.append(name)
        self.study_norm = {}
        module_names = {id(m): n for n, m in model.named_modules()}
        self.norm_of = {}     # studied layer -> the module name of its norm
        for name, (conv, norm, _) in self.layers.items():
            conv.register_forward_pre_hook(self._conv_hook(name))
            self.study_norm[id(norm)] = name
            self.norm_of[name] = module_names[id(norm)]

    def _conv_hook(self, name):
        def hook(conv, args):
            self.x[name] = args[0].detach()
        return hook

    def _norm_forward(self, name, module):
        def forward(y):
            study = self.study_norm.get(id(module))
            if study is not None:
                self.y[study] = y.detach()
            if self.mode == 'batch':
                if y.shape[0] * y.shape[2] * y.shape[3] < 2:
                    raise ValueError(f'detector_stats: norm layer {name}: {tuple(y.shape)} input, too few '
                                     'values for batch statistics')
                mean, var = batch_statistics(y)
                self.stats[name] = (mean, var)
            else:
                mean, var = self.fixed[name]
            shape = (1, -1, 1, 1)
            out = (y - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
            if module.weight is not None:
                out = out * module.weight.view(shape) + module.bias.view(shape)
            return out
        return forward

    @torch.no_grad()
    def run(self, batch, fixed=None):
        """One ``loss``-mode forward of ``batch`` (a collated ``dict(inputs, data_samples)``).

        ``fixed=None``: batch mode, returns the statistics of every norm layer; otherwise fixed mode with
        those statistics. Returns ``(stats, x, y)`` of this forward (dicts by layer name).
        """
        self.mode, self.fixed = ('batch', None) if fixed is None else ('fixed', fixed)
        self.stats, self.x, self.y = {}, {}, {}
        data = self.model.data_preprocessor(copy.deepcopy(batch), True)
        self.model.loss(data['inputs'], data['data_samples'])
        missing = [n for n in self.layers if n not in self.y or n not in self.x]
        if missing:
            raise RuntimeError(f'detector_stats: the forward did not reach the studied layers {missing}')
        return self.stats, self.x, self.y

    def layer_stats(self, stats):
        """``stats`` of :meth:`run` (by norm module) for the studied layers (by layer name)."""
        return {name: stats[norm] for name, norm in self.norm_of.items()}

    def weights(self):
        """The current conv weight of every studied layer (clones)."""
        return {n: conv.weight.detach().clone() for n, (conv, _, _) in self.layers.items()}


# ----------------------------------------------------------------------------------------------- estimators
def batch_statistics(y):
    """Channel mean and biased variance of ``y`` over ``(N, H, W)`` (float64 accumulation)."""
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    return mean.to(y.dtype), var.to(y.dtype)


def union_statistics(ys):
    """Statistics of the union of the batches ``ys`` (SyncBN: every value weighted alike, so batches of
    unequal size, e.g. different RoI counts, weigh by their size)."""
    return batch_statistics(torch.cat(list(ys)))


def window_estimates(conv, current, past, weight_t, k):
    """``{'naive': (μ̂, σ̂²), 'cbn': (μ̂, σ̂²)}`` of the real CBN layer with window ``k``.

    ``current`` is the conv input of this iteration, ``past`` ``[(x_τ, W_τ), ...]`` newest first.
    """
    if len(past) < k - 1:
        raise ValueError(f'detector_stats: window k={k} needs {k - 1} past iterations, got {len(past)}')
    return {name: cbn_window_statistics(conv, past[:k - 1], current, weight_t, rho=rho)
            for name, rho in (('naive', 0.0), ('cbn', 1.0))}


def logvar_error(var_est, var_true, floor=1e-12):
    """``mean_c |log σ̂²_c − log σ²_c|``."""
    return (var_est.clamp_min(floor).log() - var_true.clamp_min(floor).log()).abs().mean().item()


def _rel_norm(a, b):
    return ((a - b).norm() / a.norm().clamp_min(1e-12)).item()


def evaluate_point(layers, history, sync_y, windows):
    """Error rows of every studied layer × window × estimator at one point.

    Args:
        layers (dict): ``{name: (conv, norm, group)}`` (:func:`study_layers`).
        history (list): newest first; ``history[0]`` is the current iteration. Each entry a dict with
            ``x``, ``y``, ``weight`` (dicts by layer) and ``truth`` (``{layer: (μ, σ²)}``, only the current
            entry's is used).
        sync_y (list): ``{layer: y}`` of the past entries' images run again at the current weights,
            newest first (SyncBN over ``k`` GPUs uses the first ``k − 1``).
        windows (tuple): the window sizes ``k``.
    """
    now = history[0]
    rows = []
    for name, (conv, _, group) in layers.items():
        mean_true, var_true = now['truth'][name]
        weight_t = now['weight'][name]
        past = [(h['x'][name], h['weight'][name]) for h in history[1:]]
        bn = batch_statistics(now['y'][name])
        for k in windows:
            estimates = {'bn': bn, 'syncbn': union_statistics([now['y'][name]] + [s[name] for s in sync_y[:k - 1]])}
            estimates.update(window_estimates(conv, now['x'][name], past, weight_t, k))
            drift = _rel_norm(weight_t, history[k - 1]['weight'][name])
            for est in ESTIMATORS:
                mean, var = estimates[est]
                rows.append(dict(layer=name, group=group, window=k, estimator=est, weight_drift=drift,
                                 mean_err=mean_error(mean, mean_true, var_true),
                                 var_err=var_error(var, var_true), logvar_err=logvar_error(var, var_true)))
    return rows


# ----------------------------------------------------------------------------------------------- the hook
@contextlib.contextmanager
def _isolated_rng():
    """Run the probe without touching the training's random streams (torch CPU, numpy, python)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _unwrap(model):
    from mmengine.model import is_model_wrapper
    return model.module if is_model_wrapper(model) else model


def _single(data_batch, index=0):
    """Image ``index`` of a collated batch, as a batch of one (deep copy)."""
    return copy.deepcopy(dict(inputs=[data_batch['inputs'][index]],
                              data_samples=[data_batch['data_samples'][index]]))


class _StudyDone(Exception):
    """Raised by the hook after the last point: ends the training run early."""


class DetectorStatsHook(Hook):
    """Measures the estimators before the iterations of :class:`DetectorStatsConfig`'s windows.

    Args:
        cfg_model (dict): the training config's ``model`` (the probe copy is built from it).
        stats_cfg (DetectorStatsConfig): windows and points.
        ref_batch (dict): the collated held-out images of the truth.
        log (callable): receives one line per point.

    Fills ``rows`` (:func:`evaluate_point`'s, with ``iter``) and ``point_info`` (epoch, lr, whether the
    trained CBN layers use their window, the relative weight step per group). Raises an internal
    exception after the last point to end the run (caught by :func:`run_detector_stats`).
    """
    priority = 'LOWEST'     # after the other hooks' before_train_iter (burn-in switch)

    def __init__(self, cfg_model, stats_cfg, ref_batch, log=None):
        self.cfg_model, self.stats_cfg = copy.deepcopy(cfg_model), stats_cfg
        self.ref_batch = ref_batch
        self.log = log or (lambda message: None)
        k_max = max(stats_cfg.windows)
        self.points = sorted(stats_cfg.points)
        self.needed = {i for p in self.points for i in range(p - k_max + 1, p + 1)}
        self.rows, self.point_info = [], []
        self.history = collections.deque(maxlen=k_max)
        self.probe = None
        self.seconds = 0.0

    def before_train(self, runner):
        from mmdet.registry import MODELS
        with _isolated_rng():
            model = MODELS.build(copy.deepcopy(self.cfg_model))
        model.eval().requires_grad_(False)
        self.probe = NormProbe(model)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        it = runner.iter
        if it not in self.needed:
            return
        start = time.perf_counter()
        with _isolated_rng():
            self._record(runner, it, data_batch)
            if it in self.points:
                self._evaluate(runner, it)
        self.seconds += time.perf_counter() - start
        if it == self.points[-1]:
            raise _StudyDone

    def _record(self, runner, it, data_batch):
        probe = self.probe
        probe.model.load_state_dict(_unwrap(runner.model).state_dict())
        truth, _, _ = probe.run(self.ref_batch)
        batch = _single(data_batch)
        _, x, y = probe.run(batch, fixed=truth)
        if self.history and self.history[0]['iter'] != it - 1:
            self.history.clear()
        self.history.appendleft(dict(iter=it, batch=batch, x=x, y=y, weight=probe.weights(),
                                     truth=probe.layer_stats(truth), fixed=truth))

    def _evaluate(self, runner, it):
        from ..engine.hooks.cbn_burnin_hook import cbn_layers
        probe, now = self.probe, self.history[0]
        sync_y = [probe.run(h['batch'], fixed=now['fixed'])[2] for h in list(self.history)[1:]]
        rows = evaluate_point(probe.layers, list(self.history), sync_y, self.stats_cfg.windows)
        cbns = cbn_layers(_unwrap(runner.model))
        info = dict(iter=it, epoch=runner.epoch, lr=float(runner.optim_wrapper.get_lr()['lr'][0]),
                    cbn_window_on=bool(cbns) and all(layer.window_enabled for layer in cbns))
        for group in sorted({r['group'] for r in rows}, key=_group_key):
            moves = [_rel_norm(now['weight'][n], self.history[1]['weight'][n])
                     for n, (_, _, g) in probe.layers.items() if g == group]
            info[f'step_move {group}'] = float(np.mean(moves))
        self.point_info.append(info)
        self.rows += [dict(iter=it, **row) for row in rows]
        k = max(self.stats_cfg.windows)
        parts = []
        for g, test in GROUPS.items():
            errs = [np.mean([r['var_err'] for r in rows
                             if r['estimator'] == e and r['window'] == k and test(r['group'])]) for e in ESTIMATORS]
            parts.append(f'{g} ' + '/'.join(f'{v:.3f}' for v in errs))
        self.log(f'  iter {it} (epoch {runner.epoch}, lr {info["lr"]:.1e}) variance error k={k}, '
                 f'{"/".join(ESTIMATORS)}: ' + ', '.join(parts))


# ----------------------------------------------------------------------------------------------- study
def _dataset(cfg_dataset, pipeline):
    from mmdet.registry import DATASETS
    cfg_dataset = copy.deepcopy(cfg_dataset)
    cfg_dataset['pipeline'] = copy.deepcopy(pipeline)
    cfg_dataset['test_mode'] = False
    return DATASETS.build(cfg_dataset)


def spread_points(stats_cfg, max_iters):
    """``num_points`` iterations evenly spread from ``max(windows) − 1`` to ``max_iters − 1``."""
    first = max(stats_cfg.windows) - 1
    if first >= max_iters:
        raise ValueError(f'detector_stats: windows={stats_cfg.windows!r}: the run has only {max_iters} iterations')
    return tuple(sorted({int(round(v)) for v in np.linspace(first, max_iters - 1, stats_cfg.num_points)}))


def _reference_batch(cfg, stats_cfg, held_out_cfg):
    """The ``ref_size`` first held-out images through the training pipeline, collated."""
    from mmengine.dataset import pseudo_collate
    ref_set = _dataset(held_out_cfg, cfg.train_dataloader.dataset.pipeline)
    if len(ref_set) < stats_cfg.ref_size:
        raise ValueError(f'detector_stats: ref_size={stats_cfg.ref_size} but the held-out split has only '
                         f'{len(ref_set)} images')
    return pseudo_collate([ref_set[i] for i in range(stats_cfg.ref_size)])


def _held_out_dataset_cfg(cfg):
    for key in ('val_dataloader', 'test_dataloader'):
        loader = cfg.get(key)
        if loader and loader.get('dataset'):
            return copy.deepcopy(loader['dataset'])
    raise ValueError('detector_stats: the config has neither a val_dataloader nor a test_dataloader: no '
                     'held-out images for the reference batch')


def run_detector_stats(stats_cfg, log=None):
    """Train the config with a :class:`DetectorStatsHook`; write CSVs, Markdown and PNGs to ``stats_cfg.out``.

    Returns ``dict(rows, summary, points, files, seconds, probe_seconds)``.
    """
    from ..engine.runner_setup import build_runner
    from ..engine.training import prepare_train_config
    from ..engine.work_dir_lock import work_dir_lock

    log = log or (lambda message: None)
    stats_cfg.check()
    torch.set_num_threads(stats_cfg.threads)
    os.makedirs(stats_cfg.out, exist_ok=True)
    start = time.perf_counter()
    work_dir = os.path.join(stats_cfg.out, 'train')
    cfg = prepare_train_config(stats_cfg.config, work_dir=work_dir, cfg_options=dict(stats_cfg.cfg_options),
                               log=log)
    held_out = _held_out_dataset_cfg(cfg)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None     # each point is its own evaluation
    ref_batch = _reference_batch(cfg, stats_cfg, held_out)
    with work_dir_lock(cfg.work_dir):
        runner = build_runner(cfg)
        max_iters = runner.train_loop.max_iters
        iters_per_epoch = len(runner.train_loop.dataloader)
        if stats_cfg.points is None:
            stats_cfg = replace(stats_cfg, points=spread_points(stats_cfg, max_iters))
        if max(stats_cfg.points) >= max_iters:
            raise ValueError(f'detector_stats: points={stats_cfg.points!r}: the run has {max_iters} iterations '
                             f'({cfg.train_cfg.max_epochs} epochs of {iters_per_epoch}); the last point must be '
                             f'< {max_iters}')
        hook = DetectorStatsHook(cfg.model, stats_cfg, ref_batch, log)
        runner.register_hook(hook)
        log(f'training {stats_cfg.config} ({max_iters} iterations, {iters_per_epoch} per epoch), points '
            f'{sorted(stats_cfg.points)}, windows {stats_cfg.windows}, truth over {stats_cfg.ref_size} images')
        try:
            runner.train()
        except _StudyDone:
            pass
    seconds = time.perf_counter() - start
    rows, info = hook.rows, hook.point_info
    summary = summarise(rows, ('group', 'window', 'estimator'))
    by_iter = summarise(rows, ('iter', 'window', 'estimator'), coarse=True)
    files = dict(raw=os.path.join(stats_cfg.out, 'detector_stats_raw.csv'),
                 summary=os.path.join(stats_cfg.out, 'detector_stats_summary.csv'),
                 by_iter=os.path.join(stats_cfg.out, 'detector_stats_by_iter.csv'),
                 points=os.path.join(stats_cfg.out, 'detector_stats_points.csv'),
                 markdown=os.path.join(stats_cfg.out, 'detector_stats_summary.md'))
    write_csv(files['raw'], rows)
    write_csv(files['summary'], summary)
    write_csv(files['by_iter'], by_iter)
    write_csv(files['points'], info)
    with open(files['markdown'], 'w') as f:
        f.write(markdown_summary(stats_cfg, rows, summary, by_iter, info, seconds, hook.seconds))
    files.update(plot_detector_stats(stats_cfg, summary, by_iter, info))
    with open(os.path.join(stats_cfg.out, 'detector_stats_config.txt'), 'w') as f:
        f.write(repr(asdict(stats_cfg)) + '\n')
    return dict(rows=rows, summary=summary, by_iter=by_iter, points=info, files=files, seconds=seconds,
                probe_seconds=hook.seconds)


def _group_key(group):
    return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)


def summarise(rows, keys, values=('mean_err', 'var_err', 'logvar_err', 'weight_drift'), coarse=False):
    """Mean of ``values`` over the rows sharing ``keys`` (layers of a group, points); a list of dicts.

    ``coarse=True`` adds the key ``group`` as the coarse groups of :data:`GROUPS` (FPN, box head, mask
    head) instead of the fine ones.
    """
    grouped = collections.defaultdict(list)
    for row in rows:
        key = tuple(row[k] for k in keys)
        if coarse:
            key += (next(g for g, test in GROUPS.items() if test(row['group'])),)
        grouped[key].append(row)
    names = tuple(keys) + (('group',) if coarse else ())
    out = []
    for key, group in grouped.items():
        row = dict(zip(names, key))
        for v in values:
            row[v] = float(np.mean([r[v] for r in group]))
        row['num_layers'] = len({r['layer'] for r in group})
        out.append(row)

    def order(r):
        return tuple(_group_key(r[n]) if n == 'group' else
                     (ESTIMATORS.index(r[n]) if n == 'estimator' else r[n]) for n in names)
    return sorted(out, key=order)


def _select(rows, **where):
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def gains(coarse, metric, window, group):
    """How CBN compares at one window and coarse group (``coarse``: :func:`summarise` with
    ``coarse=True`` over ``('window', 'estimator')``): ``1 − cbn/naive``, ``1 − cbn/bn`` and the share of
    the staleness error it removes, ``(naive − cbn)/(naive − syncbn)`` (``nan`` when the window adds no
    error over SyncBN)."""
    value = {r['estimator']: r[metric] for r in _select(coarse, window=window, group=group)}
    stale = value['naive'] - value['syncbn']
    removed = (value['naive'] - value['cbn']) / stale if stale > 0 else float('nan')
    return 1 - value['cbn'] / value['naive'], 1 - value['cbn'] / value['bn'], removed


def markdown_summary(stats_cfg, rows, summary, by_iter, info, seconds, probe_seconds):
    """The tables of ``detector_stats_summary.md``."""
    ks = sorted(stats_cfg.windows)
    groups = sorted({r['group'] for r in summary}, key=_group_key)
    lines = [f'# Statistics inside the detector: `{stats_cfg.config}`', '',
             f'Truth: {stats_cfg.ref_size} held-out images at the current weights; points (iterations) '
             f'{sorted(stats_cfg.points)}; windows k = {ks}. Run: {seconds:.0f} s ({probe_seconds:.0f} s of it '
             'measuring).', '']
    head = ['bn'] + [f'{e} k={k}' for e in ('syncbn', 'naive', 'cbn') for k in ks]
    for metric, text in (('mean_err', 'mean error |mu_hat - mu| / sigma'),
                         ('var_err', 'variance error |s2_hat - s2| / s2'),
                         ('logvar_err', 'log-variance error |log s2_hat - log s2|')):
        lines += [f'## {text}, averaged over the layers of a group and the points', '',
                  '| group | layers | ' + ' | '.join(head) + ' |', '|---' * (len(head) + 2) + '|']
        for g in groups:
            bn = _select(summary, group=g, window=ks[0], estimator='bn')[0]
            cells = [f"{bn[metric]:.4f}"]
            for est in ('syncbn', 'naive', 'cbn'):
                cells += [f"{_select(summary, group=g, window=k, estimator=est)[0][metric]:.4f}" for k in ks]
            lines.append(f"| {g} | {bn['num_layers']} | " + ' | '.join(cells) + ' |')
        lines.append('')
    coarse = summarise(rows, ('window', 'estimator'), coarse=True)
    lines += ['## CBN against the naive window, per-GPU BN and SyncBN (FPN, box head, mask head: all their '
              'layers and points)', '',
              '`1 - cbn/naive`, `1 - cbn/bn`: how much smaller CBN\'s error is; staleness removed: '
              '`(naive - cbn) / (naive - syncbn)`, the share of the error the window\'s old weights add '
              '(over SyncBN on the same images) that the compensation takes away.', '',
              '| group | k | mean: vs naive | vs bn | staleness removed | variance: vs naive | vs bn '
              '| staleness removed |', '|---|---|---|---|---|---|---|---|']
    for g in GROUPS:
        for k in ks:
            cells = []
            for metric in ('mean_err', 'var_err'):
                cells += [f'{v:+.0%}' if math.isfinite(v) else '–' for v in gains(coarse, metric, k, g)]
            lines.append(f'| {g} | {k} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    k_iter = _iter_window(stats_cfg)
    coarse = list(GROUPS)
    lines += [f'## per point, window k={k_iter}: mean error / variance error', '',
              '| iter | epoch | lr | CBN window on in training | weight step (FPN, box, mask) | '
              + ' | '.join(f'{g}: {e}' for g in coarse for e in ESTIMATORS) + ' |',
              '|---' * (5 + len(coarse) * len(ESTIMATORS)) + '|']
    for p in info:
        moves = [np.mean([v for key, v in p.items() if key.startswith('step_move ') and GROUPS[g](key[10:])])
                 for g in coarse]
        cells = []
        for g in coarse:
            for e in ESTIMATORS:
                r = _select(by_iter, iter=p['iter'], window=k_iter, estimator=e, group=g)[0]
                cells.append(f"{r['mean_err']:.3f} / {r['var_err']:.3f}")
        lines.append(f"| {p['iter']} | {p['epoch']} | {p['lr']:.1e} | {'yes' if p['cbn_window_on'] else 'no'} | "
                     + ', '.join(f'{m:.1e}' for m in moves) + ' | ' + ' | '.join(cells) + ' |')
    lines.append('')
    return '\n'.join(lines) + '\n'


def _iter_window(stats_cfg):
    return 4 if 4 in stats_cfg.windows else max(stats_cfg.windows)


# ----------------------------------------------------------------------------------------------- plots
_STYLE = {'bn': ('tab:gray', 'o', 'BN (1 image)'), 'syncbn': ('black', '.', 'SyncBN (k GPUs x 1 image)'),
          'naive': ('tab:red', 's', 'naive window (rho=0)'), 'cbn': ('tab:blue', '^', 'CBN (compensated)')}


def plot_detector_stats(stats_cfg, summary, by_iter, info):
    """``detector_stats_vs_window.png`` and ``detector_stats_vs_iter.png`` in ``stats_cfg.out``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    metrics = (('mean_err', '|mu_hat - mu| / sigma'), ('var_err', '|s2_hat - s2| / s2'))
    files = {}
    groups = sorted({r['group'] for r in summary}, key=_group_key)
    fig, axes = plt.subplots(2, len(groups), figsize=(2.7 * len(groups), 5.6), squeeze=False)
    for col, g in enumerate(groups):
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            for est in ESTIMATORS:
                pts = _select(summary, group=g, estimator=est)
                color, marker, text = _STYLE[est]
                ax.plot([p['window'] for p in pts], [p[metric] for p in pts], color=color, marker=marker, ms=4,
                        lw=1.2, label=text, ls='--' if est == 'syncbn' else '-')
            ax.set_yscale('log')
            ax.set_xscale('log', base=2)
            ax.grid(alpha=0.3, which='both')
            if row == 0:
                ax.set_title(g)
            else:
                ax.set_xlabel('window k')
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    files['plot_window'] = save_figure(fig, os.path.join(stats_cfg.out, 'detector_stats_vs_window.png'))

    k = _iter_window(stats_cfg)
    fig, axes = plt.subplots(2, len(GROUPS), figsize=(3.4 * len(GROUPS), 5.6), squeeze=False)
    for col, g in enumerate(GROUPS):
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            for est in ESTIMATORS:
                pts = _select(by_iter, group=g, estimator=est, window=k)
                color, marker, text = _STYLE[est]
                ax.plot([p['iter'] for p in pts], [p[metric] for p in pts], color=color, marker=marker, ms=4,
                        lw=1.2, label=text, ls='--' if est == 'syncbn' else '-')
            ax.set_yscale('log')
            ax.grid(alpha=0.3, which='both')
            if row == 0:
                ax.set_title(f'{g}, k={k}')
            else:
                ax.set_xlabel('training iteration')
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    lrs = [p['lr'] for p in info]
    for col in range(len(GROUPS)):
        twin = axes[1][col].twinx()
        twin.plot([p['iter'] for p in info], lrs, color='tab:olive', alpha=0.4, lw=1)
        twin.set_yscale('log')
        twin.tick_params(labelsize=6, colors='tab:olive')
        if col == len(GROUPS) - 1:
            twin.set_ylabel('learning rate', fontsize=7, color='tab:olive')
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    files['plot_iter'] = save_figure(fig, os.path.join(stats_cfg.out, 'detector_stats_vs_iter.png'))
    return files

