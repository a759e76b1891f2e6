"""The helpers both accuracy-vs-batch-size studies share: the tables' exact text and column order (what the
CSVs and Markdown files of small_batch and fmnist_study show), the sampler and the lr schedule."""
from types import SimpleNamespace

import pytest
import torch

from cbn_mmdet.analysis import fmnist_study, small_batch
from cbn_mmdet.analysis import study_tables as tables


def _runs():
    """Two seeds of bn at b=1 and b=4, one of them diverged at b=4."""
    runs = []
    for b, accs in ((1, (0.5, 0.7)), (4, (0.9, 0.8))):
        for seed, acc in enumerate(accs):
            runs.append(dict(norm='bn', batch_size=b, seed=seed, test_acc=acc, train_acc=acc, final_loss=0.25 * b,
                             ms_per_iter=2.0, step_move=1e-3, weight_growth=1.0, cos_w_grad=0.0,
                             train_seconds=1.5, diverged=b == 4 and seed == 1))
    return runs


def test_aggregate_columns_and_values():
    rows = fmnist_study.aggregate(_runs(), fmnist_study.FMNISTConfig(norms=('bn',), batch_sizes=(1, 4)))
    assert list(rows[0]) == ['norm', 'batch_size', 'acc_mean', 'acc_std', 'acc_min', 'num_seeds', 'train_acc',
                             'final_loss', 'ms_per_iter', 'seconds', 'diverged']
    assert rows[0]['acc_mean'] == pytest.approx(60.0) and rows[0]['acc_min'] == pytest.approx(50.0)
    assert rows[0]['seconds'] == 3.0 and rows[1]['diverged'] == 1
    digits = small_batch._aggregate(_runs(), small_batch.BenchConfig(norms=('bn',), batch_sizes=(1, 4)))
    assert list(digits[0])[6:] == ['train_acc', 'ms_per_iter', 'step_move', 'final_loss', 'weight_growth',
                                   'cos_w_grad', 'diverged']


def test_markdown_tables_text():
    cfg = small_batch.BenchConfig(norms=('bn',), batch_sizes=(1, 4), seeds=(0, 1))
    rows = small_batch._aggregate(_runs(), cfg)
    assert small_batch.markdown_table(rows, cfg) == ('| norm | b=1 | b=4 |\n|---|---|---|\n'
                                                     '| BN | 60.0 ± 14.1 | 85.0 ± 7.1 (1 diverged) |\n')
    assert small_batch.markdown_table(rows, cfg, 'step_move').endswith('| BN | 1.0e-03 | 1.0e-03 |\n')
    assert small_batch.markdown_table(rows, cfg, 'final_loss').endswith('| BN | 0.250 | 1.000 |\n')
    fcfg = fmnist_study.FMNISTConfig(norms=('bn',), batch_sizes=(1, 4))
    assert fmnist_study.markdown_table(fmnist_study.aggregate(_runs(), fcfg), fcfg, 'ms_per_iter').endswith(
        '| BN | 2.0 | 2.0 |\n')


def test_batches_drop_the_remainder_and_repeat():
    a = tables.batches(10, 4, torch.Generator().manual_seed(0))
    b = tables.batches(10, 4, torch.Generator().manual_seed(0))
    first = [next(a) for _ in range(4)]
    assert all(len(idx) == 4 for idx in first)
    assert len(set(torch.cat(first[:2]).tolist())) == 8          # one permutation: no repeats within it
    assert all(torch.equal(x, next(b)) for x in first)            # the same generator seed, the same batches


def test_lr_schedule_warmup_then_cosine():
    cfg = SimpleNamespace(warmup_fraction=0.1)
    assert tables.lr_at(cfg, 1.0, 0, 100) == pytest.approx(0.1)
    assert tables.lr_at(cfg, 1.0, 10, 100) == pytest.approx(1.0)
    assert tables.lr_at(cfg, 1.0, 100, 100) == pytest.approx(0.0, abs=1e-12)
