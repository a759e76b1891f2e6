"""Shared by the tests that build or run detectors: a tiny synthetic dataset, a tiny CBN demo config
over it, and a loader for the scripts in ``tools/`` (which are files, not modules of a package)."""
import importlib.util
import os.path as osp
import textwrap

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
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


def load_tool(relative_path):
    """The module of ``tools/<relative_path>`` (e.g. ``'train.py'``), imported without running ``main``."""
    path = osp.join(ROOT, 'tools', relative_path)
    name = '_tool_' + relative_path.replace('/', '_').replace('.py', '')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
