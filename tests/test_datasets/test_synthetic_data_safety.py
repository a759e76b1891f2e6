"""The synthetic-data step never writes into, empties or replaces a directory it did not create.

Oracle: the bytes of every file of a user's directory before and after, and the generator's own mark.
"""
import json
import os
import os.path as osp

import pytest

from cbn_mmdet.datasets import MARK_FILE, SyntheticDataError, ensure_synthetic_coco, generate_synthetic_coco
from cbn_mmdet.engine.config_checks import ConfigError
from cbn_mmdet.engine.runner_setup import ensure_config_data

PARAMS = dict(seed=5, num_train=2, num_val=1, image_size=48, min_size=8, max_size=20)


def snapshot(root):
    """{relative path: bytes} of every file below ``root``."""
    files = {}
    for base, _, names in os.walk(root):
        for name in names:
            path = osp.join(base, name)
            with open(path, 'rb') as f:
                files[osp.relpath(path, root)] = f.read()
    return files


def users_dataset(tmp_path):
    root = tmp_path / 'my_coco'
    (root / 'annotations').mkdir(parents=True)
    (root / 'annotations' / 'instances_train.json').write_text('{"images": [], "annotations": []}')
    (root / 'train').mkdir()
    (root / 'train' / 'photo.jpg').write_bytes(b'\xff\xd8 my photo')
    return str(root)


@pytest.mark.parametrize('layout', ['user_dataset', 'empty_dir', 'file', 'foreign_meta_json'])
def test_a_directory_without_the_mark_is_refused_and_untouched(tmp_path, layout):
    if layout == 'user_dataset':
        out = users_dataset(tmp_path)
    elif layout == 'empty_dir':
        out = str(tmp_path / 'empty')
        os.mkdir(out)
    elif layout == 'file':
        out = str(tmp_path / 'a_file')
        with open(out, 'w') as f:
            f.write('keep me')
    else:     # a meta.json that is not ours
        out = users_dataset(tmp_path)
        with open(osp.join(out, 'meta.json'), 'w') as f:
            json.dump(dict(seed=5, author='me'), f)
    before = snapshot(out) if osp.isdir(out) else open(out).read()
    with pytest.raises(SyntheticDataError, match=out):
        ensure_synthetic_coco(out, **PARAMS)
    with pytest.raises(SyntheticDataError, match=out):
        generate_synthetic_coco(out, **PARAMS)
    assert (snapshot(out) if osp.isdir(out) else open(out).read()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.synthetic_coco_')]


def test_generated_directory_carries_the_mark_with_its_parameters(tmp_path):
    out = str(tmp_path / 'syn')
    assert ensure_synthetic_coco(out, **PARAMS) is True
    with open(osp.join(out, MARK_FILE)) as f:
        mark = json.load(f)
    assert {k: mark[k] for k in PARAMS} == PARAMS


def test_a_set_written_before_the_mark_existed_is_reused(tmp_path):
    out = str(tmp_path / 'old')
    ensure_synthetic_coco(out, **PARAMS)
    os.remove(osp.join(out, MARK_FILE))         # what the earlier generator left: meta.json only
    assert ensure_synthetic_coco(out, **PARAMS) is False
    with pytest.raises(SyntheticDataError, match='other parameters'):
        ensure_synthetic_coco(out, **dict(PARAMS, num_train=3))


def test_config_step_names_the_field(tmp_path):
    out = users_dataset(tmp_path)
    from mmengine.config import Config
    cfg = Config(dict(synthetic_data=dict(out_dir=out, **PARAMS)))
    with pytest.raises(ConfigError, match=r"synthetic_data.out_dir = '.*my_coco'.*not created by"):
        ensure_config_data(cfg)
    cfg = Config(dict(synthetic_data=dict(out_dir=str(tmp_path / 'new'), seed=5, num_train=0)))
    with pytest.raises(ConfigError, match='synthetic_data = .*num_train'):
        ensure_config_data(cfg)
    assert not osp.exists(tmp_path / 'new')
    ensure_config_data(Config(dict(synthetic_data=None)))     # the documented way to switch it off
