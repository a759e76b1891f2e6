"""Shared fixtures for the tool tests: a tiny synthetic dataset and a tiny CBN demo config over it."""
import os
import os.path as osp
import textwrap

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TINY_DATA = dict(seed=1, num_train=8, num_val=2, image_size=64, min_size=12, max_size=28)


def write_tiny_config(directory, base='mask_rcnn_r18_fpn_cbn_demo.py', data_root=None, extra=''):
    """A config inheriting a demo config, on a tiny dataset (8 train / 2 val images of 64 px), 2 epochs
    of 4 iterations, CBN burn-in of 1 iteration, a checkpoint every epoch, no validation."""
    data_root = data_root or osp.join(directory, 'data') + '/'
    path = osp.join(directory, 'tiny_' + base)
    text = f"""
    _base_ = {osp.join(ROOT, 'configs', 'demo', base)!r}
    data_root = {data_root!r}
    synthetic_data = dict(out_dir=data_root, **{TINY_DATA!r})
    train_dataloader = dict(dataset=dict(data_root=data_root))
    val_dataloader = None
    val_cfg = None
    val_evaluator = None
    test_dataloader = dict(dataset=dict(data_root=data_root))
    test_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
    train_cfg = dict(max_epochs=2, val_interval=100)
    default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=-1), logger=dict(interval=1))
    """
    if 'cbn' in base:
        text += "custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=1)]\n"
    with open(path, 'w') as f:
        f.write(textwrap.dedent(text) + extra)
    return path


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
