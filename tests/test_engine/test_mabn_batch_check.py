"""MABN's ``B`` must be the images per process; the config check says so before anything is built."""
import pytest
from mmengine.config import Config

import cbn_mmdet  # noqa: F401
from cbn_mmdet.engine.config_checks import ConfigError, check_global_batch, check_mabn_batch
from tests.tiny_config import ROOT

MABN_CONFIG = f'{ROOT}/configs/mabn/mask_rcnn_r50_fpn_mabn_cenconv_scratch_2x.py'


def test_the_shipped_mabn_config_passes():
    cfg = Config.fromfile(MABN_CONFIG)
    assert cfg.train_dataloader.batch_size == 2
    check_mabn_batch(cfg)


def test_a_batch_other_than_b_is_refused_naming_the_field():
    cfg = Config.fromfile(MABN_CONFIG)
    cfg.train_dataloader.batch_size = 4
    with pytest.raises(ConfigError, match=r'model\.backbone\.norm_cfg: MABN B=2 must equal '
                                          r'train_dataloader\.batch_size=4'):
        check_mabn_batch(cfg)


def test_a_process_count_that_changes_the_per_process_batch_is_refused():
    # 16 images over 4 processes gives 4 per process: the moving averages would assume 2.
    cfg = Config.fromfile(MABN_CONFIG)
    check_global_batch(cfg, world_size=4)
    with pytest.raises(ConfigError, match='MABN B=2 must equal train_dataloader.batch_size=4'):
        check_mabn_batch(cfg)
    cfg = Config.fromfile(MABN_CONFIG)
    check_global_batch(cfg, world_size=8)      # the official 8 GPUs x 2 images
    check_mabn_batch(cfg)


def test_other_norms_are_not_concerned():
    cfg = Config(dict(model=dict(neck=dict(norm_cfg=dict(type='CBN', buffer_num=3))),
                      train_dataloader=dict(batch_size=4)))
    check_mabn_batch(cfg)
