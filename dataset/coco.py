"""COCO-format datasets: any ``instances_*.json`` + image folder, and the standard COCO splits."""
import collections
import json
import logging
import os

import cv2
import numpy as np
from pycocotools import mask as mask_util

from .dataset import DatasetError, DatasetRegistry, DatasetSplit, evaluate_coco, make_coco_gt

logger = logging.getLogger(__name__)

__all__ = ['COCODetection', 'register_coco', 'register_coco_json', 'unused_categories',
           'COCO_CLASS_NAMES', 'COCO_CATEGORY_IDS']

# The 80 COCO class names in the order of their category ids (1..90 with gaps).
COCO_CLASS_NAMES = [
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat',
    'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack',
    'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball',
    'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket',
    'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse',
    'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier',
    'toothbrush']
# Their category ids in the COCO jsons: 1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]

# split name -> image folder; minival/valminusminival are subsets of val2014's images.
_STANDARD_SPLITS = {'train2017': 'train2017', 'val2017': 'val2017',
                    'train2014': 'train2014', 'val2014': 'val2014',
                    'minival2014': 'val2014', 'valminusminival2014': 'val2014'}


def _load_json(json_file):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f'COCO annotation file not found: {json_file!r}')
    with open(json_file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f'{json_file!r} is not valid json: {e}') from None


def _sorted_categories(dataset, json_file, drop_ids=()):
    """The json's categories sorted by id, without those whose id is in ``drop_ids``."""
    cats = [c for c in sorted(dataset.get('categories', []), key=lambda c: c['id'])
            if c['id'] not in drop_ids]
    if not cats:
        raise DatasetError(f"{json_file!r} has no 'categories'.")
    return cats


def unused_categories(dataset):
    """Categories (json dicts, sorted by id) that no annotation of a COCO-format dict uses,
    e.g. Roboflow's parent class or labelme's ``_background_``."""
    used = {a.get('category_id') for a in dataset.get('annotations', [])}
    return [c for c in sorted(dataset.get('categories', []), key=lambda c: c['id'])
            if c['id'] not in used]


def _rle_to_polygons(rle):
    """Decode a COCO RLE into a list of float32 (K, 2) polygons of its outer contours."""
    if isinstance(rle['counts'], list):
        rle = mask_util.frPyObjects(rle, *rle['size'])
    mask = mask_util.decode(rle)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # +0.5: contour points are pixel indices; their centers in float coordinates.
    return [c.reshape(-1, 2).astype(np.float32) + 0.5 for c in contours if len(c) >= 3]


