"""A small COCO-format instance-segmentation dataset generated on the fly (for the demo and the tests).

Each image is a textured background (a colour gradient, low-frequency noise and faint stripes) with a
few non-overlapping coloured shapes of three categories — ``rectangle`` (rotated), ``ellipse``,
``triangle``. Every object is a polygon, so its COCO annotation (polygon segmentation, bbox, area) is
exact. Generation is deterministic: image ``i`` of split ``s`` depends only on ``(seed, s, i)`` and the
size parameters.

Safety: the generator only ever writes a directory it creates, and marks it with ``.cbn_mmdet_synthetic``
(its parameters). An existing directory is reused when it carries the mark of the same parameters and
refused otherwise (an unmarked one may be the user's own dataset; a marked one with other parameters may
be shared by other configs). Nothing is ever deleted but the generator's own temporary directory.

Layout (``out_dir``)::

    train/000000.png ...          val/000000.png ...
    annotations/instances_train.json   annotations/instances_val.json
    meta.json  .cbn_mmdet_synthetic

Command line: ``python tools/misc/synthetic_coco.py [OUT_DIR] [--seed S] [--num-train N] ...``.
"""
import json
import math
import os
import os.path as osp
import shutil
import tempfile

import numpy as np

__all__ = ['SYNTHETIC_CLASSES', 'SYNTHETIC_PALETTE', 'DEFAULT_PARAMS', 'MARK_FILE', 'SyntheticDataError',
           'generate_synthetic_coco', 'ensure_synthetic_coco', 'synthetic_params', 'read_mark']

SYNTHETIC_CLASSES = ('rectangle', 'ellipse', 'triangle')
SYNTHETIC_PALETTE = [(220, 20, 60), (0, 128, 255), (60, 180, 75)]
FORMAT_VERSION = 1
# The file that marks a directory as written by this generator (with its parameters, as JSON).
MARK_FILE = '.cbn_mmdet_synthetic'
DEFAULT_PARAMS = dict(seed=0, num_train=160, num_val=40, image_size=128, min_objects=1, max_objects=4,
                      min_size=18, max_size=52)
_SPLITS = {'train': 0, 'val': 1}


class SyntheticDataError(ValueError):
    """The output directory exists and is not this generator's set of the requested parameters."""


def synthetic_params(**overrides):
    """The generator parameters: ``DEFAULT_PARAMS`` updated by ``overrides`` (unknown keys raise)."""
    unknown = sorted(set(overrides) - set(DEFAULT_PARAMS))
    if unknown:
        raise TypeError(f'synthetic_coco: unknown parameter(s) {unknown}; known: {sorted(DEFAULT_PARAMS)}')
    params = dict(DEFAULT_PARAMS, **overrides)
    for key, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f'synthetic_coco: {key} must be an int, got {value!r}')
    if params['num_train'] < 1 or params['num_val'] < 1:
        raise ValueError(f"synthetic_coco: num_train and num_val must be >= 1, got "
                         f"{params['num_train']}, {params['num_val']}")
    if not 1 <= params['min_objects'] <= params['max_objects']:
        raise ValueError(f"synthetic_coco: need 1 <= min_objects <= max_objects, got "
                         f"{params['min_objects']}, {params['max_objects']}")
    if not 4 <= params['min_size'] <= params['max_size'] <= params['image_size'] // 2:
        raise ValueError(f"synthetic_coco: need 4 <= min_size <= max_size <= image_size/2, got "
                         f"min_size={params['min_size']}, max_size={params['max_size']}, "
                         f"image_size={params['image_size']}")
    return params


