"""Feature Pyramid Network: the pyramid, RoI-to-level mapping, multi-level RoIAlign,
RPN losses and proposals over all levels.

Boxes are x1y1x2y2 float32 in the pixels of the padded input image, floating-point
convention (pixel i covers [i, i+1)). Feature maps use cfg.BACKBONE.DATA_FORMAT.
"""
import numpy as np

import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow.compat.v1 as tf
from tensorpack.models import Conv2D
from tensorpack.tfutils.argscope import argscope

from config import config as cfg
from modeling.backbone import GroupNorm, feature_data_format
from modeling.model_box import roi_align
from modeling.model_rpn import generate_rpn_proposals, rpn_losses
from modeling.widths import layer_width

__all__ = ['fpn_model', 'fpn_map_rois_to_levels', 'multilevel_roi_align',
           'multilevel_rpn_losses', 'generate_fpn_proposals']


def _upsample2x(x, like):
    """Nearest-neighbour 2x upsampling of ``x``, cropped to the spatial size of ``like``."""
    fmt = feature_data_format()
    h_axis = 2 if fmt == 'NCHW' else 1
    x = tf.repeat(tf.repeat(x, 2, axis=h_axis), 2, axis=h_axis + 1)
    hw = tf.shape(like)[h_axis:h_axis + 2]
    if fmt == 'NCHW':
        return x[:, :, :hw[0], :hw[1]]
    return x[:, :hw[0], :hw[1], :]


def fpn_model(name, features):
    """The FPN top-down pathway.

    Args:
        name (str): variable scope, 'fpn' in the model zoo.
        features: [C2, C3, C4, C5] backbone features of strides 4, 8, 16, 32.
    Returns:
        [P2, P3, P4, P5, P6], each cfg.FPN.NUM_CHANNEL channels (a pruned model: the
        PRUNE.CHANNELS of the posthoc convs, all equal), strides 4 .. 64; P6 is
        P5 subsampled (1x1 max pool, stride 2), used by the RPN only.
    Variables: ``{name}/lateral_1x1_c{2..5}``, ``{name}/posthoc_3x3_p{2..5}`` and with
    cfg.FPN.NORM='GN' ``{name}/gn_c{2..5}``, ``{name}/gn_p{2..5}`` (model-zoo names).
    """
    assert len(features) == 4, features
    num_channel = cfg.FPN.NUM_CHANNEL
    use_gn = cfg.FPN.NORM == 'GN'
    fmt = feature_data_format()
    with tf.variable_scope(name), \
            argscope(Conv2D, data_format=fmt, use_bias=True, activation=None,
                     kernel_initializer=tf.variance_scaling_initializer(scale=1.)), \
            argscope(GroupNorm, data_format=fmt):
        names = ['lateral_1x1_c{}'.format(i + 2) for i in range(4)]
        lateral = [Conv2D(n, c, layer_width(n, num_channel), 1) for n, c in zip(names, features)]
        if use_gn:
            lateral = [GroupNorm('gn_c{}'.format(i + 2), c) for i, c in enumerate(lateral)]
        merged = [lateral[-1]]  # P5, then P4, P3, P2 (top-down)
        for lat in lateral[-2::-1]:
            merged.append(lat + _upsample2x(merged[-1], lat))
        merged = merged[::-1]
        names = ['posthoc_3x3_p{}'.format(i + 2) for i in range(4)]
        outputs = [Conv2D(n, m, layer_width(n, num_channel), 3) for n, m in zip(names, merged)]
        if use_gn:
            outputs = [GroupNorm('gn_p{}'.format(i + 2), p) for i, p in enumerate(outputs)]
        # P6 = 1x1 max pool with stride 2 (ceil(h / 2) cells), i.e. every other cell: a
        # strided slice, which has no variables and, unlike MaxPool, runs NCHW on CPU too.
        p5 = outputs[-1]
        p6 = p5[:, :, ::2, ::2] if fmt == 'NCHW' else p5[:, ::2, ::2, :]
        return outputs + [tf.identity(p6, name='maxpool_p6')]


def fpn_map_rois_to_levels(boxes):
    """Assign each box to P2..P5 by size (FPN paper, eq. 1; 224 px maps to P4).

    Args:
        boxes: float32 [N, 4] x1y1x2y2 image pixels.
    Returns:
        level_ids: 4 int32 tensors [N_l], the indices into ``boxes`` of level l = 2..5.
        level_boxes: 4 float32 tensors [N_l, 4], the boxes of each level.
    """
    with tf.name_scope('fpn_map_rois_to_levels'):
        sqrt_area = tf.sqrt(tf.maximum((boxes[:, 2] - boxes[:, 0]) *
                                       (boxes[:, 3] - boxes[:, 1]), 0.))
        # epsilon: log of 0 for empty boxes; they go to P2 like any small box
        level = tf.floor(4. + tf.log(sqrt_area / 224. + 1e-6) / np.log(2.))
        level = tf.cast(tf.clip_by_value(level, 2., 5.), tf.int32)
        level_ids = [tf.reshape(tf.where(tf.equal(level, lvl)), [-1]) for lvl in range(2, 6)]
        level_ids = [tf.cast(ids, tf.int32, name='roi_level{}_ids'.format(i + 2))
                     for i, ids in enumerate(level_ids)]
        level_boxes = [tf.gather(boxes, ids) for ids in level_ids]
        return level_ids, level_boxes


