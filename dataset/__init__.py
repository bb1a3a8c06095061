"""Datasets: the `DatasetSplit` interface, the `DatasetRegistry`, and the built-in splits
(COCO-format json, balloon VIA json, synthetic shapes). See dataset/dataset.py for the
roidb format."""
import logging
import os

from .balloon import register_balloon
from .coco import _load_json, register_coco, register_coco_json, unused_categories
from .dataset import DatasetError, DatasetRegistry, DatasetRegistryError, DatasetSplit
from .shapes import register_shapes

__all__ = ['DatasetSplit', 'DatasetRegistry', 'DatasetRegistryError', 'DatasetError',
           'register_coco',
           'register_coco_json', 'register_balloon', 'register_shapes',
           'register_builtin_datasets']

logger = logging.getLogger(__name__)


def register_builtin_datasets(basedir, coco_json_splits=(), train_names=(), drop_unused=True):
    """Register every built-in split; nothing is read or generated until a split is used.

    - ``coco_*`` standard splits under ``basedir`` (``basedir/annotations/instances_*.json``),
    - ``balloon_train`` / ``balloon_val`` under ``basedir`` (``basedir/{train,val}``),
    - ``shapes_train``, ``shapes_val``, ``shapes_dense_train``, ``shapes_dense_val``,
    - each ``[name, json_file, image_dir]`` of ``coco_json_splits``
      (``cfg.DATA.COCO_JSON_SPLITS``) with `register_coco_json` (its json is read now,
      for the class names; ``~`` is expanded).

    A category of those jsons that no annotation of the ``train_names`` splits uses is
    logged as a warning and, with ``drop_unused`` (cfg.DATA.DROP_UNUSED_CATEGORIES), left
    out of the classes of every json split (train and val alike, so class ids agree).

    Both COCO and balloon read ``basedir`` (set DATA.BASEDIR to the folder of the one you
    use); a missing file raises FileNotFoundError naming it when that split is used.
    """
    register_coco(basedir)
    register_balloon(basedir)
    register_shapes()
    entries = []
    for entry in coco_json_splits:
        if len(entry) != 3 or not all(isinstance(v, str) for v in entry):
            raise DatasetRegistryError(
                'DATA.COCO_JSON_SPLITS entries are [name, json file, image folder]; got {!r}.'
                .format(entry))
        entries.append([entry[0]] + [os.path.expanduser(v) for v in entry[1:]])
    drop = _unused_training_categories(entries, train_names, drop_unused)
    for name, json_file, image_dir in entries:
        register_coco_json(name, json_file, image_dir, drop_category_ids=drop)


def _unused_training_categories(entries, train_names, drop_unused):
    """Ids of the categories that no annotation of the training json splits uses (logged);
    empty unless ``drop_unused``, or if no category would be left."""
    datasets = [_load_json(json_file) for name, json_file, _ in entries if name in train_names]
    if not datasets:
        return set()
    unused = {c['id']: c['name'] for c in unused_categories(datasets[0])}
    for data in datasets[1:]:  # used by any training split: a class
        unused = {i: n for i, n in unused.items() if i in
                  {c['id'] for c in unused_categories(data)}}
    if not unused or len(unused) == len(datasets[0].get('categories', [])):
        return set()  # no annotation at all: data.py reports that training has no images
    listed = ', '.join('{} "{}"'.format(i, n) for i, n in sorted(unused.items()))
    if not drop_unused:
        logger.warning('Categories used by no training annotation: %s. They stay classes '
                       'with no data (DATA.DROP_UNUSED_CATEGORIES=True leaves them out).',
                       listed)
        return set()
    logger.warning('Categories used by no training annotation: %s. Left out of the classes '
                   '(DATA.DROP_UNUSED_CATEGORIES=False keeps them).', listed)
    return set(unused)
