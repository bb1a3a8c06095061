"""Box operations in the TensorFlow graph: clipping, encoding, IoU, RoIAlign.

Every box is x1y1x2y2 float32 in the floating-point convention: pixel i covers [i, i+1),
so pixel i's centre is at i + 0.5 and an H-pixel image spans [0, H]. The NumPy
counterparts (used by the data pipeline) live in ``utils/np_box_ops.py``.
"""
import numpy as np

import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow.compat.v1 as tf

from config import config as cfg

__all__ = ['decode_clip', 'clip_boxes', 'encode_bbox_target', 'decode_bbox_target', 'area',
           'pairwise_iou', 'crop_and_resize_aligned', 'roi_align']


def decode_clip():
    """Largest dw/dh accepted by decode: log(X / 16), a 16-px anchor grows at most to X px;
    X = cfg.FRCNN.DECODE_CLIP_SIZE, or cfg.PREPROC.MAX_SIZE when that is 0 (tensorpack)."""
    size = cfg.FRCNN.DECODE_CLIP_SIZE or cfg.PREPROC.MAX_SIZE
    return float(np.log(size / 16.))


def clip_boxes(boxes, window, name=None):
    """Clip boxes to an image.

    Args:
        boxes: float32 [..., 4] x1y1x2y2.
        window: int or float [2] = (h, w) of the image.
    Returns:
        float32 [..., 4], x in [0, w] and y in [0, h].
    """
    with tf.name_scope(name, 'clip_boxes', [boxes, window]):
        window = tf.cast(window, tf.float32)
        upper = tf.tile(tf.reverse(window, [0]), [2])  # (w, h, w, h)
        return tf.minimum(tf.maximum(boxes, 0.), upper)


def _centre_size(boxes):
    """[..., 4] x1y1x2y2 -> four [..., 1] tensors (cx, cy, w, h)."""
    x1, y1, x2, y2 = tf.split(boxes, 4, axis=-1)
    w = x2 - x1
    h = y2 - y1
    return x1 + 0.5 * w, y1 + 0.5 * h, w, h


def encode_bbox_target(boxes, anchors, weights=(1., 1., 1., 1.)):
    """R-CNN box regression targets of ``boxes`` relative to ``anchors``.

    Args:
        boxes: float32 [..., 4] x1y1x2y2 target (ground-truth) boxes.
        anchors: float32 [..., 4] x1y1x2y2 anchors or proposals, same shape.
        weights: 4 floats multiplied into (dx, dy, dw, dh).
    Returns:
        float32 [..., 4] (dx, dy, dw, dh) * weights, with dx = (gx - ax) / aw on box centres
        and dw = log(gw / aw). A zero-size target gives -inf in dw/dh: mask such rows
        (e.g. non-foreground anchors) out before using them.
    """
    with tf.name_scope('encode_bbox_target'):
        gx, gy, gw, gh = _centre_size(boxes)
        ax, ay, aw, ah = _centre_size(anchors)
        deltas = tf.concat([(gx - ax) / aw, (gy - ay) / ah,
                            tf.log(gw / aw), tf.log(gh / ah)], axis=-1)
        return deltas * tf.constant(weights, dtype=tf.float32)


