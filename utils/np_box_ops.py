"""Box area, IoU and IoA in NumPy, plus a spatially indexed anchor-to-ground-truth matcher.

Boxes are float32 [N, 4] x1y1x2y2 in the floating-point convention (pixel i covers
[i, i+1)), so a box's width is x2 - x1 (no +1). The graph-side versions live in
``modeling/model_box.py``.

Dense scenes: the matcher never forms an (anchors x gt) matrix. Ground truths are grouped
into spatially compact chunks, and each chunk is compared only with the anchors that can
overlap its bounding extent (found with `_BoxIndex`), so the work is about the number of
(anchor, gt) pairs that actually overlap, and memory is bounded by ``max_pairs``.
"""
import numpy as np

__all__ = ['area', 'pairwise_iou', 'pairwise_ioa', 'max_iou_over_gt',
           'max_coverage']

# (box, gt) pairs per IoU block: ~16 MB per float32 temporary, whatever the box counts.
MAX_PAIRS = 1 << 22
# Ground truths per chunk. Smaller chunks have tighter extents (fewer wasted pairs) but
# cost more NumPy calls: 16 was fastest for 3000 small gt on an 800 x 1333 FPN image.
GT_BLOCK = 16
# Slack (pixels) on index queries so float rounding never drops an overlapping box.
_MARGIN = 1.


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


class _BoxIndex:
    """Finds the boxes that may overlap a query rectangle, without scanning all of them.

    Boxes are split into size classes (half an octave of width and of height). Within a
    class of largest width Wc and height Hc, a box overlapping [qx1, qx2) x [qy1, qy2) has
    x1 in (qx1 - Wc, qx2) and y1 in (qy1 - Hc, qy2). Each class is cut into rows of height
    Hc by y1 and sorted by x1 inside a row, so a query is two binary searches per
    (class, row) it touches. Anchors of one FPN level and ratio form one class, and a
    query touches ~2-3 rows of it.
    """

    def __init__(self, boxes):
        """boxes: float32 [A, 4] (kept by reference)."""
        self.boxes = boxes
        if len(boxes) == 0:
            self.order = np.zeros(0, np.int64)
            return
        x1, y1 = boxes[:, 0].astype(np.float64), boxes[:, 1].astype(np.float64)
        w = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
        h = (boxes[:, 3] - boxes[:, 1]).astype(np.float64)
        # < 2^40 pixels wide or high: each half-octave class fits in 7 bits.
        wc, hc = (np.minimum(np.floor(2 * np.log2(np.maximum(v, 1.))), 127).astype(np.int64)
                  for v in (w, h))
        present = np.zeros(1 << 14, dtype=bool)
        present[(wc << 7) | hc] = True
        cls = (np.cumsum(present) - 1)[(wc << 7) | hc]  # classes numbered 0..C-1
        num_cls = int(present.sum())
        self.cls_w, self.cls_h = np.zeros(num_cls), np.zeros(num_cls)
        np.maximum.at(self.cls_w, cls, w)
        np.maximum.at(self.cls_h, cls, h)
        self.row_h = np.maximum(self.cls_h, 1.)
        self.x0, self.y0 = x1.min(), y1.min()
        row = np.floor((y1 - self.y0) / self.row_h[cls]).astype(np.int64)
        self.num_rows = np.zeros(num_cls, np.int64)
        np.maximum.at(self.num_rows, cls, row + 1)
        self.row_offset = np.cumsum(self.num_rows) - self.num_rows
        # One sorted float64 key: (global row id, x1 - x0), with x1 - x0 in [0, span).
        self.span = x1.max() - self.x0 + 1.
        key = (self.row_offset[cls] + row) * self.span + (x1 - self.x0)
        self.order = np.argsort(key, kind='stable')
        self.key = key[self.order]

    def query(self, qx1, qy1, qx2, qy2):
        """int64 [K] distinct indices: every box whose overlap with the rectangle has
        positive area (plus boxes within ``_MARGIN`` pixels of it)."""
        if len(self.order) == 0:
            return self.order
        first = np.floor((qy1 - _MARGIN - self.cls_h - self.y0) / self.row_h)
        last = np.floor((qy2 + _MARGIN - self.y0) / self.row_h)
        first = np.clip(first, 0, self.num_rows - 1).astype(np.int64)
        last = np.clip(last, -1, self.num_rows - 1).astype(np.int64)
        rows = np.maximum(last - first + 1, 0)  # per class
        cls = np.repeat(np.arange(len(rows)), rows)
        row_id = self.row_offset[cls] + np.repeat(first, rows) + \
            np.arange(rows.sum()) - np.repeat(np.cumsum(rows) - rows, rows)
        top = self.span - .5  # stays inside the row's key range
        lo_x = np.clip(qx1 - _MARGIN - self.cls_w[cls] - self.x0, 0., top)
        hi_x = np.clip(qx2 + _MARGIN - self.x0, 0., top)
        lo = np.searchsorted(self.key, row_id * self.span + lo_x, 'left')
        hi = np.maximum(np.searchsorted(self.key, row_id * self.span + hi_x, 'right'), lo)
        lens = hi - lo
        starts = np.repeat(lo - (np.cumsum(lens) - lens), lens)
        found = self.order[starts + np.arange(lens.sum())]
        # Rows are coarse: drop what misses the (slightly grown) rectangle, a cheap [K]
        # test that saves k IoUs per box.
        b = self.boxes[found]
        hit = ((b[:, 0] < qx2 + _MARGIN) & (b[:, 2] > qx1 - _MARGIN) &
               (b[:, 1] < qy2 + _MARGIN) & (b[:, 3] > qy1 - _MARGIN))
        return found[hit]


