"""Bootstrap confidence intervals for COCO AP over the validation images.

A COCO AP measured on a few hundred images is itself a random quantity: another draw of images of the
same distribution would give another number. The bootstrap estimates that noise by resampling the
*images* with replacement and recomputing the AP on each resample.

How it is computed, exactly as pycocotools would on the resampled set: ``COCOeval.evaluate()`` matches
detections to ground truth image by image and category by category, independently of the other images,
so it runs once (:class:`ImageMatches`). A resample in which image ``i`` appears ``c`` times is the
dataset with ``c`` copies of image ``i``; pycocotools' ``accumulate()`` on it concatenates the per-image
matches of the copies in image order, sorts the detections by score (a stable merge sort) and
interpolates precision at the 101 recall thresholds. :meth:`ImageMatches.ap` does that same computation
for any multiset of images, vectorised (no Python loop over the recall thresholds), over area ``all`` at
``max_dets`` detections per image. On the identity resample it returns pycocotools' own AP;
``tests/test_evaluation/test_bootstrap.py`` checks it against pycocotools run on real duplicated datasets.

Intervals are percentile intervals (``level`` = 0.95: the 2.5 % and 97.5 % quantiles of the resampled
APs). Comparing two models evaluated on the same images: :func:`paired_difference` applies the *same*
resamples to both and gives the interval of the difference; a difference is larger than its
image-sampling noise when that interval excludes 0.
"""
import numpy as np

__all__ = ['ImageMatches', 'bootstrap_indices', 'resampled_ap', 'resampled_aps', 'percentile_interval', 'bootstrap_ap',
           'paired_difference', 'AP_KEYS']

# key -> index of the IoU threshold (None = mean over the ten thresholds 0.50:0.05:0.95)
AP_KEYS = {'AP': None, 'AP50': 0, 'AP75': 5}


