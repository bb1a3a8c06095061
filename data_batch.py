"""Several training images per device: aspect-ratio groups padded into one batch.

`TrainingDataPreprocessor` (data.py) still prepares each image alone, in the worker
processes; this module groups its outputs N at a time, landscape with landscape and
portrait with portrait (detectron2's aspect-ratio grouping, so the padding stays small),
and pads each group into the batched graph inputs of NOTES.md ("Several images per
device"). NumPy only: the graph side is ``modeling/batching.py``.
"""
import numpy as np

__all__ = ['pad_batch', 'AspectRatioGroups']


def _fill_value(name):
    # padded anchor cells are ignored (-1); padded instances have class 0, i.e. none
    return -1 if name.startswith('anchor_labels') else 0


def pad_batch(datapoints, names):
    """Pad N preprocessed images (dicts of the single-image inputs) into one batch.

    Args:
        datapoints: list of N dicts as `TrainingDataPreprocessor` returns them.
        names: the batched input names (``input_names(..., batched=True)``), in order.
    Returns:
        list, in the order of ``names``: each input stacked to [N, ...] and padded to the
        largest shape of the group (images with zeros, anchor labels with -1, ground truth
        with zeros and class 0), and ``image_sizes`` int32 [N, 2] true (h, w).
    """
    out = []
    for name in names:
        if name == 'image_sizes':
            out.append(np.array([dp['image'].shape[:2] for dp in datapoints], np.int32))
            continue
        arrays = [dp[name] for dp in datapoints]
        shape = np.max([a.shape for a in arrays], axis=0)
        batch = np.full((len(arrays),) + tuple(shape), _fill_value(name), arrays[0].dtype)
        for i, a in enumerate(arrays):
            batch[(i,) + tuple(slice(0, s) for s in a.shape)] = a
        out.append(batch)
    return out


class AspectRatioGroups:
    """Collect images into groups of ``size`` with the same orientation (h <= w or not).

    ``add(dp)`` returns a full group (list of ``size`` datapoints) when the datapoint's
    group fills, else None. At most 2 x (size - 1) datapoints wait at any time.
    """

    def __init__(self, size):
        self.size = size
        self._waiting = {False: [], True: []}

    def add(self, datapoint):
        height, width = datapoint['image'].shape[:2]
        group = self._waiting[bool(height > width)]
        group.append(datapoint)
        if len(group) < self.size:
            return None
        full = list(group)
        group.clear()
        return full
