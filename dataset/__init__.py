"""Datasets: the `DatasetSplit` interface, the `DatasetRegistry`, and the built-in splits
(COCO-format json, balloon VIA json, synthetic shapes). See dataset/dataset.py for the
roidb format."""
from .balloon import register_balloon
from .coco import register_coco, register_coco_json
from .dataset import DatasetError, DatasetRegistry, DatasetRegistryError, DatasetSplit
from .shapes import register_shapes

__all__ = ["DatasetSplit", "DatasetRegistry", "DatasetRegistryError", "DatasetError",
           "register_coco",
           "register_coco_json", "register_balloon", "register_shapes",
           "register_builtin_datasets"]


def register_builtin_datasets(basedir):
    """Register every built-in split; nothing is read or generated until a split is used.

    - ``coco_*`` standard splits under ``basedir`` (``basedir/annotations/instances_*.json``),
    - ``balloon_train`` / ``balloon_val`` under ``basedir`` (``basedir/{train,val}``),
    - ``shapes_train``, ``shapes_val``, ``shapes_dense_train``, ``shapes_dense_val``.

    Both COCO and balloon read ``basedir`` (set DATA.BASEDIR to the folder of the one you
    use); a missing file raises FileNotFoundError naming it when that split is used.
    """
    register_coco(basedir)
    register_balloon(basedir)
    register_shapes()