class ImageMatches:
    """pycocotools' per-image matching of one set of detections, ready to be accumulated on resamples.

    Args:
        coco_gt (pycocotools.coco.COCO): the ground truth.
        detections (list[dict] | str): COCO result format (``image_id``, ``category_id``, ``score`` and
            ``bbox`` or ``segmentation``), or the path of such a JSON file (what mmdet's ``CocoMetric``
            writes with ``outfile_prefix``).
        iou_type (str): ``'bbox'`` or ``'segm'``.
        max_dets (int): detections per image and category kept (COCO's 100).
    """

    def __init__(self, coco_gt, detections, iou_type='bbox', max_dets=100):
        from pycocotools.cocoeval import COCOeval
        if iou_type not in ('bbox', 'segm'):
            raise ValueError(f"ImageMatches: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        if not isinstance(max_dets, int) or max_dets < 1:
            raise ValueError(f'ImageMatches: max_dets must be a positive int, got {max_dets!r}')
        self.iou_type, self.max_dets = iou_type, max_dets
        self.img_ids = sorted(coco_gt.getImgIds())
        self.cat_ids = sorted(coco_gt.getCatIds())
        if not self.img_ids:
            raise ValueError('ImageMatches: the ground truth has no images')
        if isinstance(detections, str) or len(detections):
            coco_dt = _load_detections(coco_gt, detections)
        else:
            coco_dt = None
        self.num_gt = np.zeros((len(self.cat_ids), len(self.img_ids)), dtype=np.int64)
        # per category: per image, the detections' scores (D,), matched flags (T, D), ignore flags (T, D)
        self._per_image = [[None] * len(self.img_ids) for _ in self.cat_ids]
        if coco_dt is None:          # no detection at all: only the ground-truth counts matter
            # (pycocotools ignores exactly the crowd annotations at area 'all')
            for k, cat in enumerate(self.cat_ids):
                for i, img in enumerate(self.img_ids):
                    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[img], catIds=[cat], iscrowd=None))
                    self.num_gt[k, i] = sum(1 for a in anns if not a.get('iscrowd', 0))
            self.num_thresholds = 10
            self._packed = [None] * len(self.cat_ids)
            return
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = self.img_ids
        ev.params.catIds = self.cat_ids
        ev.params.areaRng = [[0, 1e5 ** 2]]
        ev.params.areaRngLbl = ['all']
        ev.params.maxDets = [max_dets]
        _quietly(ev.evaluate)
        self.num_thresholds = len(ev.params.iouThrs)
        num_images = len(self.img_ids)
        for k in range(len(self.cat_ids)):
            for i in range(num_images):
                e = ev.evalImgs[k * num_images + i]     # one area range: index k * A * I + 0 * I + i
                if e is None:
                    continue
                self.num_gt[k, i] = int(np.count_nonzero(np.asarray(e['gtIgnore']) == 0))
                scores = np.asarray(e['dtScores'][:max_dets], dtype=np.float64)
                if scores.size:
                    self._per_image[k][i] = (scores, np.asarray(e['dtMatches'][:, :max_dets]) > 0,
                                             np.asarray(e['dtIgnore'][:, :max_dets]).astype(bool))
        self._pack()

    def _pack(self):
        """Per category, every detection in image order: scores, image index, matched/ignored flags."""
        self._packed = []
        for k in range(len(self.cat_ids)):
            entries = [(i, e) for i, e in enumerate(self._per_image[k]) if e is not None]
            if not entries:
                self._packed.append(None)
                continue
            image = np.concatenate([np.full(e[0].size, i) for i, e in entries])
            scores = np.concatenate([e[0] for _, e in entries])
            matched = np.concatenate([e[1] for _, e in entries], axis=1)
            ignored = np.concatenate([e[2] for _, e in entries], axis=1)
            starts = np.zeros(len(self.img_ids) + 1, dtype=np.int64)
            np.add.at(starts, image + 1, 1)
            self._packed.append((scores, matched & ~ignored, ~matched & ~ignored, np.cumsum(starts)))

    @property
    def num_images(self):
        return len(self.img_ids)

    def precision(self, sample=None):
        """Interpolated precision ``(T, 101, K)`` on a resample (``-1`` for a category without ground truth).

        ``sample``: image indices (into :attr:`img_ids`, repeats allowed), or ``None`` for every image once.
        """
        sample = np.arange(self.num_images) if sample is None else np.asarray(sample, dtype=np.int64)
        if sample.ndim != 1 or (sample.size and (sample.min() < 0 or sample.max() >= self.num_images)):
            raise ValueError(f'ImageMatches: sample must be a 1-D array of image indices in [0, {self.num_images}), '
                             f'got shape {sample.shape}')
        rec_thrs = np.linspace(0.0, 1.00, 101, endpoint=True)   # pycocotools' p.recThrs
        out = -np.ones((self.num_thresholds, rec_thrs.size, len(self.cat_ids)))
        for k in range(len(self.cat_ids)):
            num_gt = int(self.num_gt[k, sample].sum())
            if num_gt == 0:
                continue
            packed = self._packed[k]
            if packed is None:
                out[:, :, k] = 0.0
                continue
            scores, tp, fp, starts = packed
            # the resampled set's detections in image order (copies of an image one after the other)
            lengths = starts[sample + 1] - starts[sample]
            if lengths.sum() == 0:
                out[:, :, k] = 0.0
                continue
            offsets = np.repeat(starts[sample] - np.cumsum(lengths) + lengths, lengths)
            idx = np.arange(lengths.sum()) + offsets
            order = np.argsort(-scores[idx], kind='mergesort')
            idx = idx[order]
            tp_sum = np.cumsum(tp[:, idx], axis=1, dtype=np.float64)
            fp_sum = np.cumsum(fp[:, idx], axis=1, dtype=np.float64)
            recall = tp_sum / num_gt
            prec = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]   # pycocotools' right-to-left max
            nd = prec.shape[1]
            for t in range(self.num_thresholds):
                at = np.searchsorted(recall[t], rec_thrs, side='left')
                out[t, :, k] = np.where(at < nd, prec[t, np.minimum(at, nd - 1)], 0.0)
        return out

    def ap(self, sample=None):
        """``{'AP': ..., 'AP50': ..., 'AP75': ...}`` in [0, 1] on a resample (``-1`` if no ground truth)."""
        prec = self.precision(sample)
        result = {}
        for key, t in AP_KEYS.items():
            p = prec if t is None else prec[t]
            p = p[p > -1]
            result[key] = float(p.mean()) if p.size else -1.0
        return result


