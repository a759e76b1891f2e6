"""The results table (``cbn_mmdet.evaluation``) on fake work_dirs laid out as mmengine writes them."""
import json

import pytest

from cbn_mmdet.evaluation import collect_metrics, identify_run, read_train_losses, results_table

COCO = {'coco/bbox_mAP': 0.380, 'coco/bbox_mAP_50': 0.590, 'coco/bbox_mAP_75': 0.421,
        'coco/segm_mAP': 0.345, 'coco/segm_mAP_50': 0.560, 'coco/segm_mAP_75': 0.370}


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(line) + '\n' for line in lines))


def fake_work_dirs(root):
    # Mask R-CNN CBN: trained (val after each epoch) then tested; the test wins.
    cbn = root / 'mask_rcnn_r50_fpn_cbn_buffer3_burnin8_1x'
    _write(cbn / '20260101_000000' / 'vis_data' / 'scalars.json',
           [{'loss': 2.0, 'iter': 50, 'epoch': 1, 'step': 50},
            {**{k: 0.1 for k in COCO}, 'step': 1},
            {'loss': 1.0, 'iter': 100, 'epoch': 2, 'step': 100},
            {**{k: 0.2 for k in COCO}, 'step': 2}])
    _write(cbn / '20260102_000000' / '20260102_000000.json', [dict(COCO, time=0.1)])
    # Faster R-CNN GN: validation only; its name says nothing, the dumped config tells.
    gn = root / 'run_42'
    _write(gn / '20260101_000000' / 'vis_data' / 'scalars.json',
           [{'loss': 1.5, 'iter': 10, 'epoch': 1, 'step': 10},
            {'coco/bbox_mAP': 0.371, 'coco/bbox_mAP_50': 0.6, 'coco/bbox_mAP_75': 0.4, 'coco/bbox_mAP_l': -1.0,
             'step': 12}])
    (gn / 'faster_rcnn_r50_fpn_gn_1x.py').write_text(
        "model = dict(type='FasterRCNN', backbone=dict(type='ResNet', depth=50),\n"
        "             neck=dict(type='FPN', norm_cfg=dict(type='GN', num_groups=32)))\n")
    # A run that is not a row of the paper's table, and an empty one.
    other = root / 'mask_rcnn_r18_fpn_cbn_demo'
    _write(other / '20260101_000000' / '20260101_000000.json', [COCO])
    (root / 'empty').mkdir()
    return [cbn, gn, other, root / 'empty']


def test_reading_and_identifying(tmp_path):
    cbn, gn, other, empty = fake_work_dirs(tmp_path)
    metrics, source = collect_metrics(str(cbn))
    assert source == 'test' and metrics['coco/bbox_mAP'] == 0.380
    metrics, source = collect_metrics(str(gn))
    assert source == 'val' and metrics['step'] == 12
    assert collect_metrics(str(empty)) == (None, None)
    assert identify_run(str(cbn)) == ('Mask R-50-FPN', 'CBN')
    assert identify_run(str(gn)) == ('Faster R-50-FPN', 'GN')
    assert identify_run(str(other)) == ('Mask R-18-FPN', 'CBN')
    assert list(read_train_losses(str(cbn))) == [50, 100]


def test_table(tmp_path):
    dirs = fake_work_dirs(tmp_path)
    notes = []
    table = results_table([str(d) for d in dirs], warn=notes.append)
    rows = {tuple(c.strip() for c in line.split('|')[1:3]): [c.strip() for c in line.split('|')[3:-1]]
            for line in table.splitlines() if line.startswith('| ') and 'model' not in line}
    assert rows[('Mask R-50-FPN', 'CBN')] == ['38.0 / 38.4 (-0.4)', '59.0 / 58.9 (+0.1)', '42.1 / 42.2 (-0.1)',
                                              '34.5 / 34.7 (-0.2)', '56.0 / 55.9 (+0.1)', '37.0 / 37.0 (+0.0)']
    assert rows[('Faster R-50-FPN', 'GN')][:3] == ['37.1 / 37.7 (-0.6)', '60.0 / 59.2 (+0.8)',
                                                   '40.0 / 41.2 (-1.2)']
    assert rows[('Faster R-50-FPN', 'GN')][3:] == ['', '', '']          # the paper has no mask AP there
    assert rows[('Mask R-50-FPN', 'SyncBN')] == ['– / 38.5', '– / 58.9', '– / 42.0', '– / 34.3', '– / 55.7',
                                                 '– / 36.7']
    assert rows[('Faster R-50-FPN', '–')][0] == '– / 36.8'
    other = [line for line in table.splitlines() if line.startswith('| `mask_rcnn_r18_fpn_cbn_demo` (test) |')]
    assert other == ['| `mask_rcnn_r18_fpn_cbn_demo` (test) | Mask R-18-FPN | CBN | 38.0 | 59.0 | 42.1 | 34.5 | 56.0 '
                     '| 37.0 |']
    assert sum(1 for line in table.splitlines() if 'R-50-FPN |' in line) == 8
    assert any('empty' in n and 'no test or validation metrics' in n for n in notes)


@pytest.mark.parametrize('norm_type,conv_type,expected', [
    ('CBN', None, 'CBN'), ('SyncCBN', None, 'CBN'), ('SyncBN', None, 'SyncBN'), ('TorchSyncBN', None, 'SyncBN'),
    ('MMSyncBN', None, 'SyncBN'), ('GN', 'WSConv', 'GN+WS'), ('BCN', 'WSConv', 'BCN+WS'), ('MABN', None, 'MABN')])
def test_row_from_the_dumped_config(tmp_path, norm_type, conv_type, expected):
    """A run's row comes from the config mmengine dumped into its work_dir, whatever the directory name."""
    conv = f", conv_cfg=dict(type='{conv_type}')" if conv_type else ''
    work_dir = tmp_path / 'some_run'
    work_dir.mkdir()
    (work_dir / 'dumped.py').write_text(
        f"model = dict(type='MaskRCNN', backbone=dict(depth=50), neck=dict(norm_cfg=dict(type='{norm_type}'){conv}))\n")
    assert identify_run(str(work_dir)) == ('Mask R-50-FPN', expected)
