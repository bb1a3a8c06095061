"""Region Proposal Network: head, losses, proposals, and the anchors of a feature map.

Boxes are x1y1x2y2 float32 in the pixels of the padded input image, floating-point
convention (pixel i covers [i, i+1)). Per-anchor tensors are laid out [h, w, A(, 4)] for a
feature map of h x w cells, A anchors per cell ordered as in ``utils.anchors``.
"""
from collections import namedtuple

import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow.compat.v1 as tf
from tensorpack.models import Conv2D
from tensorpack.tfutils.argscope import argscope
from tensorpack.tfutils.summary import add_moving_summary

from config import config as cfg
from modeling.backbone import feature_data_format
from modeling.model_box import clip_boxes, decode_bbox_target, encode_bbox_target
from modeling.widths import layer_width

__all__ = ['rpn_head', 'rpn_losses', 'generate_rpn_proposals', 'RPNAnchors']


def rpn_head(name, featuremap, channel, num_anchors):
    """The RPN head; FPN calls it once per level with the same ``name`` (shared weights).

    Args:
        featuremap: [1, C, h, w] or [1, h, w, C] (cfg.BACKBONE.DATA_FORMAT).
        channel (int): channels of the 3x3 conv (a pruned model: its PRUNE.CHANNELS).
        num_anchors (int): A.
    Returns:
        label_logits: float32 [h, w, A] objectness logits.
        box_logits: float32 [h, w, A, 4] deltas relative to the anchors (weights 1).
    Variables: ``{name}/conv0``, ``{name}/class``, ``{name}/box``.
    """
    data_format = feature_data_format()
    with tf.variable_scope(name, reuse=tf.AUTO_REUSE), \
            argscope(Conv2D, data_format=data_format, use_bias=True,
                     kernel_initializer=tf.random_normal_initializer(stddev=0.01)):
        hidden = Conv2D('conv0', featuremap, layer_width('conv0', channel), 3,
                        activation=tf.nn.relu)
        label_logits = Conv2D('class', hidden, num_anchors, 1)
        box_logits = Conv2D('box', hidden, 4 * num_anchors, 1)
        if data_format == 'NCHW':
            label_logits = tf.transpose(label_logits, [0, 2, 3, 1])
            box_logits = tf.transpose(box_logits, [0, 2, 3, 1])
        label_logits = tf.squeeze(label_logits, 0)  # [h, w, A]
        shape = tf.shape(box_logits)  # [1, h, w, 4A]; channel k * 4 + j is anchor k, coord j
        box_logits = tf.reshape(box_logits, [shape[1], shape[2], num_anchors, 4])
        return label_logits, box_logits


def rpn_losses(anchor_labels, anchor_boxes_encoded, label_logits, box_logits):
    """RPN losses of one image, both normalised by cfg.RPN.BATCH_PER_IM.

    Args:
        anchor_labels: int32 [...] 1 foreground, 0 background, -1 ignored (sampled by data).
        anchor_boxes_encoded: float32 [..., 4] regression targets (weights 1).
        label_logits: float32 [...]; box_logits: float32 [..., 4]; same leading shape.
    Returns:
        [label_loss, box_loss] scalars: sigmoid cross-entropy over the labelled anchors;
        smooth-L1 (beta 1/9) over the foreground ones (0 when there is none).
    """
    with tf.name_scope('rpn_losses'):
        valid_mask = tf.stop_gradient(tf.not_equal(anchor_labels, -1))
        pos_mask = tf.stop_gradient(tf.equal(anchor_labels, 1))
        num_valid = tf.count_nonzero(valid_mask, dtype=tf.int32, name='num_valid_anchor')
        num_pos = tf.count_nonzero(pos_mask, dtype=tf.int32, name='num_pos_anchor')

        valid_labels = tf.boolean_mask(anchor_labels, valid_mask)
        valid_logits = tf.cast(tf.boolean_mask(label_logits, valid_mask), tf.float32)
        norm = 1. / cfg.RPN.BATCH_PER_IM
        label_loss = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.cast(valid_labels, tf.float32), logits=valid_logits)
        label_loss = tf.multiply(tf.reduce_sum(label_loss), norm, name='label_loss')

        pos_targets = tf.boolean_mask(anchor_boxes_encoded, pos_mask)
        pos_logits = tf.cast(tf.boolean_mask(box_logits, pos_mask), tf.float32)
        beta = 1. / 9
        # Huber(delta) / delta is smooth-L1 with transition point beta = delta.
        box_loss = tf.losses.huber_loss(pos_targets, pos_logits, delta=beta,
                                        reduction=tf.losses.Reduction.SUM,
                                        loss_collection=None) / beta
        box_loss = tf.multiply(box_loss, norm, name='box_loss')

        # Objectness recall / precision at 0.5, on the labelled anchors.
        predicted = tf.sigmoid(valid_logits) > 0.5
        true_pos = tf.count_nonzero(tf.logical_and(predicted, tf.equal(valid_labels, 1)),
                                    dtype=tf.int32)
        recall = tf.math.divide_no_nan(tf.cast(true_pos, tf.float32),
                                       tf.cast(num_pos, tf.float32), name='recall_th0.5')
        precision = tf.math.divide_no_nan(
            tf.cast(true_pos, tf.float32),
            tf.cast(tf.count_nonzero(predicted, dtype=tf.int32), tf.float32),
            name='precision_th0.5')
        add_moving_summary(label_loss, box_loss, num_valid, num_pos, recall, precision)
    return [label_loss, box_loss]


