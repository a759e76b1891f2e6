"""The synthetic COCO-format dataset: valid for pycocotools, masks inside boxes, deterministic."""
import filecmp
import json
import os.path as osp

import numpy as np
import pytest
from pycocotools.coco import COCO

from cbn_mmdet.datasets import SYNTHETIC_CLASSES, SyntheticDataError, ensure_synthetic_coco, generate_synthetic_coco
from cbn_mmdet.datasets.synthetic_coco import render_image, synthetic_params

SMALL = dict(seed=3, num_train=6, num_val=3, image_size=64, min_size=12, max_size=28)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('syn') / 'coco')
    generate_synthetic_coco(out, **SMALL)
    return out


@pytest.mark.parametrize('split, count', [('train', 6), ('val', 3)])
def test_pycocotools_loads_it_and_masks_lie_inside_boxes(small, split, count):
    coco = COCO(osp.join(small, 'annotations', f'instances_{split}.json'))
    assert len(coco.imgs) == count
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(SYNTHETIC_CLASSES)
    assert len(coco.anns) >= count * SMALL.get('min_objects', 1)
    for ann in coco.anns.values():
        img = coco.imgs[ann['image_id']]
        assert osp.isfile(osp.join(small, split, img['file_name']))
        x, y, w, h = ann['bbox']
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= img['width'] and y + h <= img['height']
        mask = coco.annToMask(ann)
        assert mask.shape == (img['height'], img['width'])
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        # rasterised pixels [i, i+1) of the polygon stay within the box (up to the pixel it starts in)
        assert xs.min() >= np.floor(x) and xs.max() <= np.ceil(x + w)
        assert ys.min() >= np.floor(y) and ys.max() <= np.ceil(y + h)
        assert abs(mask.sum() - ann['area']) <= 0.25 * ann['area'] + 8
        assert ann['iscrowd'] == 0 and ann['category_id'] in coco.getCatIds()


def test_deterministic_by_seed(tmp_path, small):
    again = str(tmp_path / 'again')
    generate_synthetic_coco(again, **SMALL)
    for split in ('train', 'val'):
        ann = osp.join('annotations', f'instances_{split}.json')
        assert filecmp.cmp(osp.join(small, ann), osp.join(again, ann), shallow=False)
        for i in range(SMALL[f'num_{split}']):
            name = osp.join(split, f'{i:06d}.png')
            assert filecmp.cmp(osp.join(small, name), osp.join(again, name), shallow=False)
    other_img, other_anns = render_image(synthetic_params(**dict(SMALL, seed=4)), 'train', 0)
    img, anns = render_image(synthetic_params(**SMALL), 'train', 0)
    assert not np.array_equal(img, other_img) or anns != other_anns


def test_reused_when_parameters_match_and_refused_otherwise(tmp_path):
    out = str(tmp_path / 'coco')
    params = dict(SMALL, num_train=2, num_val=1)
    assert ensure_synthetic_coco(out, **params) is True
    before = sorted(p.name for p in (tmp_path / 'coco' / 'train').iterdir())
    assert ensure_synthetic_coco(out, **params) is False            # same parameters: reused
    with pytest.raises(SyntheticDataError, match=r"seed=3 \(asked: 9\)"):
        ensure_synthetic_coco(out, **dict(params, seed=9))           # other parameters: refused, kept
    with open(osp.join(out, 'meta.json')) as f:
        assert json.load(f)['seed'] == 3
    assert sorted(p.name for p in (tmp_path / 'coco' / 'train').iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.synthetic_coco_')]   # no leftovers


@pytest.mark.parametrize('params, error, match', [
    (dict(num_train=0), ValueError, 'num_train'),
    (dict(min_objects=3, max_objects=2), ValueError, 'min_objects'),
    (dict(max_size=100, image_size=128), ValueError, 'max_size'),
    (dict(seed=1.5), TypeError, 'seed'),
    (dict(colour=1), TypeError, 'unknown parameter'),
])
def test_bad_parameters(params, error, match):
    with pytest.raises(error, match=match):
        synthetic_params(**params)