def multilevel_roi_align(features, rcnn_boxes, resolution):
    """RoIAlign every box on its FPN level.

    Args:
        features: [P2, P3, P4, P5] (P6 is not used).
        rcnn_boxes: float32 [N, 4] x1y1x2y2 image pixels.
        resolution (int): output size.
    Returns:
        [N, C, res, res] (NCHW) or [N, res, res, C] (NHWC), in the order of ``rcnn_boxes``.
    """
    assert len(features) == 4, features
    level_ids, level_boxes = fpn_map_rois_to_levels(rcnn_boxes)
    fmt = feature_data_format()
    with tf.name_scope('multilevel_roi_align'):
        pooled = []
        for i, boxes in enumerate(level_boxes):
            with tf.name_scope('roi_level{}'.format(i + 2)):
                scaled = boxes * (1. / cfg.FPN.ANCHOR_STRIDES[i])
                pooled.append(roi_align(features[i], scaled, resolution, fmt))
        pooled = tf.concat(pooled, axis=0)
        # pooled row k belongs to box order[k]: invert that permutation.
        order = tf.concat(level_ids, axis=0)
        return tf.gather(pooled, tf.invert_permutation(order), name='output')


def multilevel_rpn_losses(multilevel_anchors, multilevel_label_logits,
                          multilevel_box_logits):
    """RPN losses over all levels at once (one BATCH_PER_IM sample spans all levels).

    Args:
        multilevel_anchors: RPNAnchors per level, already ``narrow_to`` their feature map.
        multilevel_label_logits: per level float32 [h_l, w_l, A].
        multilevel_box_logits: per level float32 [h_l, w_l, A, 4].
    Returns:
        [label_loss, box_loss] as in ``rpn_losses``.
    """
    num = len(multilevel_anchors)
    assert num == len(multilevel_label_logits) == len(multilevel_box_logits)
    with tf.name_scope('multilevel_rpn_losses'):
        labels = tf.concat([tf.reshape(a.gt_labels, [-1]) for a in multilevel_anchors], 0)
        targets = tf.concat([tf.reshape(a.encoded_gt_boxes(), [-1, 4])
                             for a in multilevel_anchors], 0)
        label_logits = tf.concat([tf.reshape(x, [-1]) for x in multilevel_label_logits], 0)
        box_logits = tf.concat([tf.reshape(x, [-1, 4]) for x in multilevel_box_logits], 0)
        return rpn_losses(labels, targets, label_logits, box_logits)


def generate_fpn_proposals(multilevel_pred_boxes, multilevel_label_logits, image_shape2d,
                           training):
    """Proposals from all levels, per cfg.FPN.PROPOSAL_MODE.

    'Level': each level keeps its top cfg.RPN.{TRAIN,TEST}_PER_LEVEL_NMS_TOPK before and
    after its own NMS; the union is cut to the top {TRAIN,TEST}_POST_NMS_TOPK by score.
    'Joint': all levels together through one top-{TRAIN,TEST}_PRE_NMS_TOPK + NMS.

    Args:
        multilevel_pred_boxes: per level float32 [h_l, w_l, A, 4] decoded boxes.
        multilevel_label_logits: per level float32 [h_l, w_l, A].
        image_shape2d: int32 [2] (h, w) of the padded image.
        training (bool): the TRAIN_ or TEST_ top-k values.
    Returns:
        boxes float32 [K, 4], scores float32 [K] (logits), K <= POST_NMS_TOPK; no gradient.
    """
    post_topk = cfg.RPN.TRAIN_POST_NMS_TOPK if training else cfg.RPN.TEST_POST_NMS_TOPK
    boxes = [tf.reshape(b, [-1, 4]) for b in multilevel_pred_boxes]
    scores = [tf.reshape(s, [-1]) for s in multilevel_label_logits]
    with tf.name_scope('generate_fpn_proposals'):
        if cfg.FPN.PROPOSAL_MODE == 'Level':
            level_topk = (cfg.RPN.TRAIN_PER_LEVEL_NMS_TOPK if training
                          else cfg.RPN.TEST_PER_LEVEL_NMS_TOPK)
            all_boxes, all_scores = [], []
            for i, (b, s) in enumerate(zip(boxes, scores)):
                with tf.name_scope('level{}'.format(i + 2)):
                    pb, ps = generate_rpn_proposals(b, s, image_shape2d, level_topk)
                all_boxes.append(pb)
                all_scores.append(ps)
            all_boxes = tf.concat(all_boxes, axis=0)
            all_scores = tf.concat(all_scores, axis=0)
            k = tf.minimum(post_topk, tf.size(all_scores))
            proposal_scores, keep = tf.nn.top_k(all_scores, k=k, sorted=False)
            proposal_boxes = tf.gather(all_boxes, keep)
        else:
            pre_topk = cfg.RPN.TRAIN_PRE_NMS_TOPK if training else cfg.RPN.TEST_PRE_NMS_TOPK
            proposal_boxes, proposal_scores = generate_rpn_proposals(
                tf.concat(boxes, 0), tf.concat(scores, 0), image_shape2d, pre_topk, post_topk)
    return (tf.stop_gradient(proposal_boxes, name='boxes'),
            tf.stop_gradient(proposal_scores, name='scores'))
