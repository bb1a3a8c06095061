"""Box area, IoU and IoA in NumPy, plus a chunked anchor-to-ground-truth matcher.

Boxes are float32 [N, 4] x1y1x2y2 in the floating-point convention (pixel i covers
[i, i+1)), so a box's width is x2 - x1 (no +1). The graph-side versions live in
``modeling/model_box.py``.
"""
import numpy as np

__all__ = ['area', 'pairwise_iou', 'pairwise_ioa', 'max_iou_over_gt', 'anchors_at_gt_max']


def _as_boxes(boxes):
    boxes = np.asarray(boxes, dtype=np.float32)
    assert boxes.ndim == 2 and boxes.shape[1] == 4, boxes.shape
    return boxes


def area(boxes):
    """float32 [N, 4] -> float32 [N]."""
    boxes = _as_boxes(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _pairwise_intersection(boxes1, boxes2):
    """float32 [N, M] intersection areas, written in place to hold only two [N, M] arrays."""
    inter = np.minimum(boxes1[:, None, 2], boxes2[None, :, 2])
    inter -= np.maximum(boxes1[:, None, 0], boxes2[None, :, 0])
    np.maximum(inter, 0., out=inter)
    height = np.minimum(boxes1[:, None, 3], boxes2[None, :, 3])
    height -= np.maximum(boxes1[:, None, 1], boxes2[None, :, 1])
    np.maximum(height, 0., out=height)
    inter *= height
    return inter


def pairwise_iou(boxes1, boxes2):
    """Intersection over union of every pair.

    Args:
        boxes1: [N, 4], boxes2: [M, 4].
    Returns:
        float32 [N, M]; 0 where the union is 0. Peak memory is about 3 [N, M] arrays:
        for many boxes against many boxes use ``max_iou_over_gt``.
    """
    boxes1, boxes2 = _as_boxes(boxes1), _as_boxes(boxes2)
    inter = _pairwise_intersection(boxes1, boxes2)
    union = area(boxes1)[:, None] + area(boxes2)[None, :]
    union -= inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def pairwise_ioa(boxes1, boxes2):
    """Intersection over the area of ``boxes2`` (e.g. how much of a crowd box covers it).

    Args:
        boxes1: [N, 4], boxes2: [M, 4].
    Returns:
        float32 [N, M]: inter(i, j) / area(boxes2[j]); 0 where that area is 0.
    """
    boxes1, boxes2 = _as_boxes(boxes1), _as_boxes(boxes2)
    inter = _pairwise_intersection(boxes1, boxes2)
    area2 = np.broadcast_to(area(boxes2)[None, :], inter.shape)
    return np.divide(inter, area2, out=np.zeros_like(inter), where=area2 > 0)


def max_iou_over_gt(anchors, gt_boxes, chunk=64):
    """Best ground truth for every anchor and best anchor IoU for every ground truth.

    Equivalent to ``iou = pairwise_iou(anchors, gt_boxes)`` followed by
    ``iou.max(1), iou.argmax(1), iou.max(0)``, but the IoU is computed ``chunk`` ground-truth
    boxes at a time, so peak extra memory is about 3 * A * chunk * 4 bytes instead of
    O(A * G): dense scenes with thousands of instances do not run out of memory.

    Args:
        anchors: float32 [A, 4].
        gt_boxes: float32 [G, 4], G >= 1.
        chunk (int): ground-truth boxes per chunk.
    Returns:
        anchor_max_iou: float32 [A], the largest IoU of each anchor with any ground truth.
        anchor_argmax: int64 [A], the index of that ground truth (the first one on ties).
        gt_max_iou: float32 [G], the largest IoU of each ground truth with any anchor.
    """
    anchors, gt_boxes = _as_boxes(anchors), _as_boxes(gt_boxes)
    assert len(gt_boxes) > 0 and chunk > 0, (len(gt_boxes), chunk)
    anchor_max_iou = np.full(len(anchors), -1., dtype=np.float32)
    anchor_argmax = np.zeros(len(anchors), dtype=np.int64)
    gt_max_iou = np.zeros(len(gt_boxes), dtype=np.float32)
    for start in range(0, len(gt_boxes), chunk):
        iou = pairwise_iou(anchors, gt_boxes[start:start + chunk])  # [A, chunk]
        if len(anchors):
            gt_max_iou[start:start + chunk] = iou.max(axis=0)
        best = iou.argmax(axis=1)
        best_iou = iou[np.arange(len(anchors)), best]
        better = best_iou > anchor_max_iou  # strict: earlier chunks win ties, like argmax
        anchor_max_iou[better] = best_iou[better]
        anchor_argmax[better] = best[better] + start
    return anchor_max_iou, anchor_argmax, gt_max_iou


def anchors_at_gt_max(anchors, gt_boxes, gt_max_iou, chunk=64):
    """Anchors that are (one of) the best match of some ground truth.

    The RPN labels these foreground even below the positive threshold, so every object
    gets an anchor. Ground truths whose best IoU is 0 are skipped (otherwise every anchor
    would tie with them). Chunked like ``max_iou_over_gt``.

    Args:
        anchors: float32 [A, 4]; gt_boxes: float32 [G, 4].
        gt_max_iou: float32 [G], as returned by ``max_iou_over_gt``.
    Returns:
        bool [A].
    """
    anchors, gt_boxes = _as_boxes(anchors), _as_boxes(gt_boxes)
    gt_max_iou = np.asarray(gt_max_iou, dtype=np.float32)
    ret = np.zeros(len(anchors), dtype=bool)
    for start in range(0, len(gt_boxes), chunk):
        iou = pairwise_iou(anchors, gt_boxes[start:start + chunk])
        best = gt_max_iou[start:start + chunk]
        ret |= ((iou == best[None, :]) & (best[None, :] > 0)).any(axis=1)
    return ret
