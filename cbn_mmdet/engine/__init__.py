"""The training side of cbn_mmdet (mmengine).

* ``hooks``         — one hook per file (registered by ``cbn_mmdet.models.registry``);
* ``config_checks`` — the checks a config passes before anything is built (:class:`ConfigError`);
* ``runner_setup``  — config loading, synthetic data, Runner building (shared by train and test);
* ``training`` / ``testing`` — the logic behind ``tools/train.py`` and ``tools/test.py``;
* ``checkpoint``    — trusted loading of our own checkpoints under torch>=2.6;
* ``dist``          — gloo setup for multi-process runs on CPU.

Only the hooks are imported here (the registry needs them); import the other modules directly.
"""
from .hooks import CBNBurnInHook, NonFiniteLossHook, NormHealthHook, RNGStateHook

__all__ = ['CBNBurnInHook', 'NonFiniteLossHook', 'NormHealthHook', 'RNGStateHook']
