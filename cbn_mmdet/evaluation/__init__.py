"""Results: reading the metrics and losses mmengine writes into a work_dir, and the paper's results table."""
from .metrics import METRICS, collect_metrics, read_scalars, read_test_metrics, read_train_losses, read_val_metrics
from .results_table import PAPER_ROWS, identify_run, results_table

__all__ = ['METRICS', 'PAPER_ROWS', 'read_scalars', 'read_train_losses', 'read_test_metrics', 'read_val_metrics',
           'collect_metrics', 'identify_run', 'results_table']
