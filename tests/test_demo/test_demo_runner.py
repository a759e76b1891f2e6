"""run_demo refuses bad arguments before it writes anything; the variants point at real configs."""
import os.path as osp

import pytest

from cbn_mmdet.demo import REQUIRED, VARIANTS, DemoError, run_demo
from tests.tiny_config import ROOT


def test_variants_are_configs_of_the_checkout():
    for name, (_, config) in VARIANTS.items():
        assert osp.isfile(osp.join(ROOT, config)), name
    assert set(REQUIRED) <= set(VARIANTS)


def test_unknown_variant(tmp_path):
    known = r"\['baseline', 'cbn', 'gn', 'syncbn'\]"
    with pytest.raises(DemoError, match=r"unknown variant\(s\) \['bcn'\]; known: " + known):
        run_demo(ROOT, str(tmp_path / 'wd'), variants=('cbn', 'bcn'), say=lambda m='': None)
    assert not (tmp_path / 'wd').exists()


def test_root_must_be_a_checkout(tmp_path):
    with pytest.raises(DemoError, match='is not a cbn_mmdet checkout: no configs/demo/mask_rcnn_r18_fpn_baseline'):
        run_demo(str(tmp_path), 'wd', say=lambda m='': None)
    assert not (tmp_path / 'wd').exists()
