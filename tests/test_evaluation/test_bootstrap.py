"""Bootstrap AP intervals: against a detector whose AP is known by hand, and against pycocotools itself."""
import contextlib
import copy
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cbn_mmdet.evaluation.bootstrap import (
    ImageMatches,
    bootstrap_ap,
    bootstrap_indices,
    paired_difference,
    percentile_interval,
)


def _coco(images, annotations, categories=(1,)):
    gt = COCO()
    gt.dataset = dict(images=[dict(id=i, width=100, height=100) for i in images],
                      annotations=[dict(a, id=n + 1, area=a['bbox'][2] * a['bbox'][3], iscrowd=a.get('iscrowd', 0))
                                   for n, a in enumerate(annotations)],
                      categories=[dict(id=c, name=str(c)) for c in categories])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _half_right(num_images, right):
    """One box per image; the detector finds it exactly in the first ``right`` images (score 0.9) and
    puts a far-away box (score 0.5) in the others."""
    gt = _coco(range(1, num_images + 1), [dict(image_id=i, category_id=1, bbox=[10, 10, 20, 20])
                                          for i in range(1, num_images + 1)])
    dets = [dict(image_id=i, category_id=1, score=0.9 if i <= right else 0.5,
                 bbox=[10, 10, 20, 20] if i <= right else [60, 60, 20, 20]) for i in range(1, num_images + 1)]
    return gt, dets


def _hand_ap(hits, num_images):
    """AP of ``_half_right``: every TP outranks every FP, so precision is 1 up to recall hits/n and the
    recall never goes beyond it; the AP is the share of the 101 recall thresholds r <= hits/n (the
    same at every IoU threshold, the boxes being exact). No hit: the first detection is a FP, AP 0."""
    if hits == 0:
        return 0.0
    return (math.floor(100 * hits / num_images) + 1) / 101


def test_hand_checkable_detector():
    n, right = 13, 8          # 100 * k / 13 is never an integer for 0 < k < 13: no threshold on a boundary
    gt, dets = _half_right(n, right)
    matches = ImageMatches(gt, dets, 'bbox')
    assert matches.ap() == pytest.approx(dict(AP=_hand_ap(right, n), AP50=_hand_ap(right, n),
                                              AP75=_hand_ap(right, n)), abs=1e-12)
    # every resample: the AP of its number of correctly detected images (copies counted)
    samples = bootstrap_indices(n, 200, seed=3)
    expected = [_hand_ap(int((s < right).sum()), n) for s in samples]
    got = [matches.ap(s)['AP'] for s in samples]
    assert got == pytest.approx(expected, abs=1e-12)
    value, low, high = bootstrap_ap(matches, num_samples=200, seed=3)['AP']
    assert value == pytest.approx(_hand_ap(right, n))
    assert (low, high) == pytest.approx(np.percentile(expected, [2.5, 97.5]), abs=1e-12)
    assert low < value < high


def test_perfect_detector_has_no_noise():
    gt, dets = _half_right(9, 9)
    for key, (value, low, high) in bootstrap_ap(ImageMatches(gt, dets), num_samples=50).items():
        assert (value, low, high) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0)), key


def _random_case(seed, num_images=12):
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for img in range(1, num_images + 1):
        for _ in range(rng.integers(0, 4)):
            x, y, w, h = rng.uniform(0, 60, 2).tolist() + rng.uniform(8, 40, 2).tolist()
            cat = int(rng.integers(1, 3))
            anns.append(dict(image_id=img, category_id=cat, bbox=[x, y, w, h], iscrowd=int(rng.random() < 0.1)))
            if rng.random() < 0.8:    # a noisy detection of it, sometimes of the wrong class
                jitter = rng.normal(0, 4, 4)
                dets.append(dict(image_id=img, category_id=cat if rng.random() < 0.85 else 3 - cat,
                                 bbox=[x + jitter[0], y + jitter[1], max(w + jitter[2], 2), max(h + jitter[3], 2)],
                                 score=float(rng.random())))
        for _ in range(rng.integers(0, 3)):   # false positives
            dets.append(dict(image_id=img, category_id=int(rng.integers(1, 3)), score=float(rng.random()) * 0.6,
                             bbox=rng.uniform(0, 60, 2).tolist() + rng.uniform(8, 40, 2).tolist()))
    return _coco(range(1, num_images + 1), anns, categories=(1, 2)), dets


