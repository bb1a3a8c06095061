"""Training augmentors: PREPROC.AUGMENTATIONS -> transforms of an image and its instances.

NumPy / cv2 only, run in data workers. An augmentor maps a `Sample` (image, boxes, crowd
flags, classes, polygons or full-image masks) to a new one, drawing from the worker's
numpy Generator, so a seed fixes the whole pipeline. Geometric transforms move boxes
(through their corners), polygons and masks with the image in the coordinate convention
of common.py (pixel i covers [i, i+1)). Boxes cut by a crop are clipped and emptied
ones dropped by the caller (data.py), as before.

Masks: polygons travel as polygons (exact, cheap) until `CopyPaste`, which needs pixels:
it rasterises both images' instances to full-image masks; every later transform moves
those masks too and data.py cuts the per-box GT bitmaps out of them.

Names and parameter defaults are declared once in config_defaults.AUGMENTORS (config.py
validates them); a None default is taken from the older PREPROC key (`_derived_defaults`).
"""
import cv2
import numpy as np
from pycocotools import mask as mask_util

from common import (crop_window, flip_boxes, flip_image, flip_polygons,
                    resize_shortest_edge, scale_boxes, scale_polygons, shift_polygons)
from config_defaults import AUGMENTORS

__all__ = ['Sample', 'build_augmentors', 'apply_augmentors', 'masks_to_boxes',
           'full_mask_to_box_frame']


class Sample:
    """One training image and its instances.

    img: float32 [H, W, C] in [0, 255]; boxes: float32 [N, 4] x1y1x2y2; is_crowd: bool [N];
    klass: int64 [N]; segms: per instance a list of [K, 2] polygons ([] = its full box), or
    None; masks: uint8 [N, H, W] full-image masks (after copy-paste), else None.
    """

    def __init__(self, img, boxes, is_crowd, klass, segms=None, masks=None):
        self.img, self.boxes, self.is_crowd, self.klass = img, boxes, is_crowd, klass
        self.segms, self.masks = segms, masks

    def keep(self, idx):
        """Only the instances ``idx`` (int array), in that order."""
        self.boxes, self.is_crowd, self.klass = self.boxes[idx], self.is_crowd[idx], \
            self.klass[idx]
        if self.segms is not None:
            self.segms = [self.segms[i] for i in idx]
        if self.masks is not None:
            self.masks = self.masks[idx]