# ---------------------------------------------------------------------------------------- drawing
def _smooth_noise(rng, size, cells):
    """Low-frequency noise in [0, 1]: a coarse random grid bilinearly upsampled."""
    import cv2
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _background(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(60, 190, 3), rng.uniform(60, 190, 3)
    angle = rng.uniform(0, math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img += (_smooth_noise(rng, size, int(rng.integers(3, 8)))[..., None] - 0.5) * rng.uniform(30, 70)
    freq, phase, theta = rng.uniform(6, 20), rng.uniform(0, 2 * math.pi), rng.uniform(0, math.pi)
    stripes = np.sin(2 * math.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    img += stripes[..., None] * rng.uniform(4, 14)
    img += rng.normal(0, 4, img.shape)
    return img


def _shape_polygon(rng, category, cx, cy, w, h):
    """Polygon (K, 2) float array, centred on (cx, cy) within a w x h box (before rotation)."""
    if category == 'rectangle':
        pts = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    elif category == 'ellipse':
        a = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([np.cos(a) * w / 2, np.sin(a) * h / 2], 1)
    else:   # triangle: apex jittered along the top edge, so shapes vary
        apex = rng.uniform(-0.4, 0.4) * w
        pts = np.array([[apex, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    theta = rng.uniform(-math.pi / 6, math.pi / 6) if category != 'ellipse' else rng.uniform(0, math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return pts @ rot.T + np.array([cx, cy])


def _polygon_area(pts):
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _overlaps(box, boxes, margin=3):
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
               for b in boxes)


def render_image(params, split, index):
    """(HxWx3 uint8 BGR image, [annotation dicts without ids]) for image ``index`` of ``split``."""
    import cv2
    size = params['image_size']
    rng = np.random.default_rng([params['seed'], _SPLITS[split], index])
    img = _background(rng, size)
    objects, boxes = [], []
    wanted = int(rng.integers(params['min_objects'], params['max_objects'] + 1))
    for _ in range(wanted * 20):          # rejection sampling for non-overlapping objects
        if len(objects) == wanted:
            break
        cat = int(rng.integers(len(SYNTHETIC_CLASSES)))
        w, h = rng.uniform(params['min_size'], params['max_size'], 2)
        cx, cy = rng.uniform(2, size - 2, 2)
        pts = _shape_polygon(rng, SYNTHETIC_CLASSES[cat], cx, cy, w, h)
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        if x0 < 1 or y0 < 1 or x1 > size - 1 or y1 > size - 1 or _overlaps((x0, y0, x1, y1), boxes):
            continue
        boxes.append((x0, y0, x1, y1))
        objects.append((cat, pts))
    for cat, pts in objects:
        # A saturated colour far from the local background, with a little shading.
        colour = rng.uniform(0, 255, 3)
        colour[int(rng.integers(3))] = rng.choice([rng.uniform(0, 40), rng.uniform(215, 255)])
        layer = np.zeros((size, size), np.uint8)
        # COCO pixel i spans [i, i+1); OpenCV puts integer coordinates at pixel centres: shift by 0.5.
        cv2.fillPoly(layer, [np.round((pts - 0.5) * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA,
                     shift=4)
        alpha = (layer.astype(np.float32) / 255)[..., None]
        shade = 1 + (_smooth_noise(rng, size, 4)[..., None] - 0.5) * 0.25
        img = img * (1 - alpha) + (colour[None, None] * shade) * alpha
    img = np.clip(img, 0, 255).astype(np.uint8)
    anns = []
    for cat, pts in objects:
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        anns.append(dict(category_id=cat + 1, bbox=[round(float(x0), 2), round(float(y0), 2),
                                                     round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                         segmentation=[[round(float(v), 2) for v in pts.reshape(-1)]],
                         area=round(_polygon_area(pts), 2), iscrowd=0))
    return img, anns


# ---------------------------------------------------------------------------------------- writing
def _write_split(root, params, split, count):
    import cv2
    os.makedirs(osp.join(root, split), exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        img, anns = render_image(params, split, index)
        file_name = f'{index:06d}.png'
        if not cv2.imwrite(osp.join(root, split, file_name), img):
            raise OSError(f'synthetic_coco: could not write {osp.join(root, split, file_name)}')
        image_id = index + 1
        images.append(dict(id=image_id, file_name=file_name, width=img.shape[1], height=img.shape[0]))
        for ann in anns:
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=image_id))
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(SYNTHETIC_CLASSES)]
    coco = dict(info=dict(description=f'cbn_mmdet synthetic shapes ({split})', version=str(FORMAT_VERSION)),
                licenses=[], images=images, annotations=annotations, categories=categories)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
        json.dump(coco, f)
    return len(annotations)


def _meta(params):
    return dict(format_version=FORMAT_VERSION, classes=list(SYNTHETIC_CLASSES), **params)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_mark(out_dir):
    """The parameters a directory was generated with, or ``None`` when the generator did not create it.

    The mark is :data:`MARK_FILE` (written last, so a marked directory is complete). Directories written
    before the mark existed are recognised by their ``meta.json`` holding exactly our keys.
    """
    mark = _read_json(osp.join(out_dir, MARK_FILE))
    if isinstance(mark, dict):
        return mark
    legacy = _read_json(osp.join(out_dir, 'meta.json'))
    if isinstance(legacy, dict) and set(legacy) == set(_meta(DEFAULT_PARAMS)) \
            and legacy.get('classes') == list(SYNTHETIC_CLASSES):
        return legacy
    return None


def _check_reusable(out_dir, params):
    """``True`` if ``out_dir`` holds our set for ``params``; raise if it exists and holds anything else."""
    if not osp.lexists(out_dir):
        return False
    if not osp.isdir(out_dir):
        raise SyntheticDataError(f'{out_dir!r} exists and is not a directory; refusing to write a synthetic '
                                 'dataset there')
    mark = read_mark(out_dir)
    if mark is None:
        raise SyntheticDataError(
            f'{out_dir!r} exists and was not created by the synthetic-data generator (no {MARK_FILE} '
            'file): refusing to write into it. If it is your own dataset, drop the synthetic data step '
            '(--cfg-options synthetic_data=None); otherwise point synthetic_data.out_dir at a new directory.')
    wanted = _meta(params)
    if mark != wanted:
        diff = ', '.join(f'{k}={mark.get(k)!r} (asked: {v!r})' for k, v in wanted.items() if mark.get(k) != v)
        raise SyntheticDataError(
            f'{out_dir!r} holds a synthetic dataset generated with other parameters: {diff}. Refusing to '
            'replace it (other configs may use it): point synthetic_data.out_dir at a new directory, or '
            'delete the old one yourself.')
    return True


def generate_synthetic_coco(out_dir, **params):
    """Write the dataset into ``out_dir``, which must not exist; return its ``meta`` dict.

    Never writes into, or deletes, a directory it did not create: the set is rendered into a temporary
    sibling directory (the mark written last) and renamed to ``out_dir``, so an interrupted run never
    leaves a directory that looks complete. A concurrent writer of the same parameters is harmless.
    """
    params = synthetic_params(**params)
    out_dir = osp.abspath(out_dir)
    if osp.lexists(out_dir):
        raise SyntheticDataError(f'{out_dir!r} already exists; generate_synthetic_coco only writes a new '
                                 'directory (ensure_synthetic_coco reuses an identical set)')
    parent = osp.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.synthetic_coco_', dir=parent)   # ours: the only tree we ever remove
    try:
        counts = {split: _write_split(tmp, params, split, params[f'num_{split}']) for split in _SPLITS}
        meta = dict(_meta(params), num_annotations=counts)
        with open(osp.join(tmp, 'meta.json'), 'w') as f:
            json.dump(_meta(params), f, indent=1)
        with open(osp.join(tmp, MARK_FILE), 'w') as f:
            json.dump(_meta(params), f, indent=1)
        try:
            # rename(2) onto an existing non-empty directory fails: nothing of a late-created out_dir
            # is touched; os.rename (not os.replace) so that an existing *file* is not replaced either.
            if osp.lexists(out_dir):
                raise FileExistsError(out_dir)
            os.rename(tmp, out_dir)
        except OSError:
            if not (osp.isdir(out_dir) and read_mark(out_dir) == _meta(params)):
                raise SyntheticDataError(f'{out_dir!r} appeared while the synthetic dataset was being '
                                         'generated; left it untouched') from None
            shutil.rmtree(tmp)        # a concurrent writer of the same set finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def ensure_synthetic_coco(out_dir, **params):
    """Generate the dataset into ``out_dir`` unless it already holds exactly these parameters.

    Returns ``True`` when it generated, ``False`` when it reused an existing dataset. Raises
    :class:`SyntheticDataError` (naming the path) when ``out_dir`` exists but is not our set of these
    parameters: it is never written into, emptied or replaced.
    """
    params = synthetic_params(**params)
    if _check_reusable(osp.abspath(out_dir), params):
        return False
    try:
        generate_synthetic_coco(out_dir, **params)
    except SyntheticDataError:
        if _check_reusable(osp.abspath(out_dir), params):   # a concurrent run made the same set
            return False
        raise
    return True