def _quietly(fn):
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def _load_detections(coco_gt, detections):
    import copy
    import json
    if isinstance(detections, str):
        with open(detections) as f:
            detections = json.load(f)
    # loadRes adds fields to the dicts it is given (and a bbox's area): work on copies
    return _quietly(lambda: coco_gt.loadRes(copy.deepcopy(list(detections))))


def bootstrap_indices(num_images, num_samples=1000, seed=0):
    """``(num_samples, num_images)`` image indices drawn with replacement (numpy's default generator)."""
    for name, value in (('num_images', num_images), ('num_samples', num_samples)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f'bootstrap: {name} must be a positive int, got {value!r}')
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_images, size=(num_samples, num_images))


def resampled_aps(matches, samples):
    """Every AP of :data:`AP_KEYS` of ``matches`` on each resample: ``{key: array (len(samples),)}``."""
    per_sample = [matches.ap(s) for s in samples]
    return {key: np.array([ap[key] for ap in per_sample]) for key in AP_KEYS}


def resampled_ap(matches, samples, key='AP'):
    """The AP ``key`` of ``matches`` on each resample: an array of shape ``(len(samples),)``."""
    if key not in AP_KEYS:
        raise ValueError(f'bootstrap: key must be one of {list(AP_KEYS)}, got {key!r}')
    return resampled_aps(matches, samples)[key]


def percentile_interval(values, level=0.95):
    """The central ``level`` percentile interval ``(low, high)`` of ``values``."""
    if not 0 < level < 1:
        raise ValueError(f'bootstrap: level must be in (0, 1), got {level!r}')
    values = np.asarray(values, dtype=np.float64)
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _check_same_images(matches):
    first = matches[0]
    for other in matches[1:]:
        if other.img_ids != first.img_ids:
            raise ValueError('bootstrap: the detections to compare were evaluated on different images '
                             f'({len(first.img_ids)} vs {len(other.img_ids)} image ids, or other ids)')


def bootstrap_ap(matches, num_samples=1000, seed=0, level=0.95, keys=('AP', 'AP50')):
    """AP with its bootstrap interval: ``{key: (value, low, high)}`` (value on the full image set).

    ``matches`` may also be a list of :class:`ImageMatches` of one variant (several seeds, same
    images): then value and resamples are of the mean AP over them (the same resample for each).
    """
    group = list(matches) if isinstance(matches, (list, tuple)) else [matches]
    _check_same_images(group)
    samples = bootstrap_indices(group[0].num_images, num_samples, seed)
    draws = [resampled_aps(m, samples) for m in group]
    out = {}
    for key in keys:
        value = float(np.mean([m.ap()[key] for m in group]))
        out[key] = (value, *percentile_interval(np.mean([d[key] for d in draws], axis=0), level))
    return out


def paired_difference(matches_a, matches_b, num_samples=1000, seed=0, level=0.95, key='AP'):
    """Paired bootstrap of ``AP(a) - AP(b)`` on the same images: ``(difference, low, high)``.

    Each side may be one :class:`ImageMatches` or a list of them (seeds of one variant: their mean AP).
    The same image resamples are applied to both sides, so what the images have in common (hard or easy
    images) cancels; the difference exceeds its image-sampling noise when ``low > 0`` or ``high < 0``.
    """
    group_a = list(matches_a) if isinstance(matches_a, (list, tuple)) else [matches_a]
    group_b = list(matches_b) if isinstance(matches_b, (list, tuple)) else [matches_b]
    _check_same_images(group_a + group_b)
    samples = bootstrap_indices(group_a[0].num_images, num_samples, seed)
    value = float(np.mean([m.ap()[key] for m in group_a]) - np.mean([m.ap()[key] for m in group_b]))
    draws = (np.mean([resampled_ap(m, samples, key) for m in group_a], axis=0)
             - np.mean([resampled_ap(m, samples, key) for m in group_b], axis=0))
    return (value, *percentile_interval(draws, level))
