"""The --quick runs of tools/analysis/*.py write the expected files (synthetic data: no scikit-learn)."""
import csv
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', ROOT / 'tools' / 'analysis' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_stats_error_quick(tmp_path):
    result = _tool('stats_error').main(['--quick', '--dataset', 'synthetic', '--out', str(tmp_path)])
    for name in ('stats_error_raw.csv', 'stats_error_summary.csv', 'stats_error_drift.csv', 'stats_error_runs.csv',
                 'stats_error_summary.md', 'stats_error_vs_window.png', 'stats_error_vs_batch.png',
                 'stats_error_vs_lr.png', 'stats_error_drift.png', 'stats_error_config.txt'):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / 'stats_error_raw.csv') as f:
        rows = list(csv.DictReader(f))
    assert {'sweep', 'batch_size', 'lr', 'seed', 'iter', 'layer', 'window', 'estimator', 'mean_err',
            'var_err', 'weight_drift'} <= set(rows[0])
    assert {r['estimator'] for r in rows} == {'bn', 'naive', 'cbn', 'cbn_mean_only', 'own_layer', 'recompute'}
    assert {int(r['batch_size']) for r in rows} == {1, 2, 4}      # quick: batches 1, 4 and the lr sweep at 2
    # A window of one is BN for every estimator.
    for key in {(r['batch_size'], r['lr'], r['seed'], r['iter'], r['layer']) for r in rows}:
        ones = [r for r in rows if (r['batch_size'], r['lr'], r['seed'], r['iter'], r['layer']) == key
                and r['window'] == '1']
        assert len({(r['mean_err'], r['var_err']) for r in ones}) == 1
    # Layer 0 sees the images: the compensated mean of a stale entry is exact.
    with open(tmp_path / 'stats_error_drift.csv') as f:
        drift = [r for r in csv.DictReader(f) if r['layer'] == '0' and r['estimator'] == 'cbn']
    assert drift and max(float(r['mean_err']) for r in drift) < 1e-10
    assert result['files']['markdown'].endswith('stats_error_summary.md')


def test_small_batch_bench_quick(tmp_path):
    result = _tool('small_batch_bench').main(['--quick', '--dataset', 'synthetic', '--out', str(tmp_path),
                                              '--norms', 'bn,gn,cbn,naive'])
    for name in ('small_batch_runs.csv', 'small_batch_summary.csv', 'small_batch_table.md', 'small_batch_acc.png'):
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / 'small_batch_table.md').read_text()
    for label in ('| BN |', '| GN |', '| CBN |', '| naive CBN (rho=0) |', 'b=2', 'b=8'):
        assert label in table
    runs = result['results']
    assert len(runs) == 4 * 2
    assert all(0.0 <= r['test_acc'] <= 1.0 and r['iters'] > 0 for r in runs)
    assert all(r['cbn_fallbacks'] == 0 for r in runs if r['norm'] in ('cbn', 'naive'))


def test_bench_rejects_unknown_norm():
    with pytest.raises(SystemExit):
        _tool('small_batch_bench').parse_args(['--norms', 'bn,layernorm'])