def _map_boxes(boxes, fn):
    """Boxes through a point map ``fn`` ([K, 2] -> [K, 2]) that keeps axes aligned."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    corners = fn(boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)).reshape(-1, 4, 2)
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).astype(np.float32)


def _map_masks(masks, fn):
    """uint8 [N, H, W] masks through an image function of [H, W, C] arrays (C = N)."""
    if masks is None:
        return None
    if len(masks) == 0:
        return masks  # shape fixed by the caller through the image
    parts = []
    for start in range(0, len(masks), 256):  # cv2 takes at most 512 channels
        out = fn(np.ascontiguousarray(masks[start:start + 256].transpose(1, 2, 0)))
        parts.append(out[:, :, None] if out.ndim == 2 else out)
    return np.ascontiguousarray(np.concatenate(parts, axis=2).transpose(2, 0, 1))


def _empty_like_image(s):
    """Zero masks take the image size (resizing them is a no-op otherwise)."""
    if s.masks is not None and len(s.masks) == 0:
        s.masks = np.zeros((0,) + s.img.shape[:2], np.uint8)


class ResizeShortestEdge:
    """A short edge drawn uniformly from ``sizes`` [min, max], long edge <= ``max_size``."""

    def __init__(self, sizes, max_size, uint8=False):
        self.sizes, self.max_size, self.uint8 = sizes, max_size, uint8

    def __call__(self, s, rng):
        short = int(rng.integers(self.sizes[0], self.sizes[1] + 1))
        return _resize(s, short, self.max_size, self.uint8)


def _resize(s, short, max_size, uint8=False):
    """Resize the sample (short edge ``short``, long <= ``max_size``)."""
    s.img, (sy, sx) = resize_shortest_edge(s.img, short, max_size, uint8=uint8)
    s.boxes = scale_boxes(s.boxes, sy, sx)
    if s.segms is not None:
        s.segms = scale_polygons(s.segms, sy, sx)
    size = (s.img.shape[1], s.img.shape[0])
    s.masks = _map_masks(s.masks, lambda m: cv2.resize(m, size, interpolation=cv2.INTER_NEAREST))
    _empty_like_image(s)
    return s


class _WithProb:
    """Applies ``_apply(s, rng)`` with probability ``prob`` (0: never, and no random draw)."""

    def __init__(self, prob):
        self.prob = prob

    def __call__(self, s, rng):
        if self.prob <= 0 or rng.random() >= self.prob:
            return s
        return self._apply(s, rng)


class HorizontalFlip(_WithProb):
    """x -> W - x."""

    def _apply(self, s, rng):
        width = s.img.shape[1]
        s.img, s.boxes = flip_image(s.img), flip_boxes(s.boxes, width)
        if s.segms is not None:
            s.segms = flip_polygons(s.segms, width)
        if s.masks is not None:
            s.masks = s.masks[:, :, ::-1]
        return s


def _map_polygons(segms, fn):
    if segms is None:
        return None
    return [[fn(np.asarray(p, np.float32).reshape(-1, 2)) for p in polys] for polys in segms]


class VerticalFlip(_WithProb):
    """y -> H - y."""

    def _apply(self, s, rng):
        h = s.img.shape[0]
        fn = lambda p: np.stack([p[:, 0], h - p[:, 1]], axis=1)  # noqa: E731
        s.img, s.boxes = s.img[::-1], _map_boxes(s.boxes, fn)
        s.segms = _map_polygons(s.segms, fn)
        if s.masks is not None:
            s.masks = s.masks[:, ::-1]
        return s


class Rotate90(_WithProb):
    """k x 90 degrees counter-clockwise, k uniform in 1..3.

    One quarter turn of a W-wide image (np.rot90) maps (x, y) to (y, W - x)."""

    def _apply(self, s, rng):
        for _ in range(int(rng.integers(1, 4))):
            w = s.img.shape[1]
            fn = lambda p, w=w: np.stack([p[:, 1], w - p[:, 0]], axis=1)  # noqa: E731
            s.img, s.boxes = np.rot90(s.img), _map_boxes(s.boxes, fn)
            s.segms = _map_polygons(s.segms, fn)
            if s.masks is not None:
                s.masks = np.rot90(s.masks, axes=(1, 2))
        return s


def _crop(s, y0, x0, ch, cw):
    """Window [y0, y0 + ch) x [x0, x0 + cw) of the sample (boxes not clipped yet)."""
    s.img = s.img[y0:y0 + ch, x0:x0 + cw]
    s.boxes = s.boxes - np.float32([x0, y0, x0, y0])
    if s.segms is not None:
        s.segms = shift_polygons(s.segms, -x0, -y0)
    if s.masks is not None:
        s.masks = s.masks[:, y0:y0 + ch, x0:x0 + cw]
    return s


class RandomCrop:
    """A ``size`` x ``size`` window around a random non-crowd instance (0: off)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, s, rng):
        if self.size <= 0:
            return s
        return _crop(s, *crop_window(s.img.shape, s.boxes, s.is_crowd, self.size, rng))


class LargeScaleJitter:
    """Resize to a random ``[min_scale, max_scale]`` x ``size`` long side (aspect kept),
    then a random ``size`` x ``size`` window: cropped where larger, padded (bottom and
    right, with ``pad_value`` per channel: the pixel mean, zero after normalisation)."""

    def __init__(self, size, min_scale, max_scale, pad_value):
        self.size, self.min_scale, self.max_scale = size, min_scale, max_scale
        self.pad_value = np.asarray(pad_value, np.float32)

    def __call__(self, s, rng):
        h, w = s.img.shape[:2]
        target = rng.uniform(self.min_scale, self.max_scale) * self.size
        scale = target / max(h, w)
        s = _resize(s, max(int(min(h, w) * scale + 0.5), 1), max(int(target + 0.5), 1))
        h, w = s.img.shape[:2]
        y0 = int(rng.integers(0, max(h - self.size, 0) + 1))
        x0 = int(rng.integers(0, max(w - self.size, 0) + 1))
        s = _crop(s, y0, x0, min(h, self.size), min(w, self.size))
        h, w = s.img.shape[:2]
        if (h, w) != (self.size, self.size):
            canvas = np.empty((self.size, self.size, s.img.shape[2]), np.float32)
            canvas[:] = self.pad_value
            canvas[:h, :w] = s.img
            s.img = canvas
            if s.masks is not None:
                masks = np.zeros((len(s.masks), self.size, self.size), np.uint8)
                masks[:, :h, :w] = s.masks
                s.masks = masks
        return s


