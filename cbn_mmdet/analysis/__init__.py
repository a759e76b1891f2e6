"""Fidelity studies of the norm layers (torch + numpy; matplotlib for the plots).

* ``stat_estimators`` — what one iteration leaves in a CBN window, its Taylor step, pooled exact
  statistics and the error metrics;
* ``cbn_probe``       — the statistics the real ``CrossIterationBatchNorm2d`` normalises with for a
  given window history (naive, CBN, CBN without the ν-compensation);
* ``stats_error``     — the statistics-error study of ``tools/analysis/stats_error.py``;
* ``small_batch``     — the small-batch classification benchmark of ``tools/analysis/small_batch_bench.py``;
* ``nets`` / ``data`` — the small conv net and the 8x8 digits (or synthetic) data both use.

See ``docs/fidelity.md`` for what was measured and what it shows.
"""
from .cbn_probe import cbn_window_statistics, read_back_statistics
from .data import DATASETS, load_dataset, synthetic_digits
from .nets import NORMS, SmallConvNet, make_conv_norm
from .stat_estimators import (
    ESTIMATORS,
    WindowEntry,
    batch_moments,
    compensate,
    exact_entry,
    mean_error,
    pooled_moments,
    record_entry,
    var_error,
)

__all__ = ['DATASETS', 'load_dataset', 'synthetic_digits', 'NORMS', 'SmallConvNet', 'make_conv_norm',
           'ESTIMATORS', 'WindowEntry', 'batch_moments', 'compensate', 'exact_entry', 'mean_error',
           'pooled_moments', 'record_entry', 'var_error', 'cbn_window_statistics', 'read_back_statistics']
