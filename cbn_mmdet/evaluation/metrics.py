"""Reading what mmengine writes into a work_dir: training losses, validation and test metrics.

mmengine 0.10 writes, per run (``<work_dir>/<timestamp>/``):

* training: ``vis_data/scalars.json`` (and the same lines in ``vis_data/<timestamp>.json``), one JSON
  object per line: train entries (``loss``, ``lr``, ..., ``iter``, ``step``) and, after each validation,
  the metrics (``coco/bbox_mAP``, ..., ``step`` = epoch);
* testing (``tools/test.py``): ``<timestamp>.json``, a single JSON object with the test metrics.

The numbers of a work_dir are its latest test metrics, or else the metrics of its last validation.
"""
import json
import os
import os.path as osp
import re

__all__ = ['METRICS', 'read_scalars', 'read_train_losses', 'read_test_metrics', 'read_val_metrics',
           'collect_metrics']

# (column, mmdet metric key); mmdet reports them in [0, 1], the paper in percent.
METRICS = [('AP^b', 'coco/bbox_mAP'), ('AP^b_50', 'coco/bbox_mAP_50'), ('AP^b_75', 'coco/bbox_mAP_75'),
           ('AP^m', 'coco/segm_mAP'), ('AP^m_50', 'coco/segm_mAP_50'), ('AP^m_75', 'coco/segm_mAP_75')]

_TIMESTAMP = re.compile(r'^\d{8}_\d{6}$')


# ------------------------------------------------------------------------------------ reading
def _run_dirs(work_dir):
    """The ``<timestamp>`` directories of a work_dir, oldest first."""
    if not osp.isdir(work_dir):
        return []
    return sorted(d for d in os.listdir(work_dir) if _TIMESTAMP.match(d) and osp.isdir(osp.join(work_dir, d)))


def _read_json_lines(path):
    entries = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue    # a line being written right now
    return entries


def read_scalars(work_dir):
    """All scalar entries of every training run in ``work_dir`` (resumed runs appended in order)."""
    entries = []
    for run in _run_dirs(work_dir):
        path = osp.join(work_dir, run, 'vis_data', 'scalars.json')
        if osp.isfile(path):
            entries += _read_json_lines(path)
    return entries


def read_train_losses(work_dir):
    """``{iteration: entry}`` of the training log entries (later runs win, e.g. after a resume)."""
    losses = {}
    for entry in read_scalars(work_dir):
        if 'loss' in entry and 'iter' in entry:
            losses[int(entry['iter'])] = entry
    return dict(sorted(losses.items()))


def _has_metrics(entry):
    return isinstance(entry, dict) and any(key in entry for _, key in METRICS)


def read_val_metrics(work_dir):
    """The metrics of the last validation logged during training, or None."""
    found = [e for e in read_scalars(work_dir) if _has_metrics(e)]
    return found[-1] if found else None


def read_test_metrics(work_dir):
    """The metrics of the latest ``tools/test.py`` run in ``work_dir`` (``<ts>/<ts>.json``), or None."""
    for run in reversed(_run_dirs(work_dir)):
        path = osp.join(work_dir, run, f'{run}.json')
        if not osp.isfile(path):
            continue
        with open(path) as f:
            try:
                entry = json.load(f)
            except ValueError:
                continue
        if _has_metrics(entry):
            return entry
    return None


def collect_metrics(work_dir):
    """``(metrics dict, source)`` for a work_dir: its latest test metrics, else its last validation."""
    test = read_test_metrics(work_dir)
    if test is not None:
        return test, 'test'
    val = read_val_metrics(work_dir)
    if val is not None:
        return val, 'val'
    return None, None
