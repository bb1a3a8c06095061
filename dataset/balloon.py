"""The balloon dataset (VIA polygon annotations): ``basedir/{train,val}/via_region_data.json``."""
import collections
import json
import logging
import os

import numpy as np

from .dataset import (DatasetError, DatasetRegistry, DatasetSplit, evaluate_coco,
                      roidbs_to_coco_gt)

logger = logging.getLogger(__name__)

__all__ = ['BalloonDataset', 'register_balloon', 'load_via_json']

CLASS_NAMES = ['balloon']


def _regions(entry):
    """VIA ``regions`` is a dict {"0": region, ...} in VIA 1.x exports, a list in others."""
    regions = entry.get('regions') or []
    return list(regions.values()) if isinstance(regions, dict) else list(regions)


def load_via_json(json_file, image_dir, class_id=1):
    """Read a VIA 1.x region json (or a VIA 2.x project's ``_via_img_metadata``).

    Every polygon region becomes one instance of ``class_id``. Regions that are not
    polygons or have fewer than 3 points are dropped, counted and logged.

    Returns:
        list[dict]: roidbs (dataset/dataset.py format) in json order, ``image_id`` 1..N,
        ``height``/``width`` None (VIA does not store them; read lazily when needed).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f'VIA annotation file not found: {json_file!r}')
    with open(json_file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f'{json_file!r} is not valid json: {e}') from None
    data = data.get('_via_img_metadata', data)
    dropped = collections.Counter()
    roidbs = []
    for key, entry in data.items():
        if 'filename' not in entry:
            raise DatasetError(f"{json_file!r}: entry {key!r} has no 'filename'; "
                             'is this a VIA 1.x region json?')
        polys = []
        for region in _regions(entry):
            shape = region.get('shape_attributes', {})
            if shape.get('name', 'polygon') not in ('polygon', 'polyline'):
                dropped[f"unsupported shape {shape.get('name')!r}"] += 1
                continue
            px, py = shape.get('all_points_x', []), shape.get('all_points_y', [])
            if len(px) != len(py):
                dropped['polygon with different x and y counts'] += 1
                continue
            # +0.5: VIA points are pixel indices; pixel i is centred at i + 0.5.
            poly = np.stack([px, py], axis=1).astype(np.float32).reshape(-1, 2) + 0.5
            if len(poly) < 3:
                dropped['polygon with < 3 points'] += 1
                continue
            polys.append(poly)
        boxes = np.asarray([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()]
                            for p in polys], dtype=np.float32).reshape(-1, 4)
        roidbs.append({
            'file_name': os.path.join(image_dir, entry['filename']),
            'image_id': len(roidbs) + 1, 'height': None, 'width': None,
            'boxes': boxes,
            'class': np.full(len(polys), class_id, dtype=np.int32),
            'is_crowd': np.zeros(len(polys), dtype=np.int8),
            'segmentation': [[p] for p in polys]})
    if dropped:
        logger.warning('%s: dropped regions: %s', json_file,
                       ', '.join(f'{n} {r}' for r, n in sorted(dropped.items())))
    return roidbs


class BalloonDataset(DatasetSplit):
    """One split folder of the balloon dataset: images + ``via_region_data.json``."""

    def __init__(self, split_dir):
        """split_dir (str): folder holding the images and ``via_region_data.json``."""
        self.split_dir = os.path.abspath(os.path.expanduser(split_dir))
        json_file = os.path.join(self.split_dir, 'via_region_data.json')
        self._roidbs = load_via_json(json_file, self.split_dir)
        self._coco_gt = None

    def training_roidbs(self):
        """Roidbs with one class ('balloon' = 1) and one polygon per instance."""
        return self._roidbs

    def inference_roidbs(self):
        """All images: dicts with ``file_name``, ``image_id``, ``height``, ``width``."""
        return [{k: r[k] for k in ('file_name', 'image_id', 'height', 'width')}
                for r in self._roidbs]

    def eval_inference_results(self, results, output=None):
        """See `DatasetSplit.eval_inference_results`. Builds the COCO ground truth from
        the roidbs once (reading each image once for its size)."""
        if self._coco_gt is None:
            self._coco_gt = roidbs_to_coco_gt(self._roidbs, CLASS_NAMES)
        return evaluate_coco(self._coco_gt, results, CLASS_NAMES, output=output)


def register_balloon(basedir):
    """Register ``balloon_train`` and ``balloon_val`` (``basedir/train``, ``basedir/val``)
    with class_names ['balloon']. Nothing is read now; a missing folder or json raises
    FileNotFoundError naming it when the split is used."""
    basedir = os.path.expanduser(basedir)
    for split in ('train', 'val'):
        name = f'balloon_{split}'
        DatasetRegistry.register(
            name, lambda d=os.path.join(basedir, split): BalloonDataset(d))
        DatasetRegistry.register_metadata(name, 'class_names', list(CLASS_NAMES))