def decode_bbox_target(deltas, anchors, weights=(1., 1., 1., 1.)):
    """Inverse of ``encode_bbox_target``: apply regression deltas to anchors.

    Args:
        deltas: float32 [..., 4] (dx, dy, dw, dh) * weights.
        anchors: float32 [..., 4] x1y1x2y2, broadcastable to ``deltas``.
        weights: the 4 floats used when encoding.
    Returns:
        float32 [..., 4] x1y1x2y2 boxes (not clipped to the image).
    """
    with tf.name_scope('decode_bbox_target'):
        deltas = deltas / tf.constant(weights, dtype=tf.float32)
        dx, dy, dw, dh = tf.split(deltas, 4, axis=-1)
        # An untrained head can predict huge dw/dh; exp() of them overflows to inf and the
        # inf/NaN boxes would poison NMS and RoIAlign. Clip the scale change.
        clip = decode_clip()
        dw = tf.minimum(dw, clip)
        dh = tf.minimum(dh, clip)
        ax, ay, aw, ah = _centre_size(anchors)
        cx = dx * aw + ax
        cy = dy * ah + ay
        half_w = 0.5 * tf.exp(dw) * aw
        half_h = 0.5 * tf.exp(dh) * ah
        return tf.concat([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def area(boxes):
    """float32 [N, 4] x1y1x2y2 -> float32 [N] areas."""
    with tf.name_scope('area'):
        x1, y1, x2, y2 = tf.unstack(boxes, 4, axis=1)
        return (x2 - x1) * (y2 - y1)


def pairwise_iou(boxes1, boxes2):
    """IoU of every pair. Memory is O(N * M): never call it with anchors x ground truth.

    Args:
        boxes1: float32 [N, 4], boxes2: float32 [M, 4], x1y1x2y2.
    Returns:
        float32 [N, M]; 0 where the union is 0.
    """
    with tf.name_scope('pairwise_iou'):
        x11, y11, x12, y12 = tf.split(boxes1, 4, axis=1)  # [N, 1] each
        x21, y21, x22, y22 = tf.unstack(boxes2, 4, axis=1)  # [M] each
        inter_w = tf.maximum(0., tf.minimum(x12, x22) - tf.maximum(x11, x21))
        inter_h = tf.maximum(0., tf.minimum(y12, y22) - tf.maximum(y11, y21))
        inter = inter_w * inter_h
        union = tf.expand_dims(area(boxes1), 1) + tf.expand_dims(area(boxes2), 0) - inter
        return tf.math.divide_no_nan(inter, union)


def crop_and_resize_aligned(image, boxes, box_indices, crop_size):
    """Bilinear samples at the bin centres of a crop_size x crop_size grid over each box.

    Sample (i, j) of a box is at y0 + (i + 0.5) * (y1 - y0) / S, x0 + (j + 0.5) *
    (x1 - x0) / S. In pixel-index coordinates (u = y - 0.5, pixel i is at u = i) a sample
    with u outside [0, H - 1] (or likewise for x) is 0; inside, it interpolates the four
    neighbouring pixels. H and W must be >= 2.

    Args:
        image: float [B, H, W, C] (NHWC).
        boxes: float32 [N, 4] x1y1x2y2 in the pixels of ``image``. No gradient flows into them.
        box_indices: int32 [N], the image of each box.
        crop_size (int): S.
    Returns:
        float32 [N, S, S, C].
    """
    with tf.name_scope('crop_and_resize_aligned'):
        boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))  # boxes are not learnt here
        shape = tf.cast(tf.shape(image)[1:3], tf.float32)
        # crop_and_resize(box=(ny0, nx0, ny1, nx1)) samples pixel-index rows
        #     u_k = ny0 * (H - 1) + k * (ny1 - ny0) * (H - 1) / (S - 1),  k = 0 .. S - 1,
        # i.e. 0 and 1 map to the CENTRES of the first and last pixels. The naive
        # ny0 = y0 / H is therefore off by half a pixel (edge vs centre), stretches the box
        # by H / (H - 1), and puts the first and last samples ON the box edges instead of
        # at bin centres. We want samples spaced s = (y1 - y0) / S apart at continuous
        # y0 + (k + 0.5) * s, i.e. at index u_k = y0 + s / 2 - 0.5 + k * s. Matching terms:
        #     ny0 * (H - 1) = y0 + s / 2 - 0.5,
        #     (ny1 - ny0) * (H - 1) = s * (S - 1)  =>  ny1 * (H - 1) = y1 - s / 2 - 0.5.
        x0, y0, x1, y1 = tf.split(boxes, 4, axis=1)
        half_w = (x1 - x0) / (2. * crop_size)
        half_h = (y1 - y0) / (2. * crop_size)
        nx0 = (x0 + half_w - 0.5) / (shape[1] - 1.)
        ny0 = (y0 + half_h - 0.5) / (shape[0] - 1.)
        nx1 = (x1 - half_w - 0.5) / (shape[1] - 1.)
        ny1 = (y1 - half_h - 0.5) / (shape[0] - 1.)
        nboxes = tf.concat([ny0, nx0, ny1, nx1], axis=1)
        return tf.image.crop_and_resize(image, nboxes, box_indices=box_indices,
                                        crop_size=[crop_size, crop_size], method='bilinear',
                                        extrapolation_value=0.)


def roi_align(featuremap, boxes, resolution, data_format='NHWC'):
    """RoIAlign ("aligned" version of the Mask R-CNN paper) of one image's feature map.

    Each of the resolution x resolution output bins averages 2 x 2 samples taken with
    bilinear interpolation at the exact positions y0 + (i + (k + 0.5) / 2) * bin_h,
    x0 + (j + (l + 0.5) / 2) * bin_w, k, l in {0, 1} (1/4 and 3/4 of the bin).

    Outside the feature map (Detectron's rule): in pixel-index coordinates (u = y - 0.5,
    so pixel i is at u = i), a sample with u < -1 or u > H (or likewise for x) is 0; any
    other sample has u clamped to [0, H - 1] (x likewise) before interpolation, so a
    sample in the outer half-pixel ring reads the border value.

    Args:
        featuremap: float [1, H, W, C] (NHWC) or [1, C, H, W] (NCHW).
        boxes: float32 [N, 4] x1y1x2y2 in feature-map pixels (image coordinates / stride).
            No gradient flows into them.
        resolution (int): output bins per side.
        data_format: 'NHWC' or 'NCHW'.
    Returns:
        [N, resolution, resolution, C] (NHWC) or [N, C, resolution, resolution] (NCHW).
    """
    assert data_format in ('NHWC', 'NCHW'), data_format
    with tf.name_scope('roi_align'):
        if data_format == 'NCHW':  # crop_and_resize only reads NHWC
            featuremap = tf.transpose(featuremap, [0, 2, 3, 1])
        # Replicate the border once: interpolating in the 1-pixel ring then equals clamping
        # to the border (Detectron's rule), and crop_and_resize_aligned's zero outside the
        # padded map's pixel centres becomes u < -1 or u > H. It also makes H, W >= 3.
        padded = tf.pad(featuremap, [[0, 0], [1, 1], [1, 1], [0, 0]], mode='SYMMETRIC')
        box_ind = tf.zeros([tf.shape(boxes)[0]], dtype=tf.int32)  # one image per device
        # 2 x 2 samples per bin: a 2R x 2R grid of bin centres, then 2 x 2 average pooling.
        ret = crop_and_resize_aligned(padded, tf.cast(boxes, tf.float32) + 1., box_ind,
                                      2 * resolution)
        ret = tf.nn.avg_pool2d(ret, 2, 2, 'VALID', data_format='NHWC')
        ret = tf.cast(ret, featuremap.dtype)  # crop_and_resize always returns float32
        if data_format == 'NCHW':
            ret = tf.transpose(ret, [0, 3, 1, 2])
        return ret