class COCODetection(DatasetSplit):
    """A COCO-format json and its image folder.

    The json's category ids (any ints, e.g. 0-based or with gaps) are mapped, in sorted
    order, to contiguous class ids 1..C; results are mapped back for evaluation. Categories
    in ``drop_category_ids`` are no class (their annotations, if any, are dropped).

    Annotation handling (counted per reason in ``self.dropped`` and logged once):
    boxes [x, y, w, h] with w < 1 or h < 1, or nothing left after clipping to the image,
    are dropped; polygons with < 3 points are dropped, and the annotation too if none is
    left; a non-crowd RLE is converted to polygons; an annotation without segmentation
    is kept with ``[]`` (detection-only data); crowd annotations keep their RLE.
    """

    def __init__(self, json_file, image_dir, name=None, drop_category_ids=()):
        """
        Args:
            json_file (str): COCO instances json.
            image_dir (str): folder that the images' ``file_name`` are relative to.
            name (str or None): for log messages.
            drop_category_ids: category ids left out of the classes (e.g. unused ones).
        """
        self.json_file = os.path.abspath(os.path.expanduser(json_file))
        self.image_dir = os.path.abspath(os.path.expanduser(image_dir))
        self.name = name or os.path.basename(self.json_file)
        self._dataset = _load_json(self.json_file)
        cats = _sorted_categories(self._dataset, self.json_file, set(drop_category_ids))
        self.category_ids = [c['id'] for c in cats]  # class c -> category_ids[c - 1]
        self.class_names = [c['name'] for c in cats]
        self._cat_to_class = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self._dropped_ids = set(drop_category_ids)
        self._roidbs = None
        self._coco_gt = None

    def _image_entries(self):
        """Roidbs with only the image fields, in json order."""
        out = []
        for img in self._dataset.get('images', []):
            out.append({'file_name': os.path.join(self.image_dir, img['file_name']),
                        'image_id': img['id'],
                        'height': int(img['height']) if 'height' in img else None,
                        'width': int(img['width']) if 'width' in img else None})
        return out

    def _convert_annotation(self, ann, height, width, dropped):
        """One json annotation -> (box [x1, y1, x2, y2], class, is_crowd, segmentation),
        or None if it is dropped.

        ``dropped`` (Counter) counts, by reason, dropped annotations and polygons and
        annotations kept after a change (reasons starting with "(kept)").
        """
        cls = self._cat_to_class.get(ann.get('category_id'))
        if cls is None:
            dropped['category left out of the classes' if ann.get('category_id') in
                    self._dropped_ids else 'unknown category_id'] += 1
            return None
        x, y, w, h = (float(v) for v in ann['bbox'])
        if w < 1 or h < 1:
            dropped['box smaller than 1 pixel'] += 1
            return None
        x1, y1, x2, y2 = x, y, x + w, y + h
        if width is not None and height is not None:
            # Python floats, not np.clip: this runs ~1M times on COCO (3x faster start-up)
            x1, x2 = min(max(x1, 0.), width), min(max(x2, 0.), width)
            y1, y2 = min(max(y1, 0.), height), min(max(y2, 0.), height)
            if x2 - x1 < 1 or y2 - y1 < 1:
                dropped['box outside the image'] += 1
                return None
        crowd = int(ann.get('iscrowd', 0))
        segm = ann.get('segmentation')
        if isinstance(segm, dict):
            if not crowd:  # roidb contract: normal instances are polygons
                segm = _rle_to_polygons(segm)
                if not segm:
                    dropped['no valid polygon'] += 1
                    return None
                dropped['(kept) non-crowd RLE converted to polygons'] += 1
        elif segm:
            polys = [np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in segm]
            segm = [p for p in polys if len(p) >= 3]
            if len(segm) < len(polys):
                dropped['polygon with < 3 points (polygon only)'] += len(polys) - len(segm)
            if not segm:
                dropped['no valid polygon'] += 1
                return None
        else:
            dropped['(kept) annotation without segmentation'] += 1
            segm = []
        return [x1, y1, x2, y2], cls, crowd, segm

    def training_roidbs(self):
        """All images (also those without annotations), with their instances.

        Returns:
            list[dict]: roidbs as documented in dataset/dataset.py.
        """
        if self._roidbs is not None:
            return self._roidbs
        by_image = collections.defaultdict(list)
        for ann in self._dataset.get('annotations', []):
            by_image[ann['image_id']].append(ann)
        dropped = collections.Counter()
        roidbs = self._image_entries()
        for rdb in roidbs:
            insts = [self._convert_annotation(a, rdb['height'], rdb['width'], dropped)
                     for a in by_image.pop(rdb['image_id'], [])]
            insts = [i for i in insts if i is not None]
            rdb['boxes'] = np.asarray([i[0] for i in insts], dtype=np.float32).reshape(-1, 4)
            rdb['class'] = np.asarray([i[1] for i in insts], dtype=np.int32)
            rdb['is_crowd'] = np.asarray([i[2] for i in insts], dtype=np.int8)
            rdb['segmentation'] = [i[3] for i in insts]
        orphans = sum(len(v) for v in by_image.values())
        if orphans:
            dropped["image_id not in 'images'"] += orphans
        if dropped:
            logger.warning('%s: annotations dropped or changed: %s', self.name, ', '.join(
                f'{n} {reason}' for reason, n in sorted(dropped.items())))
        self.dropped = dict(dropped)  # reason -> count, for tests and curious users
        n_inst = sum(len(r['class']) for r in roidbs)
        logger.info('%s: loaded %d images, %d instances from %s', self.name, len(roidbs),
                    n_inst, self.json_file)
        self._roidbs = roidbs
        return roidbs

    def inference_roidbs(self):
        """All images in json order: dicts with ``file_name``, ``image_id``, ``height``, ``width``."""
        return self._image_entries()

    def eval_inference_results(self, results, output=None):
        """See `DatasetSplit.eval_inference_results`; ground truth is this json."""
        if self._coco_gt is None:
            self._coco_gt = make_coco_gt(self._dataset)
        return evaluate_coco(self._coco_gt, results, self.class_names, self.category_ids,
                             output)


def register_coco_json(name, json_file, image_dir, class_names=None, category_ids=None,
                       drop_category_ids=()):
    """Register a COCO-format split and its ``class_names`` and ``category_ids`` metadata
    (class c is named ``class_names[c - 1]`` and has the json id ``category_ids[c - 1]``).

    The json is read once here to take them from its ``categories`` (sorted by id, without
    ``drop_category_ids``), unless ``class_names`` is given, in which case nothing is read
    until the split is used; then a mismatch with the json replaces the metadata (logged),
    and ``category_ids`` (None: unknown until then) is registered.

    Raises:
        FileNotFoundError: ``class_names`` is None and ``json_file`` does not exist.
    """
    if class_names is None:
        cats = _sorted_categories(_load_json(json_file), json_file, set(drop_category_ids))
        class_names, category_ids = [c['name'] for c in cats], [c['id'] for c in cats]

    def factory():
        split = COCODetection(json_file, image_dir, name=name,
                              drop_category_ids=drop_category_ids)
        if split.class_names != DatasetRegistry.get_metadata(name, 'class_names'):
            logger.warning('%s: class names in %s differ from the registered ones; '
                           "using the json's.", name, json_file)
            DatasetRegistry.register_metadata(name, 'class_names', split.class_names)
        DatasetRegistry.register_metadata(name, 'category_ids', split.category_ids)
        return split

    DatasetRegistry.register(name, factory)
    DatasetRegistry.register_metadata(name, 'class_names', list(class_names))
    if category_ids is not None:
        DatasetRegistry.register_metadata(name, 'category_ids', list(category_ids))


def register_coco(basedir):
    """Register the standard COCO splits ``coco_train2017``, ``coco_val2017``,
    ``coco_train2014``, ``coco_val2014``, ``coco_minival2014``, ``coco_valminusminival2014``.

    Expects ``basedir/annotations/instances_<split>.json`` and images in ``basedir/<split>``
    (val2014 for the minival splits). Nothing is read now; a missing file raises
    FileNotFoundError naming it when the split is used. Metadata ``class_names`` is the
    80 standard names (replaced by the json's if they differ, once loaded).
    """
    basedir = os.path.expanduser(basedir)
    for split, image_folder in _STANDARD_SPLITS.items():
        register_coco_json(f'coco_{split}',
                           os.path.join(basedir, 'annotations', f'instances_{split}.json'),
                           os.path.join(basedir, image_folder), class_names=COCO_CLASS_NAMES,
                           category_ids=COCO_CATEGORY_IDS)