def _gt_chunks(gt_boxes, chunk):
    """Split ground truths into spatially compact groups of at most ``chunk``.

    Boxes go to square tiles by their centre (tiles sized for ~chunk boxes each if spread
    evenly), with one tile grid per size octave so a large box does not widen the extent
    of a chunk of small ones.

    Returns:
        list of int64 index arrays into ``gt_boxes``, each ascending (so that ``argmax``
        inside a chunk breaks ties towards the lower index, as a dense argmax does).
    """
    n = len(gt_boxes)
    if n <= chunk:
        return [np.arange(n)] if n else []
    boxes = gt_boxes.astype(np.float64)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    spread = max(np.ptp(cx), 1.) * max(np.ptp(cy), 1.)
    tile = max(np.sqrt(chunk * spread / n), 1.)
    size = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    octave = np.ceil(np.log2(np.maximum(size / tile, 1.)))
    side = tile * 2. ** octave
    tx, ty = np.floor((cx - cx.min()) / side), np.floor((cy - cy.min()) / side)
    order = np.lexsort((tx, ty, octave))
    key = np.stack([octave, ty, tx], 1)[order]
    breaks = np.flatnonzero((key[1:] != key[:-1]).any(axis=1)) + 1
    return [np.sort(group[s:s + chunk]) for group in np.split(order, breaks)
            for s in range(0, len(group), chunk)]


