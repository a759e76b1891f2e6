"""The demo's report: the Markdown results table and the loss curves."""
from ..evaluation.metrics import METRICS, read_train_losses
from .variants import UNTRAINED, VARIANTS

__all__ = ['ap', 'fmt_ap', 'results_markdown', 'plot_losses']


def ap(metrics, key='coco/bbox_mAP'):
    value = (metrics or {}).get(key)
    return None if value is None or value < 0 else float(value)


def fmt_ap(value):
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
        cells = [fmt_ap(ap(res['metrics'], key)) for _, key in METRICS]
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
