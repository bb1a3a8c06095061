"""Drawing boxes, masks and labels on images for inspection.

Every function takes and returns a BGR uint8 [H, W, 3] image (a new array; the input is
not modified). Boxes are x1y1x2y2 floats in that image's pixels (floating-point
convention, pixel i covers [i, i+1)).
"""
import cv2
import numpy as np
from pycocotools import mask as mask_util

__all__ = ['to_display_bgr', 'instance_colors', 'draw_annotation', 'draw_proposals',
           'draw_predictions', 'draw_final_outputs_panel']

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MASK_ALPHA = 0.5
_PROPOSAL_COLOR = (0, 200, 255)  # BGR: amber, unlike any instance colour's role
_SEPARATOR = 4  # pixels of white between panels


def to_display_bgr(img, channel_order='BGR'):
    """A model-input image as displayable BGR uint8.

    Args:
        img: float or uint8 [H, W, C] (or [H, W]) with C = 1, 3 or 4 channels in
            ``channel_order`` (a 4th channel, e.g. depth, is dropped), values in [0, 255].
        channel_order (str): 'BGR' or 'RGB', the order of the first three channels.
    Returns:
        uint8 [H, W, 3] BGR.
    """
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = img[:, :, :3]
    if channel_order == 'RGB':
        img = img[:, :, ::-1]
    return np.ascontiguousarray(np.clip(np.round(img), 0, 255).astype(np.uint8))


def instance_colors(n):
    """n distinct, deterministic BGR colours (int tuples): hues spread by the golden ratio."""
    if n == 0:  # cv2 refuses empty images
        return []
    hues = (np.arange(n) * 0.618033988749895 % 1. * 180).astype(np.uint8)  # OpenCV hue 0..179
    hsv = np.stack([hues, np.full(n, 200, np.uint8), np.full(n, 255, np.uint8)], axis=1)
    bgr = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2BGR)[0]
    return [tuple(int(c) for c in color) for color in bgr]


def _int_box(box):
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return (x1, y1), (max(x2 - 1, x1), max(y2 - 1, y1))  # last pixel inside the box


def _put_label(img, text, box, color):
    """Text on a filled strip of ``color`` above the box (inside it at the top edge)."""
    (x1, y1), _ = _int_box(box)
    (tw, th), baseline = cv2.getTextSize(text, _FONT, 0.4, 1)
    top = y1 - th - baseline - 2 if y1 - th - baseline - 2 >= 0 else y1
    x1 = min(max(x1, 0), max(img.shape[1] - tw - 2, 0))
    cv2.rectangle(img, (x1, top), (x1 + tw + 2, top + th + baseline + 2), color, -1)
    luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    text_color = (0, 0, 0) if luminance > 128 else (255, 255, 255)
    cv2.putText(img, text, (x1 + 1, top + th + 1), _FONT, 0.4, text_color, 1, cv2.LINE_AA)


def _decode_mask(mask):
    """uint8 [H, W] mask or COCO RLE dict -> bool [H, W] (RLEs are decoded one at a time)."""
    if isinstance(mask, dict):
        rle = dict(mask)
        if isinstance(rle['counts'], str):
            rle['counts'] = rle['counts'].encode('ascii')
        mask = mask_util.decode(rle)
    return np.asarray(mask).astype(bool)


def draw_annotation(img, boxes, labels, class_names):
    """Ground-truth boxes with their class names.

    Args:
        img: BGR uint8 [H, W, 3].
        boxes: float [N, 4] x1y1x2y2. labels: int [N] in 1..C.
        class_names (list of str): indexed by class id (index 0 is background).
    """
    img = img.copy()
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    for box, label, color in zip(boxes, labels, instance_colors(len(boxes))):
        p1, p2 = _int_box(box)
        cv2.rectangle(img, p1, p2, color, 1)
        _put_label(img, class_names[int(label)], box, color)
    return img


def draw_proposals(img, proposals, max_proposals=100):
    """The first ``max_proposals`` RPN proposals (the graph emits them best first) as
    thin boxes. proposals: float [K, 4] x1y1x2y2."""
    img = img.copy()
    for box in np.asarray(proposals, dtype=np.float32).reshape(-1, 4)[:max_proposals]:
        p1, p2 = _int_box(box)
        cv2.rectangle(img, p1, p2, _PROPOSAL_COLOR, 1)
    return img


def draw_predictions(img, results, class_names, score_thresh=0.):
    """Detections: masks blended in a per-instance colour, boxes, and "name score" labels.

    Args:
        img: BGR uint8 [H, W, 3].
        results: list of ``eval.DetectionResult`` (box in this image's pixels; mask a uint8
            [H, W] array, a COCO RLE dict or None).
        class_names (list of str): indexed by class id (index 0 is background).
        score_thresh (float): results scoring below it are not drawn.
    """
    img = img.copy()
    results = [r for r in results if r.score >= score_thresh]
    colors = instance_colors(len(results))
    for r, color in zip(results, colors):
        if r.mask is not None:
            m = _decode_mask(r.mask)
            img[m] = (img[m] * (1 - _MASK_ALPHA) + np.asarray(color) * _MASK_ALPHA).astype(np.uint8)
    for r, color in zip(results, colors):
        p1, p2 = _int_box(r.box)
        cv2.rectangle(img, p1, p2, color, 2 if min(img.shape[:2]) >= 400 else 1)
    for r, color in zip(results, colors):
        _put_label(img, '{} {:.2f}'.format(class_names[r.class_id], r.score), r.box, color)
    return img


def _titled(img, title):
    img = img.copy()
    _put_label(img, title, (0, 0, img.shape[1], img.shape[0]), (255, 255, 255))
    return img


def draw_final_outputs_panel(img, gt_boxes, gt_labels, proposals, results, class_names,
                             score_thresh=0.):
    """[ground truth | proposals | predictions] side by side, each titled.

    Args:
        img: BGR uint8 [H, W, 3]; all boxes in its pixels.
        gt_boxes, gt_labels: as in `draw_annotation`.
        proposals: float [K, 4], or None when the model does not expose them (that panel
            then shows the bare image titled "proposals: n/a").
        results, class_names, score_thresh: as in `draw_predictions`.
    Returns:
        BGR uint8 [H, 3 * W + 2 * separator, 3].
    """
    panels = [_titled(draw_annotation(img, gt_boxes, gt_labels, class_names), 'ground truth')]
    if proposals is None:
        panels.append(_titled(img, 'proposals: n/a'))
    else:
        panels.append(_titled(draw_proposals(img, proposals), 'proposals'))
    panels.append(_titled(draw_predictions(img, results, class_names, score_thresh),
                          'predictions'))
    gap = np.full((img.shape[0], _SEPARATOR, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