def _overlap_blocks(boxes, gt_boxes, chunk, max_pairs):
    """Per chunk of ground truths, the boxes that may overlap them, in bounded slices.

    Yields:
        (gt_idx int64 [k] ascending, slices: list of int64 [n_i] box indices with
        n_i * k <= max(max_pairs, k)). Together the slices of one chunk hold every box
        whose overlap with any of its ground truths has positive area, each box once.
        A box absent from a chunk has IoU and IoA 0 with all its ground truths.
    """
    index = _BoxIndex(boxes)
    for gt_idx in _gt_chunks(gt_boxes, chunk):
        g = gt_boxes[gt_idx]
        cand = index.query(g[:, 0].min(), g[:, 1].min(), g[:, 2].max(), g[:, 3].max())
        if len(cand) == 0:
            continue
        step = max(1, max_pairs // len(gt_idx))
        yield gt_idx, [cand[s:s + step] for s in range(0, len(cand), step)]


def _ties_with_gt_max(iou, gt_max):
    """bool [n]: rows of ``iou`` [n, k] equal to ``gt_max`` [k] somewhere it is > 0."""
    return ((iou == gt_max[None, :]) & (gt_max[None, :] > 0)).any(axis=1)


def max_iou_over_gt(anchors, gt_boxes, chunk=GT_BLOCK, max_pairs=MAX_PAIRS,
                    best_anchors=False):
    """Best ground truth for every anchor and best anchor IoU for every ground truth.

    Equal to ``iou = pairwise_iou(anchors, gt_boxes)`` followed by ``iou.max(1),
    iou.argmax(1), iou.max(0)`` (bit for bit, ties to the lowest gt index), but only
    pairs that can overlap are computed, at most ``max_pairs`` at a time: dense scenes
    with thousands of instances stay fast and bounded in memory.

    Args:
        anchors: float32 [A, 4].
        gt_boxes: float32 [G, 4], G >= 1.
        chunk (int): ground-truth boxes per spatial chunk.
        max_pairs (int): (anchor, gt) pairs per IoU block (peak ~4 float32 blocks).
        best_anchors (bool): also return ``at_gt_max(anchors, gt_boxes,
            gt_max_iou)``, found in the same pass (every anchor overlapping a gt is seen
            in that gt's chunk, so its maximum is final when the chunk ends).
    Returns:
        anchor_max_iou: float32 [A], the largest IoU of each anchor with any ground truth.
        anchor_argmax: int64 [A], the index of that ground truth (the first one on ties;
            0 for an anchor that overlaps nothing).
        gt_max_iou: float32 [G], the largest IoU of each ground truth with any anchor.
        at_gt_max (only with ``best_anchors``): bool [A].
    """
    anchors, gt_boxes = _as_boxes(anchors), _as_boxes(gt_boxes)
    assert len(gt_boxes) > 0 and chunk > 0, (len(gt_boxes), chunk)
    anchor_max_iou = np.zeros(len(anchors), dtype=np.float32)
    anchor_argmax = np.zeros(len(anchors), dtype=np.int64)
    gt_max_iou = np.zeros(len(gt_boxes), dtype=np.float32)
    at_gt_max = np.zeros(len(anchors), dtype=bool)
    for gt_idx, slices in _overlap_blocks(anchors, gt_boxes, chunk, max_pairs):
        g = gt_boxes[gt_idx]
        for a in slices:
            iou = pairwise_iou(anchors[a], g)  # [n, k]
            gt_max_iou[gt_idx] = np.maximum(gt_max_iou[gt_idx], iou.max(axis=0))
            best = iou.argmax(axis=1)
            best_iou, best_gt = iou[np.arange(len(a)), best], gt_idx[best]
            cur, cur_gt = anchor_max_iou[a], anchor_argmax[a]
            # Chunks are not in gt order: an equal IoU from a lower gt index wins the tie.
            better = (best_iou > cur) | ((best_iou == cur) & (best_iou > 0) & (best_gt < cur_gt))
            anchor_max_iou[a[better]] = best_iou[better]
            anchor_argmax[a[better]] = best_gt[better]
        if best_anchors:
            for a in slices:  # one slice (the usual case): reuse its IoU block
                if len(slices) > 1:
                    iou = pairwise_iou(anchors[a], g)
                at_gt_max[a[_ties_with_gt_max(iou, gt_max_iou[gt_idx])]] = True
    if best_anchors:
        return anchor_max_iou, anchor_argmax, gt_max_iou, at_gt_max
    return anchor_max_iou, anchor_argmax, gt_max_iou


def max_coverage(boxes, regions, chunk=GT_BLOCK, max_pairs=MAX_PAIRS):
    """The largest fraction of each box's area covered by one region (e.g. crowd boxes).

    Equal to ``pairwise_ioa(regions, boxes).max(0)`` (0 without regions), computed like
    ``max_iou_over_gt``.

    Args:
        boxes: float32 [A, 4]; regions: float32 [R, 4].
    Returns:
        float32 [A]; 0 for boxes of zero area.
    """
    boxes, regions = _as_boxes(boxes), _as_boxes(regions)
    best = np.zeros(len(boxes), dtype=np.float32)
    for r_idx, slices in _overlap_blocks(boxes, regions, chunk, max_pairs):
        for a in slices:
            best[a] = np.maximum(best[a], pairwise_ioa(regions[r_idx], boxes[a]).max(axis=0))
    return best
