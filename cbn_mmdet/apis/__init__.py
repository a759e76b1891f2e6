"""The logic behind ``tools/`` (the tools only parse ``sys.argv`` and call ``main``).

* ``train`` / ``test`` — mmdet 3.x's train/test tools plus config validation before anything is
  written, mmdet 2.x's ``--eval``, trusted loading of our own checkpoints under torch>=2.6, and
  multi-process runs on CPU (gloo);
* ``validate`` — the config checks (:class:`ConfigError`);
* ``checkpoint`` — ``trusted_checkpoints`` for mmengine 0.10 + torch>=2.6;
* ``dist`` — gloo setup for CPU-only multi-process runs;
* ``metrics`` — reading the metrics/losses mmengine writes and the paper's results table;
* ``demo`` — the end-to-end demo behind ``tools/demo.py``.

Needs mmengine, mmcv and mmdet (unlike ``cbn_mmdet.ops``).
"""
from .checkpoint import load_trusted_checkpoint, trusted_checkpoints
from .validate import ConfigError, validate_config

__all__ = ['ConfigError', 'validate_config', 'trusted_checkpoints', 'load_trusted_checkpoint']
