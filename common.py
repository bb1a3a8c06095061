"""Image reading, resizing, flipping and mask rasterisation shared by data, eval and predict.

NumPy / cv2 / pycocotools only (no TensorFlow): this runs inside data worker processes.

Conventions: boxes are float32 [N, 4] x1y1x2y2 in absolute pixels, floating-point
convention (pixel i covers [i, i+1)); polygons are float32 [K, 2] arrays of (x, y) in the
same coordinates; an instance's segmentation is a list of such polygons. Under this
convention resizing an image from w to w' pixels maps a coordinate x to x * w' / w, and a
horizontal flip of a W-pixel-wide image maps x to W - x.
"""
import os

import cv2
import numpy as np
from pycocotools import mask as mask_util

from config import config as cfg

__all__ = ['ImageReadError', 'read_image', 'resize_shortest_edge', 'scale_boxes',
           'scale_polygons', 'shift_polygons', 'flip_image', 'flip_boxes', 'flip_polygons',
           'random_crop', 'crop_window', 'clip_boxes', 'filter_boxes_inside_shape',
           'polygons_to_box_frame_mask']


class ImageReadError(IOError):
    """An image file that is missing, unreadable, corrupt or of an unsupported layout."""

    def __init__(self, path, reason):
        super().__init__('Cannot read image "{}": {}'.format(path, reason))
        self.path = path
        self.reason = reason


def _decode(path):
    """cv2.imread(IMREAD_UNCHANGED) -> float32 [H, W, c] in [0, 255], c = file's channels."""
    if not os.path.isfile(path):
        raise ImageReadError(path, 'no such file')
    try:
        img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # some decoders raise instead of returning None
        raise ImageReadError(path, 'decoder error: {}'.format(str(e).strip())) from None
    if img is None or img.size == 0:
        raise ImageReadError(path, 'not a readable image (corrupt or unsupported format)')
    if img.dtype == np.uint8:
        img = img.astype(np.float32)
    elif img.dtype == np.uint16:
        img = img.astype(np.float32) / 257.  # 65535 -> 255: same range as 8-bit images
    else:
        raise ImageReadError(path, 'unsupported pixel type {} (8- or 16-bit only)'.format(
            img.dtype))
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ImageReadError(path, 'unsupported layout {}'.format(img.shape))
    return img


def read_image(path, channels=None, order=None):
    """THE image reader of training, evaluation and prediction.

    Args:
        path (str): image file; 8- or 16-bit, grayscale, BGR or BGRA (or BGR + depth).
        channels (int): 1 (grayscale), 3 (colour) or 4 (colour + the file's 4th channel,
            e.g. depth). Default ``cfg.PREPROC.IMAGE_CHANNELS``, read at call time.
        order (str): 'BGR' or 'RGB' for the first 3 channels. Default
            ``cfg.PREPROC.CHANNEL_ORDER``.
    Returns:
        float32 [H, W, channels], values in [0, 255] (16-bit files are divided by 257).
    Raises:
        ImageReadError: naming the file and the reason.
    """
    channels = cfg.PREPROC.IMAGE_CHANNELS if channels is None else channels
    order = cfg.PREPROC.CHANNEL_ORDER if order is None else order
    assert channels in (1, 3, 4) and order in ('BGR', 'RGB'), (channels, order)
    img = _decode(path)
    have = img.shape[2]
    if channels == 1:
        if have > 1:
            img = cv2.cvtColor(np.ascontiguousarray(img[:, :, :3]), cv2.COLOR_BGR2GRAY)[:, :, None]
    elif channels == 3:
        img = np.repeat(img, 3, axis=2) if have == 1 else img[:, :, :3]
    elif have != 4:
        raise ImageReadError(path, 'has {} channel(s) but the model expects 4 (BGR + a 4th '
                             'channel such as depth, PREPROC.IMAGE_CHANNELS=4)'.format(have))
    if order == 'RGB' and channels >= 3:
        img = np.concatenate([img[:, :, 2::-1], img[:, :, 3:]], axis=2)
    return np.ascontiguousarray(img, dtype=np.float32)


def resize_shortest_edge(img, short, max_size, interp=cv2.INTER_LINEAR, uint8=False):
    """Resize so the short edge is ``short`` unless the long edge would exceed ``max_size``.

    Args:
        img: [H, W, C] array.
        uint8 (bool): resize the image rounded to uint8 (tensorpack resizes the uint8
            pixels it read: integer results); the output keeps ``img``'s dtype.
    Returns:
        resized [H', W', C] array (same dtype), and the scale (sy, sx) = (H'/H, W'/W) that
        maps coordinates of the input to the output (see `scale_boxes`).
    """
    h, w = img.shape[:2]
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    new_h, new_w = max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)
    src = np.clip(np.rint(img), 0, 255).astype(np.uint8) if uint8 else img
    out = cv2.resize(src, (new_w, new_h), interpolation=interp).astype(img.dtype, copy=False)
    if out.ndim == 2:  # cv2 drops a single channel axis
        out = out[:, :, None]
    return out, (new_h / h, new_w / w)


def scale_boxes(boxes, sy, sx):
    """float32 [N, 4] boxes of an image resized by (sy, sx) -> new float32 [N, 4]."""
    return np.asarray(boxes, dtype=np.float32) * np.float32([sx, sy, sx, sy])


