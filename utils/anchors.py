"""Anchor boxes in NumPy, shared by the data pipeline (targets) and the graph (constants).

Boxes use the floating-point convention: pixel i covers [i, i+1), so an anchor of
stride s at feature cell (y, x) is centred at ((x + 0.5) * s, (y + 0.5) * s).
"""
import functools

import numpy as np


def cell_anchors(stride, sizes, ratios):
    """Anchors of one feature cell.

    Args:
        stride (int): feature stride in pixels.
        sizes (sequence of float): anchor sqrt(area) in pixels.
        ratios (sequence of float): height / width.
    Returns:
        float32 [len(sizes) * len(ratios), 4] x1y1x2y2, centred at (stride/2, stride/2),
        ordered size-major (all ratios of sizes[0] first).
    """
    sizes = np.asarray(sizes, dtype=np.float64)[:, None]
    ratios = np.asarray(ratios, dtype=np.float64)[None, :]
    w = (sizes / np.sqrt(ratios)).reshape(-1)  # w * h = size^2, h / w = ratio
    h = (sizes * np.sqrt(ratios)).reshape(-1)
    c = stride / 2.
    return np.stack([c - w / 2, c - h / 2, c + w / 2, c + h / 2], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _all_anchors_cached(stride, sizes, ratios, max_size):
    field = int(np.ceil(max_size / stride))
    shifts = np.arange(field, dtype=np.float32) * stride
    sx, sy = np.meshgrid(shifts, shifts)  # [field, field] each: x varies along axis 1
    shifts = np.stack([sx, sy, sx, sy], axis=-1)[:, :, None, :]  # [F, F, 1, 4]
    anchors = shifts + cell_anchors(stride, sizes, ratios)[None, None]
    anchors.setflags(write=False)  # shared cache entry
    return anchors


def get_all_anchors(stride, sizes, ratios, max_size):
    """All anchors of a feature map of stride ``stride`` covering a max_size^2 image.

    Args:
        max_size (int): the largest (padded) image side the anchors must cover.
    Returns:
        read-only float32 [F, F, A, 4], F = ceil(max_size / stride), A = len(sizes) *
        len(ratios); element [y, x, a] is anchor a of cell (y, x). Slice [:h, :w] for a
        feature map of h x w cells.
    """
    return _all_anchors_cached(int(stride), tuple(float(s) for s in sizes),
                               tuple(float(r) for r in ratios), int(max_size))


def get_all_anchors_fpn(strides, sizes, ratios, max_size):
    """One ``get_all_anchors`` per FPN level, with one anchor size per level.

    Returns:
        list of read-only float32 [F_l, F_l, len(ratios), 4].
    """
    assert len(strides) == len(sizes), (strides, sizes)
    return [get_all_anchors(s, (size,), ratios, max_size) for s, size in zip(strides, sizes)]


def padded_size(size, multiple):
    """Smallest multiple of ``multiple`` >= size: the graph pads images to this."""
    return int(np.ceil(size / multiple) * multiple)