class ColorJitter:
    """Brightness, contrast, saturation (factors 1 +- the parameter) and hue (a shift of
    +- ``hue`` of the colour circle), in random order, on the colour channels only.

    1 channel: brightness and contrast; 3: all four in ``order`` ('BGR' or 'RGB'); 4: the
    first three as colour, the 4th (e.g. depth) untouched. Values stay in [0, 255].
    """

    def __init__(self, brightness, contrast, saturation, hue, channels, order):
        self.params = {'brightness': brightness, 'contrast': contrast,
                       'saturation': saturation, 'hue': hue}
        if channels == 1:
            self.params.update(saturation=0, hue=0)
        self.colour = 1 if channels == 1 else 3
        self.to_gray = cv2.COLOR_BGR2GRAY if order == 'BGR' else cv2.COLOR_RGB2GRAY
        self.hsv = (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR) if order == 'BGR' else \
            (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB)

    def _gray(self, img):
        if self.colour == 1:
            return img[:, :, 0]
        return cv2.cvtColor(img, self.to_gray)

    def __call__(self, s, rng):
        img = np.array(s.img[:, :, :self.colour], np.float32)
        for i in rng.permutation(4):
            name = ('brightness', 'contrast', 'saturation', 'hue')[i]
            amount = self.params[name]
            if amount <= 0:
                continue
            if name == 'hue':
                hsv = cv2.cvtColor(np.clip(img, 0, 255) / 255., self.hsv[0])
                hsv[:, :, 0] = (hsv[:, :, 0] + 360. * rng.uniform(-amount, amount)) % 360.
                img = cv2.cvtColor(hsv, self.hsv[1]) * 255.
                continue
            f = rng.uniform(1 - amount, 1 + amount)
            if name == 'brightness':
                img = img * f
            elif name == 'contrast':  # towards / away from the mean gray level
                mean = self._gray(img).mean()
                img = (img - mean) * f + mean
            else:  # towards / away from each pixel's gray
                gray = self._gray(img)[:, :, None]
                img = (img - gray) * f + gray
            np.clip(img, 0, 255, out=img)
        out = np.array(s.img, np.float32)
        out[:, :, :self.colour] = np.clip(img, 0, 255)
        s.img = out
        return s


def _full_masks(s):
    """uint8 [N, H, W] masks of the sample's instances (a polygon-less one: its box).

    Each polygon is rasterised only over its own bounding rectangle (pycocotools' cost
    grows with the area it decodes)."""
    h, w = s.img.shape[:2]
    masks = np.zeros((len(s.boxes), h, w), np.uint8)
    segms = s.segms if s.segms is not None else [[] for _ in range(len(s.boxes))]
    for k, (polys, box) in enumerate(zip(segms, s.boxes)):
        points = [np.asarray(p, np.float64).reshape(-1, 2) for p in polys]
        points = [p for p in points if len(p) >= 3]
        if not points:
            x1, y1, x2, y2 = np.clip(np.rint(box), 0, [w, h, w, h]).astype(int)
            masks[k, y1:y2, x1:x2] = 1
            continue
        allp = np.concatenate(points)
        x0, y0 = np.clip(np.floor(allp.min(axis=0)).astype(int), 0, [w, h])
        x1, y1 = np.clip(np.ceil(allp.max(axis=0)).astype(int) + 1, 0, [w, h])
        if x1 <= x0 or y1 <= y0:
            continue  # entirely outside the image
        flat = [(p - [x0, y0]).reshape(-1).tolist() for p in points]
        rle = mask_util.merge(mask_util.frPyObjects(flat, int(y1 - y0), int(x1 - x0)))
        masks[k, y0:y1, x0:x1] = mask_util.decode(rle)
    return masks


