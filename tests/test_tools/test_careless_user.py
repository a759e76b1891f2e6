"""What a careless user hits through the tools: never data loss, one or two lines naming the field, file
or value, and no work_dir created. Each class is also written up in docs/reliability.md."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

from cbn_mmdet.engine.config_checks import ConfigError
from cbn_mmdet.engine.training import prepare_train_config
from tests.tiny_config import ROOT, load_tool, write_tiny_config

train_tool = load_tool('train.py')
test_tool = load_tool('test.py')


def _exit_message(tool, argv):
    with pytest.raises(SystemExit) as info:
        tool.main(argv)
    return str(info.value.code)


def _files(root):
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            with open(osp.join(base, name), 'rb') as f:
                out[osp.relpath(osp.join(base, name), root)] = f.read()
    return out


# ------------------------------------------------------------------ data loss
def test_demo_config_pointed_at_a_users_dataset_never_touches_it(tmp_path, subprocess_env):
    """A copy of a demo config with data_root edited to the user's own COCO set: refused, files intact."""
    users = tmp_path / 'my_coco'
    (users / 'annotations').mkdir(parents=True)
    (users / 'annotations' / 'instances_train.json').write_text(json.dumps(dict(images=[], annotations=[],
                                                                                 categories=[])))
    (users / 'train').mkdir()
    (users / 'train' / 'img1.jpg').write_bytes(b'\xff\xd8 precious')
    before = _files(users)
    text = open(osp.join(ROOT, 'configs', 'demo', 'mask_rcnn_r18_fpn_baseline_demo.py')).read()
    text = text.replace("_base_ = '../cbn/", f"_base_ = '{ROOT}/configs/cbn/")
    text = text.replace("data_root = 'data/synthetic_coco/'", f"data_root = '{users}/'")
    config = tmp_path / 'my_config.py'
    config.write_text(text)
    work_dir = tmp_path / 'wd'
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py'), str(config), '--work-dir',
                           str(work_dir)], capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tools/train.py: config error: synthetic_data.out_dir = '{users}/'")
    assert 'not created by the synthetic-data generator' in last and 'Traceback' not in proc.stderr
    assert _files(users) == before and not work_dir.exists()


def test_changing_the_synthetic_size_does_not_rebuild_a_shared_set(tiny_cbn_config, tiny_dir, tmp_path):
    data = osp.join(tiny_dir, 'data')
    before = _files(data)
    with pytest.raises(ConfigError, match=r"other parameters: num_train=8 \(asked: 4\)"):
        prepare_train_config(tiny_cbn_config, work_dir=str(tmp_path / 'wd'),
                             cfg_options={'synthetic_data.num_train': 4})
    assert _files(data) == before and not (tmp_path / 'wd').exists()


# ------------------------------------------------------------------ configs and options
def test_config_with_a_syntax_error_names_file_and_line(tmp_path):
    config = tmp_path / 'broken.py'
    config.write_text("model = dict(type='MaskRCNN',\nnorm_cfg = dict(type='BN')\n")
    message = _exit_message(train_tool, [str(config), '--work-dir', str(tmp_path / 'wd')])
    assert message == (f"tools/train.py: config error: config file '{config}': syntax error ({config}, line 1): "
                       "'(' was never closed")
    assert not (tmp_path / 'wd').exists()
    child = tmp_path / 'child.py'                   # the error in a _base_ file: that file is named
    child.write_text(f"_base_ = {str(config)!r}\n")
    message = _exit_message(train_tool, [str(child), '--work-dir', str(tmp_path / 'wd')])
    assert f"config file '{child}': syntax error ({config}, line 1)" in message


@pytest.mark.parametrize('option, expected', [
    ('max_epoch=1', r"no key 'max_epoch' .*did you mean 'train_cfg.max_epochs'"),
    ('max_epochs=1', r"'max_epochs' is a config variable, already substituted .* \(e.g. 'train_cfg.max_epochs'"),
    ('data_root=/elsewhere/', r"'data_root' is a config variable.*'train_dataloader.dataset.data_root'"),
    ('model.neck.out_chanels=32', r"model.neck \(type='FPN'\) has no argument 'out_chanels'.*did you mean "
                                  r"'model.neck.out_channels'"),
    ('train_cfg.max_epoch=1', r"train_cfg \(type='EpochBasedTrainLoop'\) has no argument 'max_epoch'"),
    ('custom_hooks.0.burnin_iter=1', r"has no argument 'burnin_iter'"),
])
def test_cfg_options_nothing_would_read_are_refused(tiny_cbn_config, tmp_path, option, expected):
    message = _exit_message(train_tool, [tiny_cbn_config, '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
                                         option])
    assert message.startswith(f'tools/train.py: config error: --cfg-options {option.split("=")[0]}=...')
    import re
    assert re.search(expected, message), message
    assert not (tmp_path / 'wd').exists()


@pytest.mark.parametrize('option', [
    'train_cfg.max_epochs=1',                    # an existing key
    'custom_note=1',                             # custom_* at the top level
    'env_cfg.cudnn_benchmark=True',              # a plain dict (no type): its reader is unknown
    'model.neck.relu_before_extra_convs=True',   # a new argument FPN does take
    "default_hooks.checkpoint.save_best=auto",   # a new argument CheckpointHook does take
    'global_batch_size=2',                       # a top-level key cbn_mmdet reads
])
def test_cfg_options_mmdet_accepts_stay_accepted(tiny_cbn_config, tmp_path, option):
    key, value = option.split('=')
    from mmengine.config import DictAction
    cfg = prepare_train_config(tiny_cbn_config, work_dir=str(tmp_path / 'wd'), log=lambda m: None,
                               cfg_options={key: DictAction._parse_iterable(value)})
    node = cfg
    for part in key.split('.'):
        node = node[int(part)] if isinstance(node, list) else node[part]
    assert str(node) == value


