"""tools/train.py and tools/test.py refuse bad configs with one clear error, before any work_dir exists."""
import os.path as osp
import subprocess
import sys

import pytest

from cbn_mmdet.engine.config_checks import ConfigError, registered_conv_types, registered_norm_types
from cbn_mmdet.engine.testing import COCO_METRICS
from cbn_mmdet.engine.training import prepare_train_config
from tests.tiny_config import ROOT, load_tool

train_tool = load_tool('train.py')
test_tool = load_tool('test.py')
run_test_tool = test_tool.main


def _train_error(argv):
    with pytest.raises(SystemExit) as info:
        train_tool.main(argv)
    return str(info.value.code)


def test_missing_dataset_path_names_the_field(tiny_cbn_config, tmp_path):
    work_dir = tmp_path / 'wd'
    message = _train_error([tiny_cbn_config, '--work-dir', str(work_dir), '--cfg-options', 'synthetic_data=None',
                            'train_dataloader.dataset.ann_file=annotations/nope.json'])
    assert 'config error' in message
    assert "train_dataloader.dataset.ann_file = 'annotations/nope.json'" in message
    assert 'do not exist' in message
    assert not work_dir.exists()


def test_missing_data_root_and_test_paths(tiny_cbn_config, tmp_path):
    work_dir = tmp_path / 'wd'
    with pytest.raises(SystemExit) as info:
        run_test_tool([tiny_cbn_config, str(tmp_path / 'x.pth'), '--work-dir', str(work_dir), '--cfg-options',
                   'test_dataloader.dataset.data_root=/no/such/root/', 'test_evaluator.ann_file=/no/such.json'])
    message = str(info.value.code)
    assert "test_dataloader.dataset.data_root = '/no/such/root/'" in message
    assert "test_evaluator.ann_file = '/no/such.json'" in message
    assert not work_dir.exists()


def test_unknown_norm_type_lists_the_registered_ones(tiny_cbn_config, tmp_path):
    work_dir = tmp_path / 'wd'
    message = _train_error([tiny_cbn_config, '--work-dir', str(work_dir),
                            '--cfg-options', 'model.roi_head.mask_head.norm_cfg.type=CBNN'])
    assert ("model.roi_head.mask_head.norm_cfg.type = 'CBNN' is not a registered norm layer "
            "(did you mean 'CBN'?)") in message
    for name in ('CBN', 'SyncCBN', 'SyncBN', 'BCN', 'MABN', 'GN', 'BN'):
        assert name in registered_norm_types()
    assert 'CBN, ' in message and 'MABN' in message and 'GN' in message
    assert not work_dir.exists()


def test_unknown_conv_type(tiny_cbn_config, tmp_path):
    work_dir = tmp_path / 'wd'
    message = _train_error([tiny_cbn_config, '--work-dir', str(work_dir),
                            '--cfg-options', 'model.neck.conv_cfg.type=WSConvv'])
    assert "model.neck.conv_cfg.type = 'WSConvv' is not a registered conv layer" in message
    assert {'WSConv', 'CenConv', 'ConvWS', 'Conv2d'} <= set(registered_conv_types())
    assert 'WSConv' in message
    assert not work_dir.exists()


def test_process_count_must_divide_the_global_batch(tiny_cbn_config, tmp_path, monkeypatch):
    work_dir = tmp_path / 'wd'
    monkeypatch.setenv('WORLD_SIZE', '3')
    monkeypatch.setenv('RANK', '0')
    message = _train_error([tiny_cbn_config, '--work-dir', str(work_dir), '--launcher', 'pytorch',
                            '--cfg-options', 'global_batch_size=16'])
    assert 'global_batch_size = 16 cannot be split over 3 processes' in message
    assert '1, 2, 4, 8, 16' in message
    assert not work_dir.exists()


def test_global_batch_sets_the_per_process_batch(tiny_cbn_config, tmp_path, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('RANK', '0')               # what torchrun sets
    args = train_tool.parse_args([tiny_cbn_config, '--work-dir', str(tmp_path / 'wd'), '--launcher',
                                  'pytorch', '--cfg-options', 'global_batch_size=16'])
    options = dict(work_dir=args.work_dir, launcher=args.launcher, cfg_options=args.cfg_options, log=lambda m: None)
    cfg = prepare_train_config(args.config, **options)
    assert cfg.train_dataloader.batch_size == 4
    monkeypatch.setenv('WORLD_SIZE', '1')        # one process: the config's batch stays
    cfg = prepare_train_config(args.config, **options)
    assert cfg.train_dataloader.batch_size == 2
    assert not (tmp_path / 'wd').exists()


def test_missing_resume_checkpoint(tiny_cbn_config, tmp_path):
    work_dir = tmp_path / 'wd'
    message = _train_error([tiny_cbn_config, '--work-dir', str(work_dir), '--resume', str(tmp_path / 'no.pth')])
    assert 'no such checkpoint' in message
    assert not work_dir.exists()


def test_validation_errors_are_config_errors():
    assert issubclass(ConfigError, ValueError)


def test_cli_exit_code_and_message(tiny_cbn_config, tmp_path, subprocess_env):
    work_dir = tmp_path / 'wd'
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py'), tiny_cbn_config,
                           '--work-dir', str(work_dir), '--cfg-options', 'model.neck.norm_cfg.type=Nope'],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "tools/train.py: config error: model.neck.norm_cfg.type = 'Nope'" in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not work_dir.exists()


def test_bad_metric_is_one_clear_error_before_anything(tmp_path):
    work_dir = tmp_path / 'wd'
    # neither the checkpoint nor the config is looked at: the metric is refused first
    with pytest.raises(SystemExit) as info:
        run_test_tool([str(tmp_path / 'no_config.py'), str(tmp_path / 'no.pth'), '--work-dir', str(work_dir),
                       '--eval', 'bbox', 'mAP'])
    message = str(info.value.code)
    assert "unsupported metric(s) ['mAP']" in message
    assert 'supported (CocoMetric): ' + ', '.join(COCO_METRICS) in message
    assert not work_dir.exists()
