"""The demo's report pieces: the loss plot (from mmengine's scalars.json) and its Markdown table."""
from cbn_mmdet.demo import plot_losses, results_markdown
from tests.test_evaluation.test_results_table import COCO, fake_work_dirs


def test_demo_report_pieces(tmp_path):
    """The demo's loss plot (from mmengine's scalars.json) and its Markdown table."""
    cbn = fake_work_dirs(tmp_path)[0]
    png = plot_losses({'cbn': str(cbn)}, str(tmp_path / 'losses.png'))
    assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    untrained = dict(metrics={k: 0.0 for k in COCO}, test_seconds=5)
    table = results_markdown({'cbn': dict(metrics=COCO, train_seconds=100, test_seconds=9),
                              'gn': dict(skipped='time budget')}, untrained, 321, 'tiny')
    assert '| untrained | – | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0 | 5 |' in table
    assert '| cbn | CBN | 38.0 | 59.0 | 42.1 | 34.5 | 56.0 | 37.0 | 100 | 9 |' in table
    assert '| gn | GN | – |' in table and 'Skipped: gn (time budget)' in table and '321 s' in table
