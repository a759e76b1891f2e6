"""Benchmarks of the norm layers (torch only: runs on a CUDA machine without mmcv).

* ``norm_bench``   — conv + norm + ReLU training steps (time, peak memory, persistent state) at FPN and
  RoI-head shapes, BN / GN / BCN / MABN / CBN (exact and ``stat_grad_sample``) / its compute floor / the
  official algorithm (a module the caller passes in: the package ships no reference layers);
* ``op_count``     — top-level aten ops per training step (deterministic, any device);
* ``fast_mode``    — the error that ``stat_grad_sample`` adds to CBN's compensated statistics;
* ``memory``, ``report`` — measurement helpers and the generated sections of ``docs/benchmarks.md``.

The whole-detector benchmark (``tools/benchmark_model.py``) needs mmdet and lives in ``model_bench``,
which this package does not import.
"""
from .memory import cbn_extra_bound_bytes, module_state_bytes, peak_step_bytes
from .norm_bench import (
                         DEFAULT_NORMS,
                         NORMS,
                         ConvShape,
                         build_case,
                         case_op_counts,
                         default_shapes,
                         fpn_shapes,
                         memory_rows,
                         op_rows,
                         profile_case,
                         roi_shapes,
                         run_norm_benchmark,
                         run_shape,
                         small_map_shapes,
                         time_rows,
)

__all__ = ['ConvShape', 'NORMS', 'DEFAULT_NORMS', 'fpn_shapes', 'roi_shapes', 'small_map_shapes', 'default_shapes',
           'build_case', 'case_op_counts', 'run_shape', 'run_norm_benchmark', 'time_rows', 'op_rows', 'memory_rows',
           'profile_case', 'module_state_bytes', 'peak_step_bytes', 'cbn_extra_bound_bytes']
