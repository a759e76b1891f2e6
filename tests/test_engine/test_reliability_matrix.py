"""The bad-configuration matrix of docs/reliability.md: one row, one test, one clear error each.

Every error must name the config field (or option) and the offending value, and be raised at config
time, before a model, a dataset or a work_dir exists.
"""
import copy
import os.path as osp

import pytest
from mmengine.config import Config

import cbn_mmdet  # noqa: F401
from cbn_mmdet.engine.config_checks import ConfigError, check_global_batch, validate_config, validate_norm_config
from cbn_mmdet.engine.testing import check_eval_metrics
from tests.tiny_config import ROOT

CBN_CFG = osp.join(ROOT, 'configs/cbn/mask_rcnn_r50_fpn_cbn_buffer3_burnin8_1x.py')


@pytest.fixture(scope='module')
def base_cfg():
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return Config.fromfile(CBN_CFG)


def _edit(cfg, path, value):
    cfg = copy.deepcopy(cfg)
    node = cfg
    keys = path.split('.')
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return cfg


NORM_ROWS = [  # id, config path, new value, expected message (regex)
    ('misspelt-keyword', 'model.neck.norm_cfg', dict(type='CBN', buffer_nmu=3),
     r"model.neck.norm_cfg: CBN has no argument 'buffer_nmu' \(did you mean 'buffer_num'\?\)"),
    ('negative-buffer', 'model.neck.norm_cfg', dict(type='CBN', buffer_num=-1),
     r'model.neck.norm_cfg = .*buffer_num must be >= 0, got -1'),
    ('negative-burnin', 'model.roi_head.bbox_head.norm_cfg', dict(type='CBN', buffer_num=3, burnin=-8),
     r'model.roi_head.bbox_head.norm_cfg = .*burnin must be >= 0, got -8'),
    ('rho-not-finite', 'model.neck.norm_cfg', dict(type='CBN', buffer_num=3, rho=float('nan')),
     r'rho must be finite, got nan'),
    ('momentum-out-of-range', 'model.neck.norm_cfg', dict(type='CBN', buffer_num=3, momentum=1.5),
     r'momentum must be in \[0, 1\], got 1.5'),
    ('gn-groups-not-dividing', 'model.neck.norm_cfg', dict(type='GN', num_groups=30),
     r'model.neck.norm_cfg = .*num_groups=30 must divide the 256 channels'),
    ('bcn-groups-not-dividing', 'model.roi_head.mask_head.norm_cfg', dict(type='BCN', num_groups=24),
     r'model.roi_head.mask_head.norm_cfg = .*num_groups=24 must divide num_features=256'),
    ('mabn-real-b-not-multiple', 'model.neck.norm_cfg', dict(type='MABN', B=2, real_B=5),
     r'model.neck.norm_cfg = .*B=2 must divide real_B=5'),
    ('mabn-non-positive-b', 'model.neck.norm_cfg', dict(type='MABN', B=0, real_B=4),
     r'model.neck.norm_cfg = .*B must be a positive int, got 0'),
]


@pytest.mark.parametrize('row', NORM_ROWS, ids=[r[0] for r in NORM_ROWS])
def test_norm_argument_rows(base_cfg, row):
    _, path, value, message = row
    with pytest.raises(ConfigError, match=message):
        validate_norm_config(_edit(base_cfg, path, value), 'train', cuda_available=False)


def test_unknown_norm_type(base_cfg):
    cfg = _edit(base_cfg, 'model.neck.norm_cfg', dict(type='CBNN', buffer_num=3))
    with pytest.raises(ConfigError, match=r"model.neck.norm_cfg.type = 'CBNN' is not a registered norm "
                                          r"layer \(did you mean 'CBN'\?\)"):
        validate_config(cfg, 'train')


def test_unknown_conv_type(base_cfg):
    cfg = _edit(base_cfg, 'model.neck.conv_cfg', dict(type='WSConvv'))
    with pytest.raises(ConfigError, match=r"model.neck.conv_cfg.type = 'WSConvv' is not a registered conv"):
        validate_config(cfg, 'train')