def generate_rpn_proposals(boxes, scores, img_shape, pre_nms_topk, post_nms_topk=None):
    """Top-k, clip, drop tiny boxes, NMS.

    Args:
        boxes: float32 [N, 4] decoded anchors, x1y1x2y2 image pixels.
        scores: float32 [N] objectness logits.
        img_shape: int32 [2] (h, w) of the padded image.
        pre_nms_topk (int): boxes kept before NMS.
        post_nms_topk (int): at most this many after NMS (default pre_nms_topk).
    Returns:
        boxes: float32 [K, 4] inside the image, with width and height > cfg.RPN.MIN_SIZE
            (with RPN.DROP_EMPTY_PROPOSALS=False and MIN_SIZE 0: any, zero-size included).
        scores: float32 [K] their logits, K <= post_nms_topk. Both without gradient.
    """
    post_nms_topk = pre_nms_topk if post_nms_topk is None else post_nms_topk
    with tf.name_scope('generate_rpn_proposals'):
        boxes = tf.cast(boxes, tf.float32)
        scores = tf.cast(scores, tf.float32)
        topk = tf.minimum(pre_nms_topk, tf.size(scores))
        topk_scores, topk_indices = tf.nn.top_k(scores, k=topk, sorted=False)
        topk_boxes = clip_boxes(tf.gather(boxes, topk_indices), img_shape)

        # Clipping flattens boxes outside the image to zero size; those (and any box
        # below MIN_SIZE) would give NaN regression targets downstream. tensorpack keeps
        # them when MIN_SIZE is 0 (RPN.DROP_EMPTY_PROPOSALS=False reproduces that).
        if cfg.RPN.DROP_EMPTY_PROPOSALS or cfg.RPN.MIN_SIZE > 0:
            wh = topk_boxes[:, 2:] - topk_boxes[:, :2]
            valid = tf.reduce_all(wh > cfg.RPN.MIN_SIZE, axis=1)
            topk_boxes = tf.boolean_mask(topk_boxes, valid)
            topk_scores = tf.boolean_mask(topk_scores, valid)

        # non_max_suppression expects (y1, x1, y2, x2), but IoU is symmetric in x and y.
        keep = tf.image.non_max_suppression(topk_boxes, topk_scores,
                                            max_output_size=post_nms_topk,
                                            iou_threshold=cfg.RPN.PROPOSAL_NMS_THRESH)
        proposal_boxes = tf.gather(topk_boxes, keep)
        proposal_scores = tf.gather(topk_scores, keep)
    return (tf.stop_gradient(proposal_boxes, name='boxes'),
            tf.stop_gradient(proposal_scores, name='scores'))


class RPNAnchors(namedtuple('_RPNAnchors', ['boxes', 'gt_labels', 'gt_boxes'])):
    """The anchors of one feature map and their targets.

    Attributes:
        boxes: float32 [F, F, A, 4] anchors, e.g. ``utils.anchors.get_all_anchors(...)`` for
            the largest padded image (or [h, w, A, 4] after ``narrow_to``).
        gt_labels: int32 [h, w, A] anchor labels fed by the data, or None (inference).
        gt_boxes: float32 [h, w, A, 4] matched ground-truth boxes (not encoded), or None.
    """

    def encoded_gt_boxes(self):
        """float32 [h, w, A, 4] regression targets; only foreground entries are meaningful
        (others may be non-finite: zero-size placeholder boxes)."""
        return encode_bbox_target(self.gt_boxes, self.boxes)

    def decode_logits(self, logits):
        """[h, w, A, 4] deltas -> [h, w, A, 4] boxes in image pixels."""
        return decode_bbox_target(logits, self.boxes)

    def narrow_to(self, featuremap):
        """Slice everything to the featuremap's (dynamic) h x w cells."""
        shape = tf.shape(featuremap)
        hw = shape[2:4] if feature_data_format() == 'NCHW' else shape[1:3]
        size3 = tf.concat([hw, [-1]], axis=0)
        size4 = tf.concat([hw, [-1, -1]], axis=0)

        def narrow(t, size):
            return None if t is None else tf.slice(t, tf.zeros_like(size), size)
        return RPNAnchors(narrow(self.boxes, size4), narrow(self.gt_labels, size3),
                          narrow(self.gt_boxes, size4))
