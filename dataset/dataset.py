"""The dataset interface: `DatasetSplit`, `DatasetRegistry` and the one COCO evaluator.

A *roidb* is one dict per image. Fields (shapes for an image with N instances):

- ``file_name``: str, absolute path of the image; read with ``cv2.imread`` (BGR).
- ``image_id``: int (any hashable works for training; evaluation needs ints).
- ``height``, ``width``: int image size when known, else None.
- ``boxes``: float32 (N, 4), x1y1x2y2 in absolute pixels, floating-point convention
  (pixel i covers [i, i+1)).
- ``class``: int32 (N,), contiguous class ids in 1..C (0 is background).
- ``is_crowd``: int8 (N,), 1 for crowd regions (ignored in training).
- ``segmentation``: list of N items. A normal instance is a list of polygons, each a
  float32 (K, 2) array of x, y (K >= 3) in the same coordinates as ``boxes``. A crowd
  instance may instead be a COCO RLE dict ``{'size': [h, w], 'counts': ...}``; data.py
  ignores crowd masks. Detection-only splits may omit the key.

Images without instances have ``boxes`` of shape (0, 4) and empty arrays elsewhere;
filtering them is data.py's job.

Class names are registered metadata: ``DatasetRegistry.get_metadata(name, "class_names")``
is a list of C strings, background excluded; class id c names ``class_names[c - 1]``.
"""
import contextlib
import copy
import difflib
import io
import json
import logging
import os

import cv2
import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)

__all__ = ['DatasetSplit', 'DatasetRegistry', 'DatasetRegistryError', 'DatasetError',
           'roidbs_to_coco_gt', 'make_coco_gt', 'evaluate_coco', 'read_image_size']

# COCOeval.stats index -> metric suffix; the summary order is fixed by pycocotools.
_STAT_NAMES = ['IoU=0.5:0.95', 'IoU=0.5', 'IoU=0.75', 'small', 'medium', 'large']


class DatasetSplit:
    """One split of a dataset (e.g. ``coco_val2017``). Subclass it for your own data."""

    def training_roidbs(self):
        """Return the training annotations.

        Returns:
            list[dict]: one roidb per image, in the format of this module's docstring.
            Images without instances are included (with empty arrays).
        """
        raise NotImplementedError()

    def inference_roidbs(self):
        """Return the images to run inference on.

        Returns:
            list[dict]: each with at least ``file_name`` (absolute path) and ``image_id``;
            ``height``/``width`` when known.
        """
        raise NotImplementedError()

    def eval_inference_results(self, results, output=None):
        """Evaluate detections of ``inference_roidbs()`` images.

        Args:
            results (list[dict]): one dict per detection with ``image_id``,
                ``category_id`` (contiguous class id 1..C; the split maps it back to the
                dataset's own ids), ``bbox`` (4 floats, x1y1x2y2 absolute pixels),
                ``score`` (float), optional ``segmentation`` (COCO RLE dict of the full image).
            output (str or None): if given, write the results there as COCO json
                (bbox as [x, y, w, h], original category ids).

        Returns:
            dict[str, float]: metric name -> value, e.g. ``'mAP(bbox)/IoU=0.5:0.95'``.
        """
        raise NotImplementedError()


class DatasetError(ValueError):
    """Annotations that cannot be used (invalid json, no categories, ...); the message
    names the file. Entry scripts print it as one line."""