def _pycocotools_ap(gt_dataset, dets):
    """COCO AP / AP50 / AP75 by pycocotools from scratch (area all, 100 detections)."""
    gt = COCO()
    gt.dataset = copy.deepcopy(gt_dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(AP=ev.stats[0], AP50=ev.stats[1], AP75=ev.stats[2])


def _duplicated(gt, dets, sample, img_ids):
    """The resampled dataset itself: copy j of the sample is a new image (id j + 1) with the
    annotations and detections of the original; copies in the order of the original images."""
    sample = np.sort(sample)
    images, anns, new_dets = [], [], []
    for j, index in enumerate(sample):
        old = img_ids[index]
        images.append(dict(gt.imgs[old], id=j + 1))
        anns += [dict(a, image_id=j + 1, id=len(anns) + n + 1) for n, a in enumerate(gt.imgToAnns[old])]
        new_dets += [dict(d, image_id=j + 1) for d in dets if d['image_id'] == old]
    return dict(gt.dataset, images=images, annotations=anns), new_dets


@pytest.mark.parametrize('seed', [0, 1])
def test_matches_pycocotools_on_resampled_datasets(seed):
    gt, dets = _random_case(seed)
    matches = ImageMatches(gt, dets, 'bbox')
    assert matches.ap() == pytest.approx(_pycocotools_ap(gt.dataset, dets), abs=1e-12)
    for sample in bootstrap_indices(matches.num_images, 3, seed=seed):
        dataset, new_dets = _duplicated(gt, dets, sample, matches.img_ids)
        assert matches.ap(np.sort(sample)) == pytest.approx(_pycocotools_ap(dataset, new_dets), abs=1e-12)


def test_paired_difference_cancels_shared_noise():
    n = 13
    gt, good = _half_right(n, 10)
    _, bad = _half_right(n, 6)
    a, b = ImageMatches(gt, good), ImageMatches(gt, bad)
    value, low, high = paired_difference(a, b, num_samples=300, seed=1)
    assert value == pytest.approx(_hand_ap(10, n) - _hand_ap(6, n))
    # the 4 images that only `a` gets right drive the difference: every resample has a >= b
    samples = bootstrap_indices(n, 300, seed=1)
    diffs = [_hand_ap(int((s < 10).sum()), n) - _hand_ap(int((s < 6).sum()), n) for s in samples]
    assert (low, high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
    assert low >= 0
    # a model compared with itself: exactly zero, no noise
    assert paired_difference(a, a, num_samples=20) == (0.0, 0.0, 0.0)
    # seeds of one variant (a list): the mean AP of the group on each resample
    value, _, _ = paired_difference([a, b], b, num_samples=20)
    assert value == pytest.approx((_hand_ap(10, n) - _hand_ap(6, n)) / 2)


def test_no_detections_and_bad_input():
    gt, _ = _half_right(5, 0)
    empty = ImageMatches(gt, [])
    assert empty.ap() == dict(AP=0.0, AP50=0.0, AP75=0.0)
    with pytest.raises(ValueError, match="iou_type must be 'bbox' or 'segm', got 'keypoints'"):
        ImageMatches(gt, [], 'keypoints')
    with pytest.raises(ValueError, match=r'sample must be a 1-D array of image indices in \[0, 5\)'):
        empty.ap([5])
    with pytest.raises(ValueError, match='num_samples must be a positive int, got 0'):
        bootstrap_indices(5, 0)
    with pytest.raises(ValueError, match='level must be in'):
        percentile_interval([1.0], level=95)
    other, dets = _half_right(6, 3)
    with pytest.raises(ValueError, match='evaluated on different images'):
        paired_difference(empty, ImageMatches(other, dets))