def masks_to_boxes(masks):
    """float32 [N, 4] tight boxes of uint8 [N, H, W] masks (pixel i spans [i, i+1));
    an empty mask gives [0, 0, 0, 0]."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if len(ys):
            boxes[k] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return boxes


def full_mask_to_box_frame(mask, box, size):
    """uint8 [M, M] (M = ``size``) of a uint8 [H, W] full-image mask in the frame of
    ``box`` (the gt_masks encoding of common.polygons_to_box_frame_mask), sampled at the
    centre of each bitmap cell (nearest pixel)."""
    h, w = mask.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    centres = (np.arange(size) + 0.5) / size
    cols = np.clip(np.floor(x1 + centres * (x2 - x1)), 0, w - 1).astype(np.int64)
    rows = np.clip(np.floor(y1 + centres * (y2 - y1)), 0, h - 1).astype(np.int64)
    return np.ascontiguousarray(mask[rows[:, None], cols[None, :]], dtype=np.uint8)


class CopyPaste:
    """With probability ``prob``, paste every instance of another training image (after
    the augmentors before this one) on top of this one, at the same place.

    The other image's top-left part of this image's size is used. Existing instances
    lose their covered pixels; those with more than ``drop_covered`` of their area covered
    are dropped; boxes are recomputed from the remaining masks.
    """

    def __init__(self, prob, drop_covered):
        self.prob, self.drop_covered = prob, drop_covered

    def paste(self, s, other):
        """s, other: Samples -> s with other's instances on top (masks full-image)."""
        h, w = s.img.shape[:2]
        dst = s.masks if s.masks is not None else _full_masks(s)
        src = other.masks if other.masks is not None else _full_masks(other)
        src_full = np.zeros((len(src), h, w), np.uint8)
        oh, ow = min(h, other.img.shape[0]), min(w, other.img.shape[1])
        src_full[:, :oh, :ow] = src[:, :oh, :ow]
        cover = src_full.any(axis=0)
        area = dst.reshape(len(dst), h * w).sum(axis=1)
        dst = dst * ~cover[None]
        left = dst.reshape(len(dst), h * w).sum(axis=1)
        keep = np.flatnonzero(left > (1 - self.drop_covered) * area)
        img = np.array(s.img, np.float32)
        img[:oh, :ow][cover[:oh, :ow]] = other.img[:oh, :ow][cover[:oh, :ow]]
        pasted = np.flatnonzero(src_full.reshape(len(src_full), h * w).any(axis=1))
        masks = np.concatenate([dst[keep], src_full[pasted]])
        return Sample(img, masks_to_boxes(masks),
                      np.concatenate([s.is_crowd[keep], other.is_crowd[pasted]]),
                      np.concatenate([s.klass[keep], other.klass[pasted]]), None, masks)


def _derived_defaults(name, c):
    """The None defaults of config_defaults.AUGMENTORS, from the older PREPROC keys."""
    pre = c.PREPROC
    return {'ResizeShortestEdge': {'sizes': list(pre.TRAIN_SHORT_EDGE_SIZE),
                                   'max_size': pre.MAX_SIZE},
            'HorizontalFlip': {'prob': 0.5 if pre.HORIZONTAL_FLIP else 0.},
            'RandomCrop': {'size': pre.CROP_SIZE}}.get(name, {})


def build_augmentors(c):
    """The augmentors of ``c.PREPROC.AUGMENTATIONS`` (validated by finalize_configs)."""
    pre, out = c.PREPROC, []
    for item in pre.AUGMENTATIONS:
        name, params = (item, {}) if isinstance(item, str) else item
        kw = dict(AUGMENTORS[name], **_derived_defaults(name, c))
        kw.update(params)
        if name == 'ResizeShortestEdge':
            kw['uint8'] = pre.RESIZE_UINT8
        elif name == 'LargeScaleJitter':
            kw['pad_value'] = pre.PIXEL_MEAN
        elif name == 'ColorJitter':
            kw.update(channels=pre.IMAGE_CHANNELS, order=pre.CHANNEL_ORDER)
        out.append(globals()[name](**kw))
    return out


def apply_augmentors(augs, s, rng, load_other=None):
    """Run ``augs`` in order on Sample ``s``.

    load_other(rng) -> a Sample of another training image, or None: the source of
    `CopyPaste`, which first runs the augmentors before it on that image. Without it
    (or when it gives None) copy-paste is skipped.
    """
    for i, aug in enumerate(augs):
        if not isinstance(aug, CopyPaste):
            s = aug(s, rng)
            continue
        if load_other is None or rng.random() >= aug.prob:
            continue
        other = load_other(rng)
        if other is not None:
            s = aug.paste(s, apply_augmentors(augs[:i], other, rng))
    return s
