"""Mask R-CNN: the mask head, its loss, and its targets cropped from per-instance bitmaps.

Shapes: F foreground RoIs, C = DATA.NUM_CATEGORY, R = MRCNN.RESOLUTION, G ground-truth
instances, M = MRCNN.GT_MASK_SIZE. Boxes are float32 x1y1x2y2 image pixels, floating-point
convention (pixel i covers [i, i+1)). Masks are returned [F, C, R, R] whatever the layout.
"""
import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow.compat.v1 as tf
from tensorpack.models import Conv2D, Conv2DTranspose, layer_register
from tensorpack.tfutils.argscope import argscope
from tensorpack.tfutils.scope_utils import under_name_scope
from tensorpack.tfutils.summary import add_moving_summary

from config import config as cfg
from config_defaults import MRCNN_HEAD_FUNCS

from .backbone import GroupNorm
from .model_box import crop_and_resize_aligned
from .widths import layer_width

__all__ = ['maskrcnn_loss', 'maskrcnn_upXconv_head', 'maskrcnn_up4conv_head',
           'maskrcnn_up4conv_gn_head', 'crop_gt_masks', 'HEAD_FUNCS']


@under_name_scope()
def maskrcnn_loss(mask_logits, fg_labels, fg_target_masks):
    """Per-pixel sigmoid cross-entropy on the ground-truth class's mask only.

    Args:
        mask_logits: float32 [F, C, R, R].
        fg_labels: int64 [F] in [1, C].
        fg_target_masks: float32 [F, R, R] in {0, 1}.
    Returns:
        float32 scalar, the mean over F * R * R pixels (0 when F = 0).
    """
    # channel fg_label - 1 of each RoI: other classes' masks get no gradient
    logits = tf.gather(mask_logits, tf.reshape(fg_labels - 1, [-1, 1]), batch_dims=1)[:, 0]
    num_pixels = tf.maximum(tf.cast(tf.size(logits), tf.float32), 1.)  # F = 0: no NaN
    loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=fg_target_masks, logits=logits)
    loss = tf.truediv(tf.reduce_sum(loss), num_pixels, name='maskrcnn_loss')

    pred = logits > 0.  # probability > 0.5
    truth = fg_target_masks > 0.5
    correct = tf.cast(tf.equal(pred, truth), tf.float32)
    accuracy = tf.truediv(tf.reduce_sum(correct), num_pixels, name='accuracy')
    pos_accuracy = tf.truediv(tf.reduce_sum(correct * tf.cast(truth, tf.float32)), num_pixels,
                              name='pos_accuracy')
    fg_pixel_ratio = tf.truediv(tf.reduce_sum(tf.cast(truth, tf.float32)), num_pixels,
                                name='fg_pixel_ratio')
    add_moving_summary(loss, accuracy, fg_pixel_ratio, pos_accuracy)
    return loss


@layer_register(log_shape=True)
def maskrcnn_upXconv_head(feature, num_category, num_convs, norm=None):
    """``num_convs`` 3x3 convs ``fcn{k}`` (+ GroupNorm ``gn{k}``), a 2x2 stride-2 transposed
    conv ``deconv`` and a 1x1 conv ``conv`` to one mask logit per class.

    Conv -> ReLU -> GN is the tensorpack model-zoo order, so its GN weights load as trained.

    Args:
        feature: float32 [K, S, S, Ch] or [K, Ch, S, S] (BACKBONE.DATA_FORMAT); S = 14 (FPN).
        num_category (int): C.
        num_convs (int): conv layers of MRCNN.HEAD_DIM channels (PRUNE.CHANNELS if pruned).
        norm (str or None): None or 'GN'.
    Returns:
        float32 [K, C, 2S, 2S] mask logits (NCHW order in both layouts).
    """
    assert norm in (None, 'GN'), norm
    data_format = cfg.BACKBONE.DATA_FORMAT
    # Detectron's MSRAFill is fan-out
    init = tf.variance_scaling_initializer(scale=2.0, mode='fan_out',
                                           distribution='untruncated_normal')
    hidden = feature
    with argscope([Conv2D, Conv2DTranspose, GroupNorm], data_format=data_format), \
            argscope([Conv2D, Conv2DTranspose], kernel_initializer=init):
        for k in range(num_convs):
            name = 'fcn{}'.format(k)
            hidden = Conv2D(name, hidden, layer_width(name, cfg.MRCNN.HEAD_DIM), 3,
                            activation=tf.nn.relu)
            if norm is not None:
                hidden = GroupNorm('gn{}'.format(k), hidden)
        hidden = Conv2DTranspose('deconv', hidden, layer_width('deconv', cfg.MRCNN.HEAD_DIM), 2,
                                 strides=2, activation=tf.nn.relu)
        logits = Conv2D('conv', hidden, num_category, 1,
                        kernel_initializer=tf.random_normal_initializer(stddev=0.001))
    if data_format == 'NHWC':
        logits = tf.transpose(logits, [0, 3, 1, 2])
    return logits


