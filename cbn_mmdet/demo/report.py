"""The demo's report: AP with bootstrap intervals, mean ± std over seeds, which differences exceed their
noise, PreciseBN and the train/eval-mode loss gap; the Markdown table and the loss curves.

The noise rule, stated in every report: variant A differs from reference B (baseline, BN) when

1. the 95 % **paired bootstrap** interval of ``AP(A) - AP(B)`` excludes 0 (the same resamples of the
   validation images for both, so the images' own difficulty cancels), the APs being the means over
   the seeds; and, with two seeds or more,
2. ``|AP(A) - AP(B)| > 2 SE`` with ``SE = sqrt(s_A² / N + s_B² / N)`` (``s``: the standard deviation of the
   AP over the ``N`` seeds): the difference also exceeds the training noise. With one seed the training
   noise is not measured, and the report says so.
"""
import math

import numpy as np

from ..evaluation.metrics import read_train_losses
from .variants import BN_TYPE, REFERENCES, UNTRAINED, VARIANTS

__all__ = ['ap', 'fmt_ap', 'seed_stats', 'exceeds_noise', 'summarize', 'summarize_matches', 'results_markdown',
           'plot_losses', 'NOISE_RULE']

KINDS = ('original', 'precise')
IOU_TYPES = ('bbox', 'segm')
COLUMN = {'bbox': 'AP^b', 'segm': 'AP^m'}
NOISE_RULE = ('A difference counts as larger than its noise when its 95 % paired-bootstrap interval excludes 0 '
              '(the same resamples of the validation images for both variants, APs averaged over the seeds) '
              'and, with 2 seeds or more, |difference| > 2 SE, SE = sqrt(s_A²/N + s_B²/N) from the standard '
              'deviations s over the N seeds.')


def ap(metrics, key='coco/bbox_mAP'):
    value = (metrics or {}).get(key)
    return None if value is None or value < 0 else float(value)


def fmt_ap(value):
    return '–' if value is None else f'{100 * value:.1f}'


def seed_stats(values):
    """``(mean, std)`` over seeds; std is the sample standard deviation (``ddof=1``), None for one seed."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError('seed_stats: no values')
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def exceeds_noise(low, high, diff=None, std_a=None, std_b=None, num_seeds=1):
    """The noise rule of this module: ``(exceeds, reason)``."""
    outside = low > 0 or high < 0
    if num_seeds < 2 or std_a is None or std_b is None:
        return outside, ('interval excludes 0' if outside else 'interval includes 0')
    se = math.sqrt(std_a ** 2 / num_seeds + std_b ** 2 / num_seeds)
    beyond_seeds = abs(diff) > 2 * se
    if outside and beyond_seeds:
        return True, f'interval excludes 0 and |Δ| > 2 SE = {100 * 2 * se:.1f}'
    if outside:
        return False, f'interval excludes 0 but |Δ| <= 2 SE = {100 * 2 * se:.1f} (seed noise)'
    return False, 'interval includes 0'


def summarize_matches(matches, num_samples=1000, seed=0, level=0.95, untrained_ok=True):
    """The numbers of the report from per-run :class:`~cbn_mmdet.evaluation.bootstrap.ImageMatches`.

    Args:
        matches (dict): ``{variant: [ {kind: {iou_type: ImageMatches}} per seed ]}``.

    Returns:
        dict: ``ap[variant][kind][iou]`` = ``dict(mean, std, low, high, per_seed, ap50)`` (the interval
        is that of the seed-mean AP) and ``diffs[kind][iou]`` = list of ``dict(variant, ref, diff, low,
        high, exceeds, reason)``; ``num_images``, ``num_samples``, ``num_seeds``, ``level``.
    """
    from ..evaluation.bootstrap import bootstrap_indices, percentile_interval, resampled_aps
    first = next(iter(matches.values()))[0]
    any_matches = next(iter(next(iter(first.values())).values()))
    num_images = any_matches.num_images
    samples = bootstrap_indices(num_images, num_samples, seed)
    num_seeds = min(len(runs) for runs in matches.values())
    out = dict(ap={}, diffs={k: {i: [] for i in IOU_TYPES} for k in KINDS}, num_images=num_images,
               num_samples=num_samples, num_seeds=num_seeds, level=level)
    draws, resampled_of = {}, {}     # the same ImageMatches (a model tested once) is resampled once
    for name, runs in matches.items():
        out['ap'][name] = {}
        for kind in KINDS:
            if any(kind not in run for run in runs):
                continue
            out['ap'][name][kind] = {}
            for iou in IOU_TYPES:
                group = [run[kind][iou] for run in runs]
                values = [m.ap() for m in group]
                for m in group:
                    if id(m) not in resampled_of:
                        resampled_of[id(m)] = (m, resampled_aps(m, samples))
                resampled = [resampled_of[id(m)][1] for m in group]
                mean_draws = np.mean([r['AP'] for r in resampled], axis=0)
                draws[name, kind, iou] = mean_draws
                mean, std = seed_stats([v['AP'] for v in values])
                low, high = percentile_interval(mean_draws, level)
                out['ap'][name][kind][iou] = dict(mean=mean, std=std, low=low, high=high,
                                                  per_seed=[v['AP'] for v in values],
                                                  ap50=seed_stats([v['AP50'] for v in values])[0])
    for kind in KINDS:
        for iou in IOU_TYPES:
            for ref in REFERENCES:
                if (ref, kind, iou) not in draws:
                    continue
                for name in matches:
                    if name == ref or (name, kind, iou) not in draws:
                        continue
                    if name in REFERENCES and REFERENCES.index(name) < REFERENCES.index(ref):
                        continue      # baseline vs BN is already there as BN vs baseline
                    a, b = out['ap'][name][kind][iou], out['ap'][ref][kind][iou]
                    diff = a['mean'] - b['mean']
                    low, high = percentile_interval(draws[name, kind, iou] - draws[ref, kind, iou], level)
                    exceeds, reason = exceeds_noise(low, high, diff, a['std'], b['std'], num_seeds)
                    out['diffs'][kind][iou].append(dict(variant=name, ref=ref, diff=diff, low=low, high=high,
                                                        exceeds=exceeds, reason=reason))
    return out


def summarize(results, gt_file, num_samples=1000, seed=0, level=0.95):
    """:func:`summarize_matches` from the demo's runs (their COCO result files), plus losses and times."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from ..evaluation.bootstrap import ImageMatches
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
    loaded = {}     # a detections file reported twice (a model without running statistics) is matched once

    def image_matches(path, iou):
        if (path, iou) not in loaded:
            loaded[path, iou] = ImageMatches(gt, path, iou)
        return loaded[path, iou]

    matches = {name: [{kind: {iou: image_matches(run['detections'][kind][iou], iou) for iou in IOU_TYPES}
                       for kind in run['detections']} for run in runs]
               for name, runs in results.items()}
    out = summarize_matches(matches, num_samples, seed, level)
    out['val_loss'], out['seconds'] = {}, {}
    for name, runs in results.items():
        losses = [r['val_loss'] for r in runs if r.get('val_loss')]
        if losses:
            out['val_loss'][name] = dict(train=seed_stats([v['train'] for v in losses])[0],
                                         **{f'eval_{k}': seed_stats([v['eval'][k] for v in losses])[0]
                                            for k in losses[0]['eval']},
                                         num_images=losses[0]['num_images'])
        out['seconds'][name] = dict(train=seed_stats([r['train_seconds'] for r in runs])[0],
                                    test=seed_stats([r['test_seconds'] + r.get('loss_seconds', 0) for r in runs])[0])
    return out


