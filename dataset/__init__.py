"""Datasets: the `DatasetSplit` interface, the `DatasetRegistry`, and the built-in splits
(COCO-format json, balloon VIA json, synthetic shapes). See dataset/dataset.py for the
roidb format."""
import os

from .balloon import register_balloon
from .coco import register_coco, register_coco_json
from .dataset import DatasetError, DatasetRegistry, DatasetRegistryError, DatasetSplit
from .shapes import register_shapes

__all__ = ["DatasetSplit", "DatasetRegistry", "DatasetRegistryError", "DatasetError",
           "register_coco",
           "register_coco_json", "register_balloon", "register_shapes",
           "register_builtin_datasets"]


def register_builtin_datasets(basedir, coco_json_splits=()):
    """Register every built-in split; nothing is read or generated until a split is used.

    - ``coco_*`` standard splits under ``basedir`` (``basedir/annotations/instances_*.json``),
    - ``balloon_train`` / ``balloon_val`` under ``basedir`` (``basedir/{train,val}``),
    - ``shapes_train``, ``shapes_val``, ``shapes_dense_train``, ``shapes_dense_val``,
    - each ``[name, json_file, image_dir]`` of ``coco_json_splits``
      (``cfg.DATA.COCO_JSON_SPLITS``) with `register_coco_json` (its json is read now,
      for the class names; ``~`` is expanded).

    Both COCO and balloon read ``basedir`` (set DATA.BASEDIR to the folder of the one you
    use); a missing file raises FileNotFoundError naming it when that split is used.
    """
    register_coco(basedir)
    register_balloon(basedir)
    register_shapes()
    for entry in coco_json_splits:
        if len(entry) != 3 or not all(isinstance(v, str) for v in entry):
            raise DatasetRegistryError(
                'DATA.COCO_JSON_SPLITS entries are [name, json file, image folder]; got {!r}.'
                .format(entry))
        name, json_file, image_dir = entry
        register_coco_json(name, os.path.expanduser(json_file), os.path.expanduser(image_dir))
