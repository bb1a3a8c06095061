"""More than one image per device: the batched graph inputs cut back into single images.

A batch holds N images (N static: TRAIN.IMAGES_PER_DEVICE in training, the predictor's
batch size in inference) zero-padded to one [N, H, W, C] tensor, with ``image_sizes``
int32 [N, 2] their true (h, w). Per-image ground truth is padded too: ``gt_labels`` with 0
(no class), ``gt_boxes`` / ``gt_masks`` with zeros, anchor labels with -1 (ignored). The
model runs the backbone once on the batch in training (BatchNorm sees every image) and
then each image's RPN, sampling, heads and losses with the single-image code, on the
image's own region of the feature maps; see NOTES.md ("Several images per device").
"""
import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

import contextlib

import tensorflow.compat.v1 as tf
from tensorpack.tfutils.summary import add_moving_summary

__all__ = ['valid_pixels', 'feature_size', 'image_features', 'image_inputs', 'image_scope',
           'mean_losses']


def valid_pixels(sizes, hw):
    """float32 [N, H, W, 1]: 1 inside each image's true size, 0 in the batch padding.

    Args:
        sizes: int32 [N, 2] true (h, w) of each image; hw: int32 [2], the batch's (H, W).
    """
    rows = tf.range(hw[0])[None, :, None] < sizes[:, 0, None, None]
    cols = tf.range(hw[1])[None, None, :] < sizes[:, 1, None, None]
    return tf.cast(tf.logical_and(rows, cols), tf.float32)[..., None]


def feature_size(image_hw, stride, mult):
    """int32 [2] cells of a feature map of ``stride`` for an image of true size
    ``image_hw`` alone: ceil(padded / stride) with the image padded to ``mult``, or
    floor(h / stride) unpadded (mult 1); the data pipeline's rule (data._feature_shape)."""
    if mult == 1:
        return image_hw // stride
    padded = (image_hw + mult - 1) // mult * mult
    return (padded + stride - 1) // stride


def image_features(features, index, image_hw, strides, mult, data_format):
    """Image ``index``'s own region of each batched feature map.

    Args:
        features: list of [N, h, w, ch] (NHWC) or [N, ch, h, w] maps; strides: their strides.
        image_hw: int32 [2] the image's true size; mult: the graph's padding multiple.
    Returns:
        list of [1, h_i, w_i, ch] (or NCHW): what the image alone would give, in shape.
    """
    out = []
    for feature, stride in zip(features, strides):
        h, w = tf.unstack(feature_size(image_hw, stride, mult))
        if data_format == 'NCHW':
            out.append(feature[index:index + 1, :, :h, :w])
        else:
            out.append(feature[index:index + 1, :h, :w, :])
    return out


def image_inputs(inputs, index):
    """Image ``index``'s ground truth from the batched training inputs, as the single-image
    graph takes it: ``gt_*`` cut to the image's instance count (gt_labels > 0), anchor
    inputs [h, w, A(, 4)] still padded with ignored (-1) cells beyond the image."""
    out = {}
    if 'gt_labels' in inputs:
        count = tf.reduce_sum(tf.cast(inputs['gt_labels'][index] > 0, tf.int32))
    for name, tensor in inputs.items():
        if name.startswith('anchor_'):
            out[name] = tensor[index]
        elif name.startswith('gt_'):
            out[name] = tensor[index, :count]
    return out


@contextlib.contextmanager
def image_scope(index):
    """Name scope ``image{index}``; images after the first reuse the first one's variables
    (AUTO_REUSE rather than True, so tensorpack still records their summaries)."""
    reuse = tf.AUTO_REUSE if index > 0 else None
    with tf.variable_scope(tf.get_variable_scope(), reuse=reuse), \
            tf.name_scope('image{}'.format(index)):
        yield


def mean_losses(per_image):
    """The mean over images of each loss (detectron2's rule: each image's loss is already
    normalised by its own samples, so a crowded image does not outweigh the others).

    Args:
        per_image: list over images of equally ordered lists of scalar losses, built in
            ``image_scope(i)``.
    Returns:
        list of scalars named as the single-image graph names them (``image0/`` dropped).
    """
    means = []
    for losses in zip(*per_image):
        name = losses[0].op.name.split('image0/', 1)[-1]
        means.append(tf.identity(tf.add_n(list(losses)) / float(len(losses)), name=name))
    add_moving_summary(*means)
    return means
