"""run_demo refuses bad arguments before it writes anything; the variants point at real configs."""
import os.path as osp

import pytest
from mmengine.config import Config

from cbn_mmdet.demo import BN_TYPE, REFERENCES, REQUIRED, VARIANTS, DemoError, run_demo
from tests.tiny_config import ROOT


def test_variants_are_configs_of_the_checkout():
    assert list(VARIANTS) == ['baseline', 'bn', 'syncbn', 'gn', 'cbn', 'cbn_gtw']
    for name, (_, config) in VARIANTS.items():
        assert osp.isfile(osp.join(ROOT, config)), name
    assert set(REQUIRED) <= set(VARIANTS) and set(BN_TYPE) <= set(VARIANTS) and set(REFERENCES) <= set(VARIANTS)


def _norm_types(cfg):
    heads = cfg.model.roi_head
    return {cfg.model.neck.get('norm_cfg', {}).get('type'), heads.bbox_head.get('norm_cfg', {}).get('type'),
            heads.mask_head.get('norm_cfg', {}).get('type')}


def test_the_variants_differ_in_the_fpn_and_head_norm_only():
    cfgs = {name: Config.fromfile(osp.join(ROOT, config)) for name, (_, config) in VARIANTS.items()}
    expected = {'baseline': {None}, 'bn': {'BN'}, 'syncbn': {'SyncCBN'}, 'gn': {'GN'}, 'cbn': {'CBN'},
                'cbn_gtw': {'CBN'}}
    for name, cfg in cfgs.items():
        assert _norm_types(cfg) == expected[name], name
        # the same backbone (GN, half-width R-18), schedule, batch and PreciseBN everywhere
        assert cfg.model.backbone.norm_cfg == cfgs['baseline'].model.backbone.norm_cfg, name
        assert (cfg.train_cfg, cfg.global_batch_size, cfg.optim_wrapper) == (
            cfgs['baseline'].train_cfg, 2, cfgs['baseline'].optim_wrapper), name
        assert [h for h in cfg.custom_hooks if h['type'] == 'PreciseBNHook'] == [cfgs['baseline'].precise_bn_hook]
    assert cfgs['syncbn'].model.neck.norm_cfg.buffer_num == 0      # SyncCBN without a window = SyncBN
    assert cfgs['cbn_gtw'].model.neck.norm_cfg.grad_through_window is True
    assert not cfgs['cbn'].model.neck.norm_cfg.get('grad_through_window', False)
    assert [h['type'] for h in cfgs['cbn_gtw'].custom_hooks] == ['CBNBurnInHook', 'PreciseBNHook']


def test_unknown_variant(tmp_path):
    known = r"\['baseline', 'bn', 'syncbn', 'gn', 'cbn', 'cbn_gtw'\]"
    with pytest.raises(DemoError, match=r"unknown variant\(s\) \['bcn'\]; known: " + known):
        run_demo(ROOT, str(tmp_path / 'wd'), variants=('cbn', 'bcn'), say=lambda m='': None)
    assert not (tmp_path / 'wd').exists()


@pytest.mark.parametrize('kwargs,message', [(dict(seeds=0), 'seeds must be an int >= 1, got 0'),
                                            (dict(procs=1.5), 'procs must be an int >= 1, got 1.5'),
                                            (dict(num_samples=5), 'num_samples must be an int >= 10, got 5')])
def test_bad_numbers(tmp_path, kwargs, message):
    with pytest.raises(DemoError, match=message):
        run_demo(ROOT, str(tmp_path / 'wd'), say=lambda m='': None, **kwargs)
    assert not (tmp_path / 'wd').exists()


def test_root_must_be_a_checkout(tmp_path):
    with pytest.raises(DemoError, match='is not a cbn_mmdet checkout: no configs/demo/mask_rcnn_r18_fpn_baseline'):
        run_demo(str(tmp_path), 'wd', say=lambda m='': None)
    assert not (tmp_path / 'wd').exists()