def _pct(value):
    return f'{100 * value:.1f}'


def _ap_cell(entry, num_seeds):
    if entry is None:
        return '–'
    text = _pct(entry['mean'])
    if num_seeds >= 2 and entry['std'] is not None:
        text += f' ± {_pct(entry["std"])}'
    return text + f' [{_pct(entry["low"])}, {_pct(entry["high"])}]'


def _diff_cell(d):
    return f'{100 * d["diff"]:+.1f} [{100 * d["low"]:+.1f}, {100 * d["high"]:+.1f}]'


def results_markdown(summary, untrained, total_seconds, setting=''):
    """The report (Markdown) from :func:`summarize`'s numbers; see the module docstring for the rule."""
    n_img, n_seeds, n_samples = summary['num_images'], summary['num_seeds'], summary['num_samples']
    level = round(100 * summary.get('level', 0.95))
    seeds_text = (f'mean ± std over {n_seeds} seeds (seeds 0–{n_seeds - 1}), then' if n_seeds >= 2 else
                  'one seed (seed 0; the training noise is not measured: run with --seeds 3),')
    lines = ['# cbn_mmdet demo: Mask R-CNN R-18-FPN on synthetic shapes', '',
             f'COCO AP in % on {n_img} validation images (pycocotools, `tools/test.py ... --eval bbox segm`): '
             f'{seeds_text} the {level} % bootstrap interval over the validation images [low, high] '
             f'({n_samples} resamples of the images, COCO AP recomputed on each; '
             '`cbn_mmdet.evaluation.bootstrap`).', '',
             'Untrained = the same model, randomly initialised, never trained: '
             f'AP^b {fmt_ap(ap(untrained["metrics"]))}, '
             f'AP^m {fmt_ap(ap(untrained["metrics"], "coco/segm_mAP"))}.', '',
             '## AP with the running statistics training left, and with PreciseBN', '',
             'PreciseBN: after training, the running mean/var of every BN-type layer (the FPN/head norm of '
             'BN, SyncBN, CBN) are replaced by the statistics of their input over training batches run in '
             'train mode, weights frozen (`PreciseBNHook`, `num_iters` batches per process). The baseline '
             'and GN have no running statistics (the backbone is GN in every variant): their PreciseBN '
             'model is the same model, tested once.',
             '',
             '| variant | norm in FPN + heads | AP^b | AP^b_50 | AP^b, PreciseBN | AP^m | AP^m_50 | AP^m, PreciseBN '
             '| train (s) |',
             '|---|---|---|---|---|---|---|---|---|']
    for name, kinds in summary['ap'].items():
        orig, precise = kinds.get('original', {}), kinds.get('precise', {})
        seconds = summary.get('seconds', {}).get(name, {})
        lines.append(f'| {name} | {VARIANTS[name][0]} | {_ap_cell(orig.get("bbox"), n_seeds)} | '
                     f'{_pct(orig["bbox"]["ap50"]) if "bbox" in orig else "–"} | '
                     f'{_ap_cell(precise.get("bbox"), n_seeds)} | {_ap_cell(orig.get("segm"), n_seeds)} | '
                     f'{_pct(orig["segm"]["ap50"]) if "segm" in orig else "–"} | '
                     f'{_ap_cell(precise.get("segm"), n_seeds)} | '
                     f'{seconds.get("train", 0):.0f} |')
    lines += ['', '## Which differences are larger than their noise', '', NOISE_RULE, '',
              '| variant | vs | ΔAP^b [95 % CI] | larger than noise? | ΔAP^m [95 % CI] | larger than noise? |',
              '|---|---|---|---|---|---|']
    verdicts = []
    for kind, title in (('original', ''), ('precise', ' (both with PreciseBN)')):
        rows = summary['diffs'][kind]
        for box, mask in zip(rows['bbox'], rows['segm']):
            lines.append(f'| {box["variant"]}{title} | {box["ref"]} | {_diff_cell(box)} | '
                         f'{"**yes**" if box["exceeds"] else "no"} ({box["reason"]}) | {_diff_cell(mask)} | '
                         f'{"**yes**" if mask["exceeds"] else "no"} ({mask["reason"]}) |')
            if kind == 'original':
                verdicts.append((box, mask))
    lines += ['', 'In words (original running statistics, box AP):', '']
    for ref in REFERENCES:
        above = [b['variant'] for b, _ in verdicts if b['ref'] == ref and b['exceeds'] and b['diff'] > 0]
        below = [b['variant'] for b, _ in verdicts if b['ref'] == ref and b['exceeds'] and b['diff'] < 0]
        within = [b['variant'] for b, _ in verdicts if b['ref'] == ref and not b['exceeds']]
        if not (above or below or within):
            continue
        parts = []
        if above:
            parts.append(f'better than {ref} beyond the noise: {", ".join(above)}')
        if below:
            parts.append(f'worse than {ref} beyond the noise: {", ".join(below)}')
        if within:
            parts.append(f'not distinguishable from {ref} at this size: {", ".join(within)}')
        lines.append('* ' + '; '.join(parts) + '.')
    # PreciseBN and the train/eval loss gap explain (or not) the BN-type variants' ranking
    lines += ['', '## Running statistics: PreciseBN and the train/eval-mode loss gap', '']
    losses = summary.get('val_loss', {})
    if losses:
        n_loss = next(iter(losses.values()))['num_images']
        lines += [f'Training loss (sum of the RPN and RoI losses) on {n_loss} validation images, one image per '
                  'process as in training: in train mode (batch statistics) and in eval mode (running '
                  'statistics, as tested), with the original and with the PreciseBN statistics.', '',
                  '| variant | ΔAP^b by PreciseBN | ΔAP^m by PreciseBN | loss, train mode | loss, eval mode '
                  '| loss, eval mode, PreciseBN |', '|---|---|---|---|---|---|']
        for name in summary['ap']:
            kinds = summary['ap'][name]
            if 'precise' not in kinds:
                continue
            d_box = kinds['precise']['bbox']['mean'] - kinds['original']['bbox']['mean']
            d_mask = kinds['precise']['segm']['mean'] - kinds['original']['segm']['mean']
            loss = losses.get(name, {})
            cells = [f'{loss[k]:.3f}' if k in loss else '–' for k in ('train', 'eval_original', 'eval_precise')]
            lines.append(f'| {name} | {100 * d_box:+.1f} | {100 * d_mask:+.1f} | ' + ' | '.join(cells) + ' |')
        bn_rows = [n for n in BN_TYPE if n in losses and 'baseline' in losses]
        if bn_rows:
            gap = {n: losses[n]['eval_original'] - losses[n]['train'] for n in ['baseline', *bn_rows]}
            lines += ['', 'Eval-mode minus train-mode loss: ' + ', '.join(f'{n} {g:+.3f}' for n, g in gap.items())
                      + ' (the baseline has no running statistics: its gap is the noise of this measurement).']
    lines += ['', f'Total demo time: {total_seconds:.0f} s.', '',
              f'Not comparable with the paper: a tiny model trained from scratch ({setting}); the demo shows '
              'that the pipeline works, that the models learn, and how large the noise of such a comparison is.']
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
            if name == UNTRAINED:
                continue
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
