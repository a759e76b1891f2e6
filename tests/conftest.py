"""Test-suite wide settings and fixtures.

Deterministic, single-threaded torch keeps the suite quick on 2 cores. The detector fixtures (a tiny
synthetic dataset and a tiny CBN config, see ``tests/tiny_config.py``) are shared by the engine, tool
and deploy tests.
"""
import os
import os.path as osp

import pytest
import torch

from tests.tiny_config import ROOT, TINY_DATA, write_tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope='session')
def tiny_dir(tmp_path_factory):
    """A directory holding the tiny dataset (generated once) and the tiny CBN config."""
    from cbn_mmdet.datasets import ensure_synthetic_coco
    directory = str(tmp_path_factory.mktemp('tiny'))
    ensure_synthetic_coco(osp.join(directory, 'data'), **TINY_DATA)
    return directory


@pytest.fixture(scope='session')
def tiny_cbn_config(tiny_dir):
    return write_tiny_config(tiny_dir)


@pytest.fixture
def subprocess_env():
    """Environment for tool subprocesses: one thread each (the machine is shared), repo importable."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    env['PYTHONPATH'] = ROOT + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    return env
