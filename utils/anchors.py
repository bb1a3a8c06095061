"""Anchor boxes in NumPy, shared by the data pipeline (targets) and the graph (constants).

Boxes use the floating-point convention: pixel i covers [i, i+1). The anchors of stride s
at feature cell (y, x) are centred at ((x + offset) * s, (y + offset) * s), ``offset`` being
cfg.RPN.ANCHOR_OFFSET: 0 in tensorpack's and detectron2's layout, 0.5 in the layout this
project used before (cell centres). Callers pass it explicitly (no config import here).
"""
import functools

import numpy as np


def cell_anchors(stride, sizes, ratios, offset):
    """Anchors of feature cell (0, 0).

    Args:
        stride (int): feature stride in pixels.
        sizes (sequence of float): anchor sqrt(area) in pixels.
        ratios (sequence of float): height / width.
        offset (float): the centre in strides, e.g. 0 (tensorpack) or 0.5.
    Returns:
        float32 [len(sizes) * len(ratios), 4] x1y1x2y2, centred at (offset * stride,
        offset * stride), ordered size-major (all ratios of sizes[0] first).
    """
    sizes = np.asarray(sizes, dtype=np.float64)[:, None]
    ratios = np.asarray(ratios, dtype=np.float64)[None, :]
    # w * h = size^2, h / w = ratio; computed in this order so that the float32 anchors
    # equal tensorpack's bit for bit
    w = np.sqrt(sizes * sizes / ratios)
    h = (ratios * w).reshape(-1)
    w = w.reshape(-1)
    c = offset * stride
    return np.stack([c - w / 2, c - h / 2, c + w / 2, c + h / 2], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _all_anchors_cached(stride, sizes, ratios, max_size, offset):
    field = int(np.ceil(max_size / stride))
    shifts = np.arange(field, dtype=np.float32) * stride
    sx, sy = np.meshgrid(shifts, shifts)  # [field, field] each: x varies along axis 1
    shifts = np.stack([sx, sy, sx, sy], axis=-1)[:, :, None, :]  # [F, F, 1, 4]
    anchors = shifts + cell_anchors(stride, sizes, ratios, offset)[None, None]
    anchors.setflags(write=False)  # shared cache entry
    return anchors


def get_all_anchors(stride, sizes, ratios, max_size, offset):
    """All anchors of a feature map of stride ``stride`` covering a max_size^2 image.

    Args:
        max_size (int): the largest (padded) image side the anchors must cover.
        offset (float): cfg.RPN.ANCHOR_OFFSET (see the module docstring).
    Returns:
        read-only float32 [F, F, A, 4], F = ceil(max_size / stride), A = len(sizes) *
        len(ratios); element [y, x, a] is anchor a of cell (y, x). Slice [:h, :w] for a
        feature map of h x w cells.
    """
    return _all_anchors_cached(int(stride), tuple(float(s) for s in sizes),
                               tuple(float(r) for r in ratios), int(max_size), float(offset))


def get_all_anchors_fpn(strides, sizes, ratios, max_size, offset):
    """One ``get_all_anchors`` per FPN level, with one anchor size per level.

    Returns:
        list of read-only float32 [F_l, F_l, len(ratios), 4].
    """
    assert len(strides) == len(sizes), (strides, sizes)
    return [get_all_anchors(s, (size,), ratios, max_size, offset)
            for s, size in zip(strides, sizes)]


def padded_size(size, multiple):
    """Smallest multiple of ``multiple`` >= size: the graph pads images to this."""
    return int(np.ceil(size / multiple) * multiple)