def test_cbn_not_preceded_by_a_conv(base_cfg):
    cfg = _edit(base_cfg, 'model.roi_head.mask_head.order', ('norm', 'conv', 'act'))
    cfg.model.roi_head.mask_head.type = 'FCNMaskHead'
    with pytest.raises(ConfigError, match=r"model.roi_head.mask_head.norm_cfg: type='CBN' needs a conv "
                                          r"before it, but the module order is \('norm', 'conv', 'act'\)"):
        validate_norm_config(cfg, 'train', cuda_available=False)


def test_cbn_after_mmcv_ws_conv(base_cfg):
    cfg = _edit(base_cfg, 'model.neck.conv_cfg', dict(type='ConvWS'))
    with pytest.raises(ConfigError, match=r"model.neck.norm_cfg: CBN after conv_cfg type='ConvWS'.*WSConv"):
        validate_norm_config(cfg, 'train', cuda_available=False)


def test_burnin_longer_than_schedule(base_cfg):
    cfg = _edit(base_cfg, 'custom_hooks', [dict(type='CBNBurnInHook', burnin_epochs=12)])
    with pytest.raises(ConfigError, match=r'burnin_epochs = 12 is not shorter than train_cfg.max_epochs = 12'):
        validate_norm_config(cfg, 'train', cuda_available=False)


def test_burnin_hook_bad_arguments(base_cfg):
    cfg = _edit(base_cfg, 'custom_hooks', [dict(type='CBNBurnInHook', burnin_epochs=8, burnin_iters=100)])
    with pytest.raises(ConfigError, match=r'CBNBurnInHook.*exactly one of burnin_epochs / burnin_iters'):
        validate_norm_config(cfg, 'train', cuda_available=False)


def test_sync_bn_conversion_would_erase_cbn(base_cfg):
    cfg = _edit(base_cfg, 'sync_bn', 'torch')
    with pytest.raises(ConfigError, match=r"sync_bn = 'torch' would replace model.neck.norm_cfg type='CBN'"):
        validate_norm_config(cfg, 'train', cuda_available=False)


@pytest.mark.parametrize('norm_type', ['SyncBN', 'SyncCBN'])
def test_sync_layers_on_gpu_without_process_group(base_cfg, norm_type):
    norm = dict(type=norm_type) if norm_type == 'SyncBN' else dict(type='SyncCBN', buffer_num=3)
    cfg = _edit(base_cfg, 'model.neck.norm_cfg', norm)
    with pytest.raises(ConfigError, match=rf"model.neck.norm_cfg.type = '{norm_type}' on a GPU without a "
                                          r'process group \(--launcher none\)'):
        validate_norm_config(cfg, 'train', launcher='none', cuda_available=True)
    validate_norm_config(cfg, 'train', launcher='none', cuda_available=False)   # CPU: BN by design
    validate_norm_config(cfg, 'train', launcher='pytorch', cuda_available=True)


def test_missing_dataset(base_cfg, tmp_path):
    cfg = _edit(base_cfg, 'train_dataloader.dataset.data_root', str(tmp_path / 'no_coco') + '/')
    with pytest.raises(ConfigError, match=r'train_dataloader.dataset.data_root.*no_coco'):
        validate_config(cfg, 'train')


def test_bad_eval_metric():
    with pytest.raises(ConfigError, match=r"--eval mAP: unsupported metric\(s\) \['mAP'\]"):
        check_eval_metrics(['bbox', 'mAP'])


def test_gpu_count_not_dividing_the_batch(base_cfg, tmp_path):
    cfg = copy.deepcopy(base_cfg)
    with pytest.raises(ConfigError, match=r'global_batch_size = 16 cannot be split over 3 processes'):
        check_global_batch(cfg, 3)


def test_every_shipped_config_passes(base_cfg):
    import glob
    for path in sorted(glob.glob(osp.join(ROOT, 'configs', '*', '*.py'))):
        if '_base_' in path:
            continue
        validate_norm_config(Config.fromfile(path), 'train', cuda_available=False)
