"""Fidelity studies of the norm layers (torch + numpy; matplotlib for the plots).

* ``stat_estimators`` — window estimators of a conv output's statistics (BN, naive, CBN) and the error
  metrics, reproducing ``CrossIterationBatchNorm2d``'s aggregation with torch ops;
* ``stats_error``     — the statistics-error study of ``tools/analysis/stats_error.py``;
* ``small_batch``     — the small-batch classification benchmark of ``tools/analysis/small_batch_bench.py``;
* ``nets`` / ``data`` — the small conv net and the 8x8 digits (or synthetic) data both use.

See ``docs/fidelity.md`` for what was measured and what it shows.
"""
from .data import DATASETS, load_dataset, synthetic_digits
from .nets import NORMS, SmallConvNet, make_conv_norm
from .stat_estimators import (ESTIMATORS, WindowEntry, batch_moments, compensate, exact_entry, mean_error,
                              record_entry, var_error, window_estimate)

__all__ = ['DATASETS', 'load_dataset', 'synthetic_digits', 'NORMS', 'SmallConvNet', 'make_conv_norm',
           'ESTIMATORS', 'WindowEntry', 'batch_moments', 'compensate', 'exact_entry', 'mean_error',
           'record_entry', 'var_error', 'window_estimate']