def scale_polygons(segms, sy, sx):
    """Per-instance polygon lists ([[K, 2] arrays, ...], ...) scaled by (sy, sx); new arrays."""
    s = np.float32([sx, sy])
    return [[np.asarray(p, dtype=np.float32).reshape(-1, 2) * s for p in polys]
            for polys in segms]


def shift_polygons(segms, dx, dy):
    """Per-instance polygon lists translated by (dx, dy), e.g. into a crop; new arrays."""
    d = np.float32([dx, dy])
    return [[np.asarray(p, dtype=np.float32).reshape(-1, 2) + d for p in polys]
            for polys in segms]


def flip_image(img):
    """Horizontal flip of an [H, W, C] image (a view)."""
    return img[:, ::-1]


def flip_boxes(boxes, width):
    """Horizontal flip in a ``width``-pixel image: x1' = W - x2, x2' = W - x1."""
    boxes = np.asarray(boxes, dtype=np.float32)
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]],
                    axis=1).astype(np.float32)


def flip_polygons(segms, width):
    """Horizontal flip of per-instance polygon lists: x' = W - x; new arrays."""
    flipped = []
    for polys in segms:
        out = []
        for p in polys:
            p = np.asarray(p, dtype=np.float32).reshape(-1, 2).copy()
            p[:, 0] = width - p[:, 0]
            out.append(p)
        flipped.append(out)
    return flipped


def random_crop(img, boxes, is_crowd, segms, crop, rng):
    """A random crop x crop window of img [H, W, C] (smaller sides kept whole); boxes
    [N, 4] and polygons shifted into it. ``rng``: a numpy Generator.

    The window (`crop_window`) contains one non-crowd instance chosen at random (whole if
    it fits, else its centre), so a crop is never empty; instances it cuts are clipped by
    the caller.
    """
    y0, x0, ch, cw = crop_window(img.shape, boxes, is_crowd, crop, rng)
    boxes = boxes - np.float32([x0, y0, x0, y0])
    if segms is not None:
        segms = shift_polygons(segms, -x0, -y0)
    return img[y0:y0 + ch, x0:x0 + cw], boxes, segms


def crop_window(shape, boxes, is_crowd, crop, rng):
    """(y0, x0, height, width) of `random_crop`'s window in an image of ``shape``."""
    h, w = shape[:2]
    ch, cw = min(crop, h), min(crop, w)
    candidates = np.flatnonzero(~np.asarray(is_crowd, bool))
    if len(candidates):
        x1, y1, x2, y2 = boxes[rng.choice(candidates)]
        y0 = _window_start(y1, y2, ch, h, rng)
        x0 = _window_start(x1, x2, cw, w, rng)
    else:
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return y0, x0, ch, cw


def _window_start(lo, hi, size, full, rng):
    """A random start of a ``size`` window within [0, full] containing [lo, hi] (its
    centre when [lo, hi] is longer than the window)."""
    if hi - lo > size:
        lo = hi = (lo + hi) / 2
    first = int(np.clip(np.ceil(hi - size), 0, full - size))
    last = int(np.clip(np.floor(lo), first, full - size))
    return int(rng.integers(first, last + 1))


def clip_boxes(boxes, shape):
    """Clip float32 [N, 4] boxes to an image of ``shape`` (H, W, ...); new array."""
    h, w = shape[:2]
    return np.clip(boxes, 0, np.float32([w, h, w, h])).astype(np.float32)


def filter_boxes_inside_shape(boxes, shape):
    """Indices of the boxes entirely inside an image of ``shape`` (H, W, ...).

    Returns:
        int64 [K] indices into ``boxes`` and the float32 [K, 4] boxes themselves.
    """
    h, w = shape[:2]
    inside = np.flatnonzero((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) &
                            (boxes[:, 2] <= w) & (boxes[:, 3] <= h))
    return inside, boxes[inside]


def polygons_to_box_frame_mask(polygons, box, size):
    """Rasterise one instance directly in the frame of its box (never the full image).

    Args:
        polygons: list of float32 [K, 2] (or flat [2K]) (x, y) polygons in image
            coordinates; those with fewer than 3 points are ignored. An empty list (no
            mask annotated) gives the full box.
        box: [4] x1y1x2y2 of the instance, x2 > x1 and y2 > y1.
        size (int): M, the bitmap side.
    Returns:
        uint8 [M, M] in {0, 1}; pixel (r, c) covers x in x1 + [c, c+1) * (x2 - x1) / M and
        y in y1 + [r, r+1) * (y2 - y1) / M (the ``gt_masks`` encoding of NOTES.md).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    scale = np.array([size / max(x2 - x1, 1e-6), size / max(y2 - y1, 1e-6)])
    offset = np.array([x1, y1])
    points = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    flat = [((p - offset) * scale).reshape(-1).tolist() for p in points if len(p) >= 3]
    # pycocotools reads a list whose first item has exactly 4 numbers as boxes: >= 3 points
    # (6 numbers) above keeps every item a polygon.
    if not flat:
        return np.ones((size, size), dtype=np.uint8)
    rle = mask_util.merge(mask_util.frPyObjects(flat, size, size))
    return np.ascontiguousarray(mask_util.decode(rle), dtype=np.uint8)
