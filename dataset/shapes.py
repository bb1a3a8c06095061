"""A built-in synthetic instance-segmentation dataset: coloured circles, squares and
triangles on textured backgrounds.

Deterministic: image ``index`` of a split with ``seed`` depends only on
``(seed, index)``, so any image can be generated on its own. Later shapes occlude
earlier ones; every instance's polygons describe its *visible* part, and instances
that are mostly hidden are dropped. Images are written once as PNG files to a cache
folder so that training, evaluation and prediction all read them the same way (cv2).
"""
import concurrent.futures
import logging
import os
import pickle
import tempfile

import cv2
import numpy as np

from .dataset import DatasetRegistry, DatasetSplit, evaluate_coco, roidbs_to_coco_gt

logger = logging.getLogger(__name__)

__all__ = ['ShapesDataset', 'generate_image', 'register_shapes', 'CLASS_NAMES']

CLASS_NAMES = ['circle', 'square', 'triangle']
# Bump when generation changes: it is part of the cache folder name, so stale PNGs
# from an older generator are never paired with new annotations.
_VERSION = 1


def _background(rs, h, w):
    """Textured background: gradient + coarse blobs + random lines. float32 (h, w, 3).

    Returns the image and its base colour (3,), used to pick contrasting shape colours.
    """
    base = rs.uniform(40, 215, size=3).astype(np.float32)
    dx, dy = rs.uniform(-1, 1, size=2)
    grad = (np.linspace(-1, 1, w, dtype=np.float32)[None, :] * dx
            + np.linspace(-1, 1, h, dtype=np.float32)[:, None] * dy)
    img = base + grad[:, :, None] * rs.uniform(-40, 40, size=3).astype(np.float32)
    # Coarse noise upsampled: smooth blotches, cheaper than filtering full-size noise.
    blobs = rs.uniform(-25, 25, size=(max(h // 32, 2), max(w // 32, 2), 3)).astype(np.float32)
    img += cv2.resize(blobs, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(rs.randint(2, 9)):
        p1 = (int(rs.randint(0, w)), int(rs.randint(0, h)))
        p2 = (int(rs.randint(0, w)), int(rs.randint(0, h)))
        cv2.line(img, p1, p2, rs.uniform(0, 255, size=3).tolist(), int(rs.randint(1, 3)))
    return img, base


def _shape_points(rs, cls, cx, cy, r):
    """Integer polygon (K, 2) of a square or triangle of 'radius' r, randomly rotated."""
    theta = rs.uniform(0, 2 * np.pi)
    if cls == 2:  # square: corners at 45 + k*90 degrees, half-side r
        ang = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        rad = np.full(4, r * np.sqrt(2))
    else:  # triangle: jittered corner angles and radii, never degenerate
        ang = theta + np.arange(3) * 2 * np.pi / 3 + rs.uniform(-0.3, 0.3, size=3)
        rad = r * rs.uniform(0.8, 1.1, size=3)
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
    return np.round(pts).astype(np.int32)


def _layout(rs, h, w, dense, num_dense=None):
    """Shape centres and radii: (cx (N,), cy (N,), r (N,)) float arrays.

    Sparse: 2-6 shapes anywhere, log-uniform sizes (small to large COCO areas).
    Dense: ``num_dense`` (default 1000-3000) small shapes, one per cell of a jittered
    grid, so neighbours touch or overlap a little but most stay visible.
    """
    if not dense:
        n = rs.randint(2, 7)
        r = np.exp(rs.uniform(np.log(8), np.log(min(h, w) / 4), size=n))
        cx = rs.uniform(r / 2, w - r / 2)
        cy = rs.uniform(r / 2, h - r / 2)
        return cx, cy, r
    n = rs.randint(1000, 3001) if num_dense is None else int(num_dense)
    cols = int(np.ceil(np.sqrt(n * w / h)))
    rows = int(np.ceil(n / cols))
    cell = rs.choice(rows * cols, size=n, replace=False)
    sx, sy = w / cols, h / rows
    s = min(sx, sy)
    r = rs.uniform(0.3, 0.55, size=n) * s
    cx = (cell % cols + 0.5 + rs.uniform(-0.2, 0.2, size=n)) * sx
    cy = (cell // cols + 0.5 + rs.uniform(-0.2, 0.2, size=n)) * sy
    return cx, cy, r


def _visible_instance(label, inst_id, box, full_area, min_frac, min_pixels):
    """Visible part of instance ``inst_id`` in the label map.

    Args:
        label: uint16 (H, W) label map, the id of the topmost shape per pixel.
        box: int [x1, y1, x2, y2) region that contains the shape.
    Returns:
        (box float32 (4,), list of float32 (K, 2) polygons) or None if mostly hidden.
    """
    x1, y1, x2, y2 = box
    mask = (label[y1:y2, x1:x2] == inst_id).astype(np.uint8)
    area = int(mask.sum())
    if area < min_pixels or area < min_frac * full_area:
        return None
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # +0.5: contour points are pixel indices; pixel i is centred at i + 0.5.
    polys = [c.reshape(-1, 2).astype(np.float32) + np.float32([x1 + 0.5, y1 + 0.5])
             for c in contours if len(c) >= 3 and cv2.contourArea(c) >= 1]
    if not polys:
        return None
    ys, xs = np.nonzero(mask)
    tight = np.float32([xs.min() + x1, ys.min() + y1, xs.max() + x1 + 1, ys.max() + y1 + 1])
    return tight, polys


def generate_image(seed, index, min_size=192, max_size=320, dense=False, num_dense=None):
    """Generate one image and its instances; depends only on the arguments.

    ``num_dense`` (dense only) draws exactly that many shapes instead of 1000-3000 (e.g.
    for benchmarks at a chosen density); a few mostly hidden ones are then dropped.

    Returns:
        image: uint8 (H, W, 3) BGR, H and W uniform in [min_size, max_size].
        roidb: dict with ``height``, ``width``, ``boxes`` float32 (N, 4) x1y1x2y2,
            ``class`` int32 (N,) in 1..3, ``is_crowd`` int8 (N,) zeros,
            ``segmentation`` list of N lists of float32 (K, 2) polygons (visible parts;
            a shape that splits another in two gives that one two polygons; holes that a
            shape punches inside another are not represented).
    """
    # (seed, index) seeds its own stream: unlike seed + index, splits with nearby
    # seeds never share images.
    rs = np.random.RandomState([seed, index])
    h, w = (int(v) for v in rs.randint(min_size, max_size + 1, size=2))
    img, base = _background(rs, h, w)
    label = np.zeros((h, w), np.uint16)  # 0 = background, i + 1 = shape i
    cx, cy, rad = _layout(rs, h, w, dense, num_dense)
    classes = rs.randint(1, len(CLASS_NAMES) + 1, size=len(rad))
    shapes = []
    for i, (x, y, r, cls) in enumerate(zip(cx, cy, rad, classes)):
        for _ in range(4):  # resample colours too close to the background's
            colour = rs.uniform(0, 255, size=3)
            if np.abs(colour - base).max() >= 80:
                break
        else:
            colour = np.where(base > 127, base - 110, base + 110)
        if cls == 1:
            center, ir = (int(round(x)), int(round(y))), max(int(round(r)), 2)
            cv2.circle(img, center, ir, colour.tolist(), -1)
            cv2.circle(label, center, ir, i + 1, -1)
            lo, hi = np.float32([x - ir - 1, y - ir - 1]), np.float32([x + ir + 2, y + ir + 2])
        else:
            pts = _shape_points(rs, cls, x, y, r)
            cv2.fillPoly(img, [pts], colour.tolist())
            cv2.fillPoly(label, [pts], i + 1)
            lo, hi = pts.min(0), pts.max(0) + 1
        box = (max(int(lo[0]), 0), max(int(lo[1]), 0), min(int(hi[0]), w), min(int(hi[1]), h))
        # Nothing drawn later yet: the pixel count now is the shape's full area.
        full = int((label[box[1]:box[3], box[0]:box[2]] == i + 1).sum())
        shapes.append((i + 1, box, full, int(cls)))
    # Sensor-like noise; a Generator seeded from rs is ~3x faster than rs.normal.
    noise_rng = np.random.default_rng(rs.randint(2**31))
    img += noise_rng.standard_normal(img.shape, dtype=np.float32) * 6
    image = np.clip(img, 0, 255).astype(np.uint8)

    min_pixels = 10 if dense else 30
    boxes, cls_out, segms = [], [], []
    for inst_id, box, full, cls in shapes:
        vis = _visible_instance(label, inst_id, box, full, 0.3, min_pixels)
        if vis is not None:
            boxes.append(vis[0])
            cls_out.append(cls)
            segms.append(vis[1])
    roidb = {'height': h, 'width': w,
             'boxes': np.asarray(boxes, np.float32).reshape(-1, 4),
             'class': np.asarray(cls_out, np.int32),
             'is_crowd': np.zeros(len(cls_out), np.int8),
             'segmentation': segms}
    return image, roidb


def _write_atomic(path, data):
    """Write bytes via a temp file + os.replace: concurrent readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def default_cache_root():
    """``$SHAPES_CACHE_DIR`` if set, else ``~/.cache/rcnn_shapes``."""
    return os.environ.get('SHAPES_CACHE_DIR') or os.path.expanduser('~/.cache/rcnn_shapes')


class ShapesDataset(DatasetSplit):
    """``num_images`` synthetic images; PNGs cached under
    ``<cache_root>/<split>_<seed>_<num_images>_<min_size>-<max_size>_v<version>/``."""

    def __init__(self, split='train', num_images=600, seed=0, min_size=192, max_size=320,
                 dense=False, cache_root=None):
        """
        Args:
            split (str): only names the cache folder.
            num_images (int): images in the split.
            seed (int): image i is ``generate_image(seed, i, ...)``.
            min_size, max_size (int): image height and width are uniform in this range.
            dense (bool): 1000-3000 small shapes per image instead of 2-6.
            cache_root (str or None): default `default_cache_root()`, read at construction.
        """
        self.seed, self.num_images, self.dense = seed, num_images, dense
        self.min_size, self.max_size = min_size, max_size
        root = cache_root or default_cache_root()
        self.cache_dir = os.path.join(
            root, f'{split}_{seed}_{num_images}_{min_size}-{max_size}_v{_VERSION}')
        self._roidbs = None
        self._coco_gt = None

    def _make(self, index):
        """Generate image ``index``, write its PNG unless cached; return its roidb."""
        image, rdb = generate_image(self.seed, index, self.min_size, self.max_size, self.dense)
        path = os.path.join(self.cache_dir, f'{index:05d}.png')
        if not os.path.isfile(path):
            ok, buf = cv2.imencode('.png', image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if not ok:
                raise IOError(f'PNG encoding failed for {path!r}')
            _write_atomic(path, buf.tobytes())
        rdb.update(file_name=path, image_id=index)
        return rdb

    def training_roidbs(self):
        """Return roidbs, generating the split on first use.

        The annotations are cached next to the PNGs (``annotations.pkl``, written last),
        so later runs only check that the files exist.

        Returns:
            list[dict]: dataset/dataset.py format, ``image_id`` = index, sizes known.
        """
        if self._roidbs is not None:
            return self._roidbs
        ann_file = os.path.join(self.cache_dir, 'annotations.pkl')
        names = [f'{i:05d}.png' for i in range(self.num_images)]
        if os.path.isfile(ann_file) and all(
                os.path.isfile(os.path.join(self.cache_dir, n)) for n in names):
            with open(ann_file, 'rb') as f:
                roidbs = pickle.load(f)
            for rdb, n in zip(roidbs, names):  # the folder may have moved
                rdb['file_name'] = os.path.join(self.cache_dir, n)
        else:
            os.makedirs(self.cache_dir, exist_ok=True)
            # Threads: cv2 and large numpy ops release the GIL; each image has its own
            # RNG, so the result does not depend on scheduling.
            with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
                roidbs = list(ex.map(self._make, range(self.num_images)))
            _write_atomic(ann_file, pickle.dumps(roidbs))
            logger.info('shapes: generated %d images in %s', len(roidbs), self.cache_dir)
        self._roidbs = roidbs
        return roidbs

    def inference_roidbs(self):
        """All images: dicts with ``file_name``, ``image_id``, ``height``, ``width``."""
        return [{k: r[k] for k in ('file_name', 'image_id', 'height', 'width')}
                for r in self.training_roidbs()]

    def eval_inference_results(self, results, output=None):
        """See `DatasetSplit.eval_inference_results`."""
        if self._coco_gt is None:
            self._coco_gt = roidbs_to_coco_gt(self.training_roidbs(), CLASS_NAMES)
        return evaluate_coco(self._coco_gt, results, CLASS_NAMES, output=output)


def register_shapes(num_train=600, num_val=100, min_size=192, max_size=320,
                    num_dense_train=8, num_dense_val=4, dense_min_size=896,
                    dense_max_size=1024):
    """Register ``shapes_train``, ``shapes_val`` (2-6 shapes per image) and
    ``shapes_dense_train``, ``shapes_dense_val`` (1000-3000 per image), all with
    class_names ['circle', 'square', 'triangle']. Nothing is generated until used."""
    specs = {'shapes_train': ('train', num_train, 0, min_size, max_size, False),
             'shapes_val': ('val', num_val, 1, min_size, max_size, False),
             'shapes_dense_train': ('dense_train', num_dense_train, 2, dense_min_size,
                                    dense_max_size, True),
             'shapes_dense_val': ('dense_val', num_dense_val, 3, dense_min_size,
                                  dense_max_size, True)}
    for name, args in specs.items():
        DatasetRegistry.register(name, lambda a=args: ShapesDataset(*a))
        DatasetRegistry.register_metadata(name, 'class_names', list(CLASS_NAMES))
