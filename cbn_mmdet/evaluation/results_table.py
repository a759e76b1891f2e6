"""The CBN paper's results table with our numbers beside the paper's (``tools/analysis/results_table.py``).

Each work_dir is one training run: its numbers are those :func:`~cbn_mmdet.evaluation.metrics.collect_metrics`
finds (latest test, else last validation); its row (model and norm) comes from the config mmengine dumped
into it, else from its name.
"""
import glob
import os.path as osp
import re

from .metrics import METRICS, collect_metrics

__all__ = ['PAPER_ROWS', 'identify_run', 'results_table']

# Yao et al., "Cross-Iteration Batch Normalization", CVPR 2021: COCO val2017, 1x, R-50-FPN.
PAPER_ROWS = [
    ('Faster R-50-FPN', '–', (36.8, 57.9, 39.8, None, None, None)),
    ('Faster R-50-FPN', 'SyncBN', (37.5, 58.4, 40.6, None, None, None)),
    ('Faster R-50-FPN', 'GN', (37.7, 59.2, 41.2, None, None, None)),
    ('Faster R-50-FPN', 'CBN', (37.6, 58.5, 40.9, None, None, None)),
    ('Mask R-50-FPN', '–', (37.6, 58.5, 41.0, 34.0, 55.2, 36.2)),
    ('Mask R-50-FPN', 'SyncBN', (38.5, 58.9, 42.0, 34.3, 55.7, 36.7)),
    ('Mask R-50-FPN', 'GN', (38.5, 59.4, 41.8, 35.0, 56.4, 37.3)),
    ('Mask R-50-FPN', 'CBN', (38.4, 58.9, 42.2, 34.7, 55.9, 37.0)),
]

DASH = '–'


# ------------------------------------------------------------------------------------ identifying
def _norm_name(norm_type):
    """The paper's column name of a norm ``type``: every CBN type is 'CBN', every other synced BN 'SyncBN'."""
    from ..models.registry import CBN_TYPES, SYNC_NORM_TYPES
    if norm_type in CBN_TYPES:
        return 'CBN'
    if norm_type in SYNC_NORM_TYPES:
        return 'SyncBN'
    return str(norm_type)


def _dumped_config(work_dir):
    """The config mmengine dumped into the work_dir (``<work_dir>/<config name>.py``), or None."""
    candidates = sorted(glob.glob(osp.join(work_dir, '*.py')), key=osp.getmtime)
    if not candidates:
        candidates = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'config.py')))
    if not candidates:
        return None
    from mmengine.config import Config
    try:
        return Config.fromfile(candidates[-1], import_custom_modules=False)
    except Exception:   # a config from another code version; fall back to the directory name
        return None


def _from_config(cfg):
    model = cfg.get('model') or {}
    kind = {'MaskRCNN': 'Mask', 'FasterRCNN': 'Faster'}.get(str(model.get('type')).split('.')[-1])
    depth = (model.get('backbone') or {}).get('depth')
    if kind is None or depth is None:
        return None
    norm_cfg = (model.get('neck') or {}).get('norm_cfg')
    norm = DASH if not norm_cfg else _norm_name(norm_cfg.get('type'))
    conv_cfg = (model.get('neck') or {}).get('conv_cfg')
    if conv_cfg and conv_cfg.get('type') in ('WSConv', 'ConvWS'):
        norm += '+WS'
    return f'{kind} R-{depth}-FPN', norm


def _from_name(name):
    name = name.lower()
    kind = 'Mask' if 'mask' in name else 'Faster' if 'faster' in name else None
    depth = re.search(r'r(18|34|50|101|152)', name)
    if kind is None or depth is None:
        return None
    tokens = re.split(r'[_\-.]', name)
    if 'cbn' in tokens:
        norm = 'CBN'
    elif 'syncbn' in tokens:
        norm = 'SyncBN'
    elif 'bcn' in tokens:
        norm = 'BCN+WS' if 'ws' in tokens else 'BCN'
    elif 'gn' in tokens:
        norm = 'GN+WS' if 'ws' in tokens else 'GN'
    elif 'mabn' in tokens:
        norm = 'MABN'
    elif 'baseline' in tokens:
        norm = DASH
    else:
        return None
    return f'{kind} R-{depth.group(1)}-FPN', norm


def identify_run(work_dir):
    """``(model, norm)`` of a work_dir, e.g. ``('Mask R-50-FPN', 'CBN')``, from the config mmengine
    dumped there, else from the directory name; None when neither tells."""
    cfg = _dumped_config(work_dir)
    found = _from_config(cfg) if cfg is not None else None
    return found or _from_name(osp.basename(osp.normpath(work_dir)))


# ------------------------------------------------------------------------------------ table
def _fmt(value):
    return DASH if value is None else f'{value:.1f}'


def _percent(metrics, key):
    value = (metrics or {}).get(key)
    if value is None or value < 0:      # pycocotools writes -1 for "no such objects"
        return None
    return 100.0 * float(value)


def _cell(ours, paper):
    if paper is None:
        return _fmt(ours) if ours is not None else ''
    if ours is None:
        return f'{DASH} / {paper:.1f}'
    return f'{ours:.1f} / {paper:.1f} ({ours - paper:+.1f})'


def results_table(work_dirs, warn=None):
    """Markdown: the paper's 8 rows with our numbers (``ours / paper (ours − paper)``), plus runs that
    are not rows of the paper's table. ``warn(message)`` receives notes (duplicates, unreadable dirs)."""
    warn = warn or (lambda message: None)
    runs = {}
    others = []
    for work_dir in work_dirs:
        metrics, source = collect_metrics(work_dir)
        if metrics is None:
            warn(f'{work_dir}: no test or validation metrics found')
            continue
        row = identify_run(work_dir)
        entry = (work_dir, source, metrics)
        if row is None or row not in {(m, n) for m, n, _ in PAPER_ROWS}:
            others.append((row, entry))
            continue
        if row in runs:
            warn(f'{work_dir} and {runs[row][0]} are both {row[0]} / {row[1]}: using {work_dir}')
        runs[row] = entry

    header = '| model | norm | ' + ' | '.join(col for col, _ in METRICS) + ' |'
    rule = '|---|---|' + '---|' * len(METRICS)
    lines = ['Cells: ours / paper (ours − paper), COCO AP in %. Paper: Yao et al., CVPR 2021, '
             'R-50-FPN 1x on COCO val2017.', '', header, rule]
    for model, norm, paper in PAPER_ROWS:
        metrics = runs.get((model, norm), (None, None, None))[2]
        cells = [_cell(_percent(metrics, key), p) for (_, key), p in zip(METRICS, paper)]
        lines.append(f'| {model} | {norm} | ' + ' | '.join(cells) + ' |')
    if runs:
        lines += ['', 'Sources:']
        for (model, norm), (work_dir, source, _) in runs.items():
            lines.append(f'- {model} / {norm}: `{work_dir}` ({source} metrics)')
    if others:
        lines += ['', 'Other runs (not rows of the paper table):', '', '| run ' + header, '|---' + rule]
        for row, (work_dir, source, metrics) in others:
            model, norm = row if row else ('?', '?')
            cells = [_fmt(_percent(metrics, key)) for _, key in METRICS]
            lines.append(f'| `{osp.basename(osp.normpath(work_dir))}` ({source}) | {model} | {norm} | '
                         + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'