class DatasetRegistryError(KeyError, ValueError):
    """Unknown dataset name or metadata key. A KeyError and a ValueError, so either
    ``except`` catches it; its message is shown verbatim (KeyError would quote it)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


def _unknown(kind, name, known):
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    msg = f'Unknown {kind} {name!r}.'
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    msg += f" Registered: {', '.join(known) if known else '(none)'}."
    return DatasetRegistryError(msg)


class DatasetRegistry:
    """Global name -> dataset-split factory map, plus per-name metadata.

    Factories are called on every ``get`` so that registering is free: nothing is
    read from disk until a split is used.
    """
    _registry = {}
    _metadata = {}

    @classmethod
    def register(cls, name, factory):
        """Register ``factory`` (a zero-argument callable returning a `DatasetSplit`)
        under ``name``. Re-registering a name replaces it and logs a warning."""
        if not callable(factory):
            raise TypeError(f'DatasetRegistry.register({name!r}): factory must be callable, '
                            f'got {type(factory).__name__}')
        if name in cls._registry:
            logger.warning('Dataset %r was already registered; replacing it.', name)
        cls._registry[name] = factory

    @classmethod
    def get(cls, name):
        """Return a new `DatasetSplit` for ``name``; unknown names raise
        `DatasetRegistryError` listing the registered names and the closest matches."""
        if name not in cls._registry:
            raise _unknown('dataset', name, cls._registry)
        return cls._registry[name]()

    @classmethod
    def names(cls):
        """Sorted list of registered dataset names."""
        return sorted(cls._registry)

    @classmethod
    def register_metadata(cls, name, key, value):
        """Attach ``value`` to dataset ``name`` under ``key`` (e.g. ``"class_names"``)."""
        cls._metadata.setdefault(name, {})[key] = value

    @classmethod
    def get_metadata(cls, name, key):
        """Return metadata ``key`` of dataset ``name``; unknown name or key raises
        `DatasetRegistryError`."""
        if name not in cls._metadata:
            raise _unknown('dataset (no metadata registered)', name, cls._metadata)
        meta = cls._metadata[name]
        if key not in meta:
            raise _unknown(f'metadata key for dataset {name!r}:', key, meta)
        return meta[key]


def read_image_size(file_name):
    """Return (height, width) of an image file, decoding it with cv2 (the one reader)."""
    img = cv2.imread(file_name, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FileNotFoundError(f'Cannot read image {file_name!r} (missing or not an image).')
    return int(img.shape[0]), int(img.shape[1])


def _flat_polygons(polys):
    """list of (K, 2) or flat arrays -> list of flat python float lists (COCO json)."""
    return [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in polys]


def _segm_area(segm, height, width):
    """Pixel area of a COCO segmentation (polygon list or RLE) in an h x w image."""
    if isinstance(segm, dict):
        rle = segm
        if isinstance(rle['counts'], list):  # uncompressed RLE from json
            rle = mask_util.frPyObjects(rle, *rle['size'])
    else:
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    return float(mask_util.area(rle))


def make_coco_gt(dataset):
    """Build an in-memory pycocotools COCO from a COCO-format dict, repairing what
    COCOeval silently mis-handles. ``dataset`` is not modified.

    Repairs (each logged): annotation ids that are not unique positive ints are renumbered
    1..M (COCOeval uses id 0 as "unmatched"); missing ``iscrowd`` -> 0; missing ``area``
    -> bbox w*h; polygons with < 3 points are removed (pycocotools reads a 4-number one
    as a box and crashes), and an annotation left without any gets its box as polygon.
    """
    dataset = copy.copy(dataset)
    anns = [dict(a) for a in dataset.get('annotations', [])]
    ids = [a.get('id') for a in anns]
    if not all(isinstance(i, int) and i > 0 for i in ids) or len(set(ids)) != len(ids):
        logger.warning('Annotation ids are not unique positive integers; renumbering 1..%d '
                       'for evaluation.', len(anns))
        for i, a in enumerate(anns):
            a['id'] = i + 1
    n_area = n_poly = 0
    for a in anns:
        a.setdefault('iscrowd', 0)
        if 'area' not in a:
            a['area'] = float(a['bbox'][2] * a['bbox'][3])
            n_area += 1
        segm = a.get('segmentation')
        if isinstance(segm, list) and any(len(p) < 6 for p in segm):
            n_poly += 1
            a['segmentation'] = [p for p in segm if len(p) >= 6]
            if not a['segmentation']:
                x, y, w, h = a['bbox']
                a['segmentation'] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    if n_area:
        logger.warning("%d annotations had no 'area'; using box area for evaluation.", n_area)
    if n_poly:
        logger.warning('%d annotations had polygons with < 3 points; removed them for '
                       'evaluation.', n_poly)
    dataset['annotations'] = anns
    dataset.setdefault('info', {})
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints chatter
        coco.createIndex()
    return coco


def roidbs_to_coco_gt(roidbs, class_names):
    """Convert roidbs (this module's format) to an in-memory COCO ground truth.

    Category ids are the contiguous class ids 1..C. Images with unknown ``height``/``width``
    are read once with cv2 to get their size (needed to rasterize polygons for ``area``).
    Instances without a (valid) segmentation get their box as polygon.

    Returns:
        pycocotools.coco.COCO
    """
    images, anns = [], []
    for rdb in roidbs:
        h, w = rdb.get('height'), rdb.get('width')
        if h is None or w is None:
            h, w = read_image_size(rdb['file_name'])
        images.append({'id': rdb['image_id'], 'height': int(h), 'width': int(w),
                       'file_name': rdb['file_name']})
        boxes = np.asarray(rdb['boxes'], dtype=np.float64).reshape(-1, 4)
        segms = rdb.get('segmentation')
        crowd = rdb.get('is_crowd')
        for i, box in enumerate(boxes):
            x1, y1, x2, y2 = box.tolist()
            segm = segms[i] if segms is not None else None
            if segm is not None and not isinstance(segm, dict):
                # < 3 points: pycocotools would read a 4-number polygon as a box
                segm = [p for p in _flat_polygons(segm) if len(p) >= 6]
            if not segm:
                segm = [[x1, y1, x2, y1, x2, y2, x1, y2]]
            anns.append({'id': len(anns) + 1, 'image_id': rdb['image_id'],
                         'category_id': int(rdb['class'][i]),
                         'bbox': [x1, y1, x2 - x1, y2 - y1],
                         'iscrowd': int(crowd[i]) if crowd is not None else 0,
                         'segmentation': segm, 'area': _segm_area(segm, h, w)})
    cats = [{'id': i + 1, 'name': n} for i, n in enumerate(class_names)]
    return make_coco_gt({'images': images, 'annotations': anns, 'categories': cats})


def _to_coco_result(r, category_ids):
    """Our result dict -> COCO result dict (xywh box, original category id)."""
    c = int(r['category_id'])
    if not 1 <= c <= len(category_ids):
        raise ValueError(f'Result category_id {c} is not a class id in 1..{len(category_ids)}.')
    x1, y1, x2, y2 = (float(v) for v in r['bbox'])
    image_id = r['image_id']
    if isinstance(image_id, np.integer):  # json cannot hold numpy ints
        image_id = int(image_id)
    out = {'image_id': image_id, 'category_id': category_ids[c - 1],
           'bbox': [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
           'score': round(float(r['score']), 5)}
    if r.get('segmentation') is not None:
        rle = dict(r['segmentation'])
        if isinstance(rle['counts'], bytes):  # json cannot hold bytes
            rle['counts'] = rle['counts'].decode('ascii')
        out['segmentation'] = rle
    return out


def _run_cocoeval(coco_gt, dets, iou_type, class_names, category_ids):
    """Run COCOeval on COCO-format detections; return this iou_type's metrics dict."""
    prefix = f'mAP({iou_type})/'
    with contextlib.redirect_stdout(io.StringIO()):  # loadRes prints chatter
        coco_dt = coco_gt.loadRes(dets)
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    metrics = {prefix + n: float(ev.stats[i]) for i, n in enumerate(_STAT_NAMES)}
    # precision: (T iou thresholds, R recall points, K classes, A areas, M maxDets);
    # -1 marks "no ground truth", which must not count as AP 0.
    precision = ev.eval['precision']
    rows = []
    for k, cat_id in enumerate(ev.params.catIds):
        if cat_id not in category_ids:
            continue
        name = class_names[category_ids.index(cat_id)]
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            metrics[prefix + 'class/' + name] = float(p.mean())
        rows.append((name, f'{p.mean():.4f}' if p.size else 'n/a (no gt)'))
    _print_table(f'Per-class AP ({iou_type})', rows)
    return metrics


def _print_table(title, rows):
    width = max([len(r[0]) for r in rows] + [5])
    print(f'{title}:\n' + '\n'.join(f'  {n:<{width}}  {v}' for n, v in rows))


def evaluate_coco(coco_gt, results, class_names, category_ids=None, output=None):
    """The one COCO evaluator, for every split.

    Args:
        coco_gt (COCO): ground truth whose category ids are the dataset's original ids.
        results (list[dict]): detections in `DatasetSplit.eval_inference_results` format
            (contiguous ``category_id``, x1y1x2y2 ``bbox``, ``score``, optional RLE
            ``segmentation``).
        class_names (list[str]): C names; class c is ``class_names[c - 1]``.
        category_ids (list[int] or None): original category id of each class, i.e.
            class c -> ``category_ids[c - 1]``. Default: 1..C.
        output (str or None): write the COCO-format results json there.

    Returns:
        dict[str, float]: ``mAP(bbox)/IoU=0.5:0.95``, ``.../IoU=0.5``, ``.../IoU=0.75``,
        ``.../small``, ``.../medium``, ``.../large`` (COCO's -1 where the area range has
        no ground truth), ``mAP(bbox)/class/<name>`` per class that has ground truth, and
        the same for ``segm`` when any result has a segmentation. Empty results give
        zeros for both bbox and segm.
    """
    category_ids = list(category_ids) if category_ids is not None \
        else list(range(1, len(class_names) + 1))
    if len(category_ids) != len(class_names):
        raise ValueError(f'{len(class_names)} class names but {len(category_ids)} category ids.')
    dets = [_to_coco_result(r, category_ids) for r in results]
    if output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, 'w') as f:
            json.dump(dets, f)
        logger.info('Wrote %d COCO-format detections to %s', len(dets), output)

    if not dets:
        logger.warning('No detections to evaluate; all metrics are 0.')
        with_gt = {a['category_id'] for a in coco_gt.dataset['annotations']}
        keys = _STAT_NAMES + [f'class/{n}' for n, c in zip(class_names, category_ids)
                              if c in with_gt]
        return {f'mAP({t})/{k}': 0.0 for t in ('bbox', 'segm') for k in keys}

    unknown = {d['image_id'] for d in dets} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f'{len(unknown)} result image_id(s) are not in the ground truth, '
                         f'e.g. {sorted(unknown, key=str)[:5]}.')
    box_dets = [{k: v for k, v in d.items() if k != 'segmentation'} for d in dets]
    metrics = _run_cocoeval(coco_gt, box_dets, 'bbox', class_names, category_ids)
    segm_dets = [{k: v for k, v in d.items() if k != 'bbox'} for d in dets if 'segmentation' in d]
    if segm_dets:
        if len(segm_dets) != len(dets):
            logger.warning('Only %d of %d results have a segmentation; segm AP uses those only.',
                           len(segm_dets), len(dets))
        metrics.update(_run_cocoeval(coco_gt, segm_dets, 'segm', class_names, category_ids))
    return metrics