@pytest.mark.parametrize('item', ['max_epochs', '=1'])
def test_cfg_options_without_a_key_value_pair(tiny_cbn_config, tmp_path, capsys, item):
    with pytest.raises(SystemExit) as info:
        train_tool.parse_args([tiny_cbn_config, '--cfg-options', item])
    assert info.value.code == 2
    assert f"--cfg-options {item!r}: expected key=value" in capsys.readouterr().err


@pytest.mark.parametrize('num_groups', [0, -4, 'x'])
def test_gn_with_bad_num_groups(tmp_path, tiny_dir, num_groups):
    config = write_tiny_config(str(tmp_path), data_root=osp.join(tiny_dir, 'data') + '/',
                               extra=f"model = dict(neck=dict(norm_cfg=dict(_delete_=True, type='GN', "
                                     f"num_groups={num_groups!r})))\n")
    message = _exit_message(train_tool, [config, '--work-dir', str(tmp_path / 'wd')])
    assert 'model.neck.norm_cfg = ' in message and f'num_groups must be a positive int, got {num_groups!r}' in message
    assert not (tmp_path / 'wd').exists()


# ------------------------------------------------------------------ data files
@pytest.fixture
def tiny_copy(tiny_dir, tmp_path):
    """A private copy of the tiny dataset and a config on it (files may be corrupted)."""
    data = tmp_path / 'data'
    shutil.copytree(osp.join(tiny_dir, 'data'), data)
    return write_tiny_config(str(tmp_path), data_root=str(data) + '/'), data


@pytest.mark.parametrize('content, expected', [
    ('{"images": [', 'not valid JSON'),
    ('[1, 2]', 'top level is a list'),
    ('{"info": {}}', 'not a COCO annotation file'),
])
def test_corrupt_annotation_file_is_named(tiny_copy, tmp_path, content, expected):
    config, data = tiny_copy
    (data / 'annotations' / 'instances_train.json').write_text(content)
    message = _exit_message(train_tool, [config, '--work-dir', str(tmp_path / 'wd')])
    assert "train_dataloader.dataset.ann_file = 'annotations/instances_train.json'" in message
    assert str(data / 'annotations' / 'instances_train.json') in message and expected in message
    assert not (tmp_path / 'wd').exists()


def test_corrupt_image_is_named_in_one_line(tiny_copy, tmp_path):
    config, data = tiny_copy
    (data / 'train' / '000003.png').write_bytes(b'not a png')
    message = _exit_message(train_tool, [config, '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
                                         'experiment_name=corrupt_image'])
    assert message == (f"tools/train.py: data error: image '{data}/train/000003.png' cannot be decoded (corrupt, "
                       'truncated or not an image): replace it, or remove it from the annotation file')


# ------------------------------------------------------------------ launching
@pytest.mark.parametrize('count', ['0', '-1', 'four', ''])
def test_dist_train_process_count(count, subprocess_env):
    proc = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), 'cfg.py', count],
                          capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"tools/dist_train.sh: NUM_PROCS must be a positive integer (processes per "
                                   f"node), got '{count}'")


@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp is valid on a GPU')
def test_amp_on_a_cpu(tiny_cbn_config, tmp_path):
    message = _exit_message(train_tool, [tiny_cbn_config, '--work-dir', str(tmp_path / 'wd'), '--amp'])
    assert message == ('tools/train.py: config error: --amp: mixed-precision training (mmengine AmpOptimWrapper) '
                       'needs a CUDA GPU; this machine has none (drop --amp)')


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_launcher_pytorch_outside_torchrun(tiny_cbn_config, tmp_path, monkeypatch, tool):
    for key in ('RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(key, raising=False)
    argv = [tiny_cbn_config] + (['x.pth'] if tool == 'test' else []) + ['--work-dir', str(tmp_path / 'wd'),
                                                                       '--launcher', 'pytorch']
    message = _exit_message(train_tool if tool == 'train' else test_tool, argv)
    assert message == (f'tools/{tool}.py: config error: --launcher pytorch: this process was not started by that '
                       'launcher (RANK, WORLD_SIZE not set); run it through tools/dist_train.sh CFG N (torchrun), '
                       'or use --launcher none')


# ------------------------------------------------------------------ results table
def test_results_table_on_a_missing_dir_and_on_the_parent_folder(tmp_path, capsys):
    from tests.test_evaluation.test_results_table import fake_work_dirs
    tool = load_tool('analysis/results_table.py')
    with pytest.raises(SystemExit, match=r"WORK_DIR '.*nowhere' does not exist"):
        tool.main([str(tmp_path / 'nowhere')])
    (tmp_path / 'empty_parent').mkdir()
    with pytest.raises(SystemExit, match='no training run'):
        tool.main([str(tmp_path / 'empty_parent')])
    root = tmp_path / 'work_dirs'
    root.mkdir()
    cbn, gn, other, empty = fake_work_dirs(root)
    capsys.readouterr()
    tool.main([str(root)])                      # the README's own example: the folder of all runs
    out = capsys.readouterr().out
    assert '| Mask R-50-FPN | CBN | 38.0 / 38.4 (-0.4) |' in out
    assert f'`{gn}`' in out and 'mask_rcnn_r18_fpn_cbn_demo' in out