def maskrcnn_up4conv_head(*args, **kwargs):
    return maskrcnn_upXconv_head(*args, num_convs=4, **kwargs)


def maskrcnn_up4conv_gn_head(*args, **kwargs):
    return maskrcnn_upXconv_head(*args, num_convs=4, norm='GN', **kwargs)


@under_name_scope()
def crop_gt_masks(gt_masks, gt_boxes, fg_inds_wrt_gt, fg_rois, resolution):
    """Mask targets: each foreground RoI's window of its matched instance's bitmap.

    Bitmap pixel (r, c) of instance g covers x in x1 + [c, c + 1) * (x2 - x1) / M (y likewise)
    of gt_boxes[g]; outside its box an instance's mask is 0. Each of the resolution^2 bins
    of a RoI takes the bilinear value at its centre, then is binarised at 0.5 (Detectron).
    Only the F matched bitmaps are gathered: memory is F * M^2, never a full-image mask.

    Args:
        gt_masks: uint8 [G, M, M] in {0, 1}.
        gt_boxes: float32 [G, 4].
        fg_inds_wrt_gt: int [F] in [0, G).
        fg_rois: float32 [F, 4].
        resolution (int): R.
    Returns:
        float32 [F, R, R] in {0, 1}, no gradient.
    """
    fg_inds_wrt_gt = tf.cast(fg_inds_wrt_gt, tf.int32)
    bitmaps = tf.cast(tf.gather(gt_masks, fg_inds_wrt_gt), tf.float32)  # [F, M, M]
    boxes = tf.gather(gt_boxes, fg_inds_wrt_gt)
    size = tf.cast(tf.shape(gt_masks)[1], tf.float32)  # M
    # The RoI in bitmap pixels: u = (x - gt.x1) / gt_w * M, v likewise.
    gx1, gy1, gx2, gy2 = tf.split(boxes, 4, axis=1)
    rx1, ry1, rx2, ry2 = tf.split(tf.cast(fg_rois, tf.float32), 4, axis=1)
    scale_x = size / tf.maximum(gx2 - gx1, 1e-6)
    scale_y = size / tf.maximum(gy2 - gy1, 1e-6)
    # +1: a ring of zeros around each bitmap, so bilinear samples past its edge fade to 0
    # (the mask is 0 outside its box) instead of repeating the edge.
    rois = tf.concat([(rx1 - gx1) * scale_x, (ry1 - gy1) * scale_y,
                      (rx2 - gx1) * scale_x, (ry2 - gy1) * scale_y], axis=1) + 1.
    bitmaps = tf.pad(bitmaps, [[0, 0], [1, 1], [1, 1]])[:, :, :, None]  # [F, M + 2, M + 2, 1]
    masks = crop_and_resize_aligned(bitmaps, rois, tf.range(tf.size(fg_inds_wrt_gt)),
                                    resolution)  # [F, R, R, 1]
    masks = tf.cast(masks[:, :, :, 0] >= 0.5, tf.float32)
    return tf.stop_gradient(masks, name='fg_target_masks')


# FPN.MRCNN_HEAD_FUNC name -> function; the names are config_defaults.MRCNN_HEAD_FUNCS
# (validated by config.py).
HEAD_FUNCS = {name: globals()[name] for name in MRCNN_HEAD_FUNCS}
