"""Fast R-CNN: RoI sampling against ground truth, box heads, losses, final predictions.

Boxes are float32 x1y1x2y2 in the pixels of the resized input image, floating-point
convention (pixel i covers [i, i+1)). Shapes: N proposals, G ground-truth boxes, K RoIs fed
to the head (sampled in training), F foreground RoIs among them, C = DATA.NUM_CATEGORY
foreground classes; class 0 is background, so classifiers have C + 1 outputs.
"""
import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow.compat.v1 as tf
from tensorpack.models import Conv2D, FullyConnected, layer_register
from tensorpack.tfutils.argscope import argscope
from tensorpack.tfutils.scope_utils import under_name_scope
from tensorpack.tfutils.summary import add_moving_summary
from tensorpack.utils.argtools import memoized_method

from config import config as cfg
from config_defaults import FRCNN_HEAD_FUNCS

from .backbone import GroupNorm
from .model_box import decode_bbox_target, encode_bbox_target, pairwise_iou
from .widths import layer_width

__all__ = ['GT_MATCH_CHUNK', 'best_gt_match', 'sample_fast_rcnn_targets', 'match_boxes_to_gt',
           'BoxProposals', 'fastrcnn_outputs', 'fastrcnn_losses', 'FastRCNNHead',
           'fastrcnn_predictions', 'fastrcnn_2fc_head', 'fastrcnn_Xconv1fc_head',
           'fastrcnn_4conv1fc_head', 'fastrcnn_4conv1fc_gn_head', 'HEAD_FUNCS']

# Ground truth is matched GT_MATCH_CHUNK boxes at a time, so the IoU block alive at once is
# [N, GT_MATCH_CHUNK], never [N, G]: dense scenes with thousands of instances fit.
GT_MATCH_CHUNK = 256


def best_gt_match(boxes, gt_boxes, chunk=GT_MATCH_CHUNK):
    """The best-overlapping ground truth of every box, without an [N, G] IoU matrix.

    A while-loop walks the ground truth ``chunk`` boxes at a time keeping a running max and
    argmax; iterations run one at a time so peak memory is O(N * chunk) whatever G is.

    Args:
        boxes: float32 [N, 4].
        gt_boxes: float32 [G, 4]; G may be 0.
        chunk (int): ground-truth boxes per iteration.
    Returns:
        max_iou: float32 [N], each box's largest IoU with any gt (0 when G = 0).
        best_gt: int64 [N] in [0, G): the first gt reaching ``max_iou``, as np.argmax
            (0 when G = 0 or when every IoU is 0).
        best_per_gt: float32 [G], each gt's largest IoU with any box (for recall summaries).
    """
    boxes = tf.stop_gradient(boxes)  # matching gives targets, never gradients
    gt_boxes = tf.stop_gradient(gt_boxes)
    num_gt = tf.shape(gt_boxes)[0]
    num_chunks = (num_gt + chunk - 1) // chunk

    def body(i, max_iou, best_gt, best_per_gt):
        start = i * chunk
        iou = pairwise_iou(boxes, gt_boxes[start:start + chunk])  # [N, <= chunk]
        chunk_max = tf.reduce_max(iou, axis=1)
        chunk_arg = tf.argmax(iou, axis=1) + tf.cast(start, tf.int64)
        better = chunk_max > max_iou  # strict: an earlier gt keeps ties, like np.argmax
        # N = 0 makes the column max -inf; an IoU is never below 0
        col_max = tf.maximum(tf.reduce_max(iou, axis=0), 0.)
        return (i + 1, tf.where(better, chunk_max, max_iou), tf.where(better, chunk_arg, best_gt),
                tf.concat([best_per_gt, col_max], axis=0))

    num_boxes = tf.shape(boxes)[:1]
    loop_vars = (tf.constant(0), tf.zeros(num_boxes, tf.float32),
                 tf.zeros(num_boxes, tf.int64), tf.zeros([0], tf.float32))
    _, max_iou, best_gt, best_per_gt = tf.while_loop(
        lambda i, *_: i < num_chunks, body, loop_vars,
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([None]),
                          tf.TensorShape([None])),
        parallel_iterations=1, back_prop=False, name='best_gt_match')
    return max_iou, best_gt, best_per_gt


@under_name_scope()
def proposal_metrics(best_per_gt):
    """Summaries of how well the proposals cover the ground truth (RPN recall).

    Args:
        best_per_gt: float32 [G], each gt's best IoU with a proposal.
    """
    num_gt = tf.maximum(tf.cast(tf.size(best_per_gt), tf.float32), 1.)  # G = 0: no NaN
    summaries = [tf.truediv(tf.reduce_sum(best_per_gt), num_gt, name='best_iou_per_gt')]
    for th in (0.3, 0.5):
        hits = tf.reduce_sum(tf.cast(best_per_gt >= th, tf.float32))
        summaries.append(tf.truediv(hits, num_gt, name='recall_iou{}'.format(th)))
    add_moving_summary(*summaries)


class BoxProposals:
    """RoIs and, in training, their classification and regression targets.

    Attributes:
        boxes: float32 [K, 4] x1y1x2y2 image pixels.
        labels: int64 [K] in [0, C], 0 = background (training only).
        fg_inds_wrt_gt: int64 [F], the matched gt index of each foreground box, in the
            order of ``fg_inds()`` (training only).
    """

    def __init__(self, boxes, labels=None, fg_inds_wrt_gt=None):
        self.boxes = boxes
        self.labels = labels
        self.fg_inds_wrt_gt = fg_inds_wrt_gt

    @memoized_method
    def fg_inds(self):
        """int64 [F] indices of foreground boxes in [0, K)."""
        return tf.reshape(tf.where(self.labels > 0), [-1], name='fg_inds')

    @memoized_method
    def fg_boxes(self):
        """float32 [F, 4]."""
        return tf.gather(self.boxes, self.fg_inds(), name='fg_boxes')

    @memoized_method
    def fg_labels(self):
        """int64 [F] in [1, C]."""
        return tf.gather(self.labels, self.fg_inds(), name='fg_labels')


@under_name_scope()
def sample_fast_rcnn_targets(boxes, gt_boxes, gt_labels, fg_thresh=None):
    """Sample the RoIs one image trains its box head on.

    The ground-truth boxes join the proposals (matched to themselves), so every image with
    ground truth has foregrounds. Foregrounds (IoU >= fg_thresh) are capped at
    FRCNN.BATCH_PER_IM * FRCNN.FG_RATIO, chosen at random; random backgrounds fill up to
    FRCNN.BATCH_PER_IM in total. Matching is chunked (see ``best_gt_match``).

    Args:
        boxes: float32 [N, 4] proposals.
        gt_boxes: float32 [G, 4]; G may be 0 (all RoIs are then background).
        gt_labels: int64 [G] in [1, C].
        fg_thresh (float or None): foreground IoU; None = FRCNN.FG_THRESH.
    Returns:
        BoxProposals with boxes [K, 4] (foregrounds first), labels int64 [K] (0 = background)
        and fg_inds_wrt_gt int64 [F]; K <= FRCNN.BATCH_PER_IM. No gradient flows through.
    """
    if fg_thresh is None:
        fg_thresh = cfg.FRCNN.FG_THRESH
    max_iou, best_gt, best_per_gt = best_gt_match(boxes, gt_boxes)
    proposal_metrics(best_per_gt)

    num_gt = tf.shape(gt_boxes)[0]
    boxes = tf.concat([boxes, gt_boxes], axis=0)  # [N + G, 4]
    max_iou = tf.concat([max_iou, tf.ones([num_gt], tf.float32)], axis=0)
    best_gt = tf.concat([best_gt, tf.range(num_gt, dtype=tf.int64)], axis=0)

    fg_inds = tf.reshape(tf.where(max_iou >= fg_thresh), [-1])
    num_fg = tf.minimum(int(cfg.FRCNN.BATCH_PER_IM * cfg.FRCNN.FG_RATIO),
                        tf.size(fg_inds), name='num_fg')
    fg_inds = tf.random.shuffle(fg_inds)[:num_fg]
    bg_inds = tf.reshape(tf.where(max_iou < fg_thresh), [-1])
    num_bg = tf.minimum(cfg.FRCNN.BATCH_PER_IM - num_fg, tf.size(bg_inds), name='num_bg')
    bg_inds = tf.random.shuffle(bg_inds)[:num_bg]
    add_moving_summary(tf.cast(num_fg, tf.float32, name='num_fg_sampled'),
                       tf.cast(num_bg, tf.float32, name='num_bg_sampled'))

    fg_inds_wrt_gt = tf.gather(best_gt, fg_inds)
    labels = tf.concat([tf.gather(tf.cast(gt_labels, tf.int64), fg_inds_wrt_gt),
                        tf.zeros_like(bg_inds)], axis=0)
    sampled = tf.gather(boxes, tf.concat([fg_inds, bg_inds], axis=0))
    return BoxProposals(tf.stop_gradient(sampled, name='sampled_proposal_boxes'),
                        tf.stop_gradient(labels, name='sampled_labels'),
                        tf.stop_gradient(fg_inds_wrt_gt, name='fg_inds_wrt_gt'))


@under_name_scope()
def match_boxes_to_gt(boxes, gt_boxes, gt_labels, fg_thresh):
    """Label every box against the ground truth, without sampling (cascade stages 2+).

    Args:
        boxes: float32 [K, 4].
        gt_boxes: float32 [G, 4]; G may be 0.
        gt_labels: int64 [G] in [1, C].
        fg_thresh (float > 0): foreground IoU.
    Returns:
        BoxProposals over the same ``boxes`` (order kept), labels int64 [K] (0 where the
        best IoU < fg_thresh), fg_inds_wrt_gt int64 [F] in the order of ``fg_inds()``.
    """
    assert fg_thresh > 0, fg_thresh  # else G = 0 would make every box a foreground of nothing
    max_iou, best_gt, _ = best_gt_match(boxes, gt_boxes)
    fg_inds = tf.where(max_iou >= fg_thresh)  # [F, 1]
    fg_inds_wrt_gt = tf.gather(best_gt, fg_inds[:, 0])
    labels = tf.scatter_nd(fg_inds, tf.gather(tf.cast(gt_labels, tf.int64), fg_inds_wrt_gt),
                           tf.shape(boxes, out_type=tf.int64)[:1])
    return BoxProposals(boxes, tf.stop_gradient(labels, name='labels'),
                        tf.stop_gradient(fg_inds_wrt_gt, name='fg_inds_wrt_gt'))


@layer_register(log_shape=True)
def fastrcnn_outputs(feature, num_categories, class_agnostic_regression=False):
    """Classification and box regression layers (``class``, ``box``), initialised as Detectron.

    Args:
        feature: float32 [K, D] (any rank; flattened).
        num_categories (int): C.
        class_agnostic_regression (bool): one box per RoI instead of one per class.
    Returns:
        label_logits: float32 [K, C + 1].
        box_logits: float32 [K, C + 1, 4], or [K, 1, 4] when class-agnostic; encoded deltas
            multiplied by the regression weights (see ``encode_bbox_target``).
    """
    num_classes = num_categories + 1
    label_logits = FullyConnected('class', feature, num_classes,
                                  kernel_initializer=tf.random_normal_initializer(stddev=0.01))
    num_boxes = 1 if class_agnostic_regression else num_classes
    box_logits = FullyConnected('box', feature, num_boxes * 4,
                                kernel_initializer=tf.random_normal_initializer(stddev=0.001))
    box_logits = tf.reshape(box_logits, [-1, num_boxes, 4], name='output_box')
    return label_logits, box_logits


@under_name_scope()
def fastrcnn_losses(labels, label_logits, fg_boxes_encoded, fg_box_logits):
    """Detectron's Fast R-CNN losses.

    Args:
        labels: int64 [K] in [0, C].
        label_logits: float32 [K, C + 1].
        fg_boxes_encoded: float32 [F, 4] regression targets of the foreground RoIs (the RoIs
            with labels > 0, in order), already multiplied by the regression weights.
        fg_box_logits: float32 [F, C + 1, 4] or [F, 1, 4] (class-agnostic).
    Returns:
        [label_loss, box_loss], float32 scalars: softmax cross-entropy averaged over the K
        RoIs; smooth-L1 (beta 1) of the gt class's deltas summed over foregrounds and divided
        by K, as Detectron normalises it.
    """
    label_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=label_logits)
    label_loss = tf.reduce_mean(label_loss, name='label_loss')

    fg_inds = tf.reshape(tf.where(labels > 0), [-1])
    fg_labels = tf.gather(labels, fg_inds)
    if fg_box_logits.shape[1] == 1:
        fg_box_logits = fg_box_logits[:, 0]
    else:
        fg_box_logits = tf.gather(fg_box_logits, fg_labels[:, None], batch_dims=1)[:, 0]
    num_rois = tf.maximum(tf.cast(tf.size(labels), tf.float32), 1.)
    diff = tf.abs(fg_boxes_encoded - fg_box_logits)
    box_loss = tf.reduce_sum(tf.where(diff < 1., 0.5 * tf.square(diff), diff - 0.5))
    box_loss = tf.truediv(box_loss, num_rois, name='box_loss')

    with tf.name_scope('label_metrics'):
        num_fg = tf.cast(tf.size(fg_inds), tf.float32)
        safe_fg = tf.maximum(num_fg, 1.)
        prediction = tf.argmax(label_logits, axis=1)
        correct = tf.cast(tf.equal(prediction, labels), tf.float32)
        accuracy = tf.reduce_mean(correct, name='accuracy')
        fg_accuracy = tf.truediv(tf.reduce_sum(tf.gather(correct, fg_inds)), safe_fg,
                                 name='fg_accuracy')
        fg_as_bg = tf.cast(tf.equal(tf.gather(prediction, fg_inds), 0), tf.float32)
        false_negative = tf.truediv(tf.reduce_sum(fg_as_bg), safe_fg, name='false_negative')
    add_moving_summary(label_loss, box_loss, accuracy, fg_accuracy, false_negative,
                       tf.identity(num_fg, name='num_fg_label'))
    return [label_loss, box_loss]


class FastRCNNHead:
    """Decodes and scores the outputs of a box head over a set of RoIs.

    Args:
        proposals (BoxProposals): the K RoIs (with targets in training).
        box_logits: float32 [K, C + 1, 4] or [K, 1, 4] (class-agnostic).
        label_logits: float32 [K, C + 1].
        gt_boxes: float32 [G, 4] (training) or None.
        bbox_regression_weights: 4 floats, e.g. FRCNN.BBOX_REG_WEIGHTS.
    """

    def __init__(self, proposals, box_logits, label_logits, gt_boxes, bbox_regression_weights):
        self.proposals = proposals
        self.box_logits = box_logits
        self.label_logits = label_logits
        self.gt_boxes = gt_boxes
        self.bbox_regression_weights = tuple(float(w) for w in bbox_regression_weights)
        self.class_agnostic = box_logits.shape[1] == 1

    @memoized_method
    def fg_box_logits(self):
        """float32 [F, C + 1, 4] or [F, 1, 4]."""
        return tf.gather(self.box_logits, self.proposals.fg_inds(), name='fg_box_logits')

    @memoized_method
    def losses(self):
        """[label_loss, box_loss] (see ``fastrcnn_losses``)."""
        matched_gt = tf.gather(self.gt_boxes, self.proposals.fg_inds_wrt_gt)
        encoded = encode_bbox_target(matched_gt, self.proposals.fg_boxes(),
                                     self.bbox_regression_weights)
        return fastrcnn_losses(self.proposals.labels, self.label_logits, encoded,
                               self.fg_box_logits())

    @memoized_method
    def decoded_output_boxes(self):
        """float32 [K, C + 1, 4]: each class's box (the same box for all when agnostic)."""
        boxes = decode_bbox_target(self.box_logits, self.proposals.boxes[:, None, :],
                                   self.bbox_regression_weights)
        num_classes = tf.shape(self.label_logits)[1]
        return tf.tile(boxes, [1, num_classes, 1]) if self.class_agnostic else boxes

    @memoized_method
    def decoded_output_boxes_class_agnostic(self):
        """float32 [K, 4], for class-agnostic heads (the cascade)."""
        assert self.class_agnostic
        return decode_bbox_target(self.box_logits[:, 0], self.proposals.boxes,
                                  self.bbox_regression_weights)

    @memoized_method
    def output_scores(self, name=None):
        """float32 [K, C + 1] softmax probabilities."""
        return tf.nn.softmax(self.label_logits, name=name)

    @memoized_method
    def predicted_labels(self):
        """int64 [K] in [0, C]."""
        return tf.argmax(self.label_logits, axis=1, name='predicted_labels')


@under_name_scope()
def fastrcnn_predictions(boxes, scores):
    """Final detections of one image: per-class NMS, score threshold, top-k overall.

    One vectorised op (combined NMS) runs every class's NMS; no per-class graph loop.

    Args:
        boxes: float32 [K, C, 4] x1y1x2y2, each RoI's decoded box per foreground class.
        scores: float32 [K, C] foreground class probabilities (background column removed).
    Returns:
        boxes float32 [D, 4], scores float32 [D] (descending), labels int32 [D] in [1, C];
        D <= TEST.RESULTS_PER_IM, every score > TEST.RESULT_SCORE_THRESH.
    """
    topk = cfg.TEST.RESULTS_PER_IM
    # The op only needs a consistent coordinate order; clip_boxes=False keeps pixels as is.
    nms_boxes, nms_scores, nms_classes, valid = tf.image.combined_non_max_suppression(
        boxes[None], scores[None], max_output_size_per_class=topk, max_total_size=topk,
        iou_threshold=cfg.TEST.FRCNN_NMS_THRESH, score_threshold=cfg.TEST.RESULT_SCORE_THRESH,
        pad_per_class=False, clip_boxes=False)
    num = valid[0]
    final_boxes = tf.identity(nms_boxes[0, :num], name='boxes')
    final_scores = tf.identity(nms_scores[0, :num], name='scores')
    final_labels = tf.add(tf.cast(nms_classes[0, :num], tf.int32), 1, name='labels')
    return final_boxes, final_scores, final_labels


def _flatten_nchw(feature, data_format):
    """[K, ...] flattened in NCHW order, so an FC layer's weights mean the same in either
    layout (and load from model-zoo weights trained in NCHW)."""
    if data_format == 'NHWC':
        feature = tf.transpose(feature, [0, 3, 1, 2])
    return tf.reshape(feature, [-1, feature.shape[1:].num_elements()])


@layer_register(log_shape=True)
def fastrcnn_2fc_head(feature):
    """Two FC layers ``fc6``, ``fc7`` of FPN.FRCNN_FC_HEAD_DIM with ReLU.

    Args:
        feature: float32 RoI features [K, S, S, Ch] or [K, Ch, S, S] (BACKBONE.DATA_FORMAT).
    Returns:
        float32 [K, FPN.FRCNN_FC_HEAD_DIM] (a pruned model: fc7's PRUNE.CHANNELS).
    """
    dim = cfg.FPN.FRCNN_FC_HEAD_DIM
    init = tf.variance_scaling_initializer()
    hidden = _flatten_nchw(feature, cfg.BACKBONE.DATA_FORMAT)
    hidden = FullyConnected('fc6', hidden, layer_width('fc6', dim), kernel_initializer=init,
                            activation=tf.nn.relu)
    return FullyConnected('fc7', hidden, layer_width('fc7', dim), kernel_initializer=init,
                          activation=tf.nn.relu)


@layer_register(log_shape=True)
def fastrcnn_Xconv1fc_head(feature, num_convs, norm=None):
    """``num_convs`` 3x3 convs ``conv{k}`` (+ GroupNorm ``gn{k}``) then one FC ``fc``.

    Conv -> ReLU -> GN is the tensorpack model-zoo order, so its GN weights load as trained.

    Args:
        feature: float32 RoI features in BACKBONE.DATA_FORMAT.
        num_convs (int): conv layers of FPN.FRCNN_CONV_HEAD_DIM channels.
        norm (str or None): None or 'GN'.
    Returns:
        float32 [K, FPN.FRCNN_FC_HEAD_DIM] (a pruned model: fc's PRUNE.CHANNELS).
    """
    assert norm in (None, 'GN'), norm
    data_format = cfg.BACKBONE.DATA_FORMAT
    hidden = feature
    # Detectron's MSRAFill is fan-out
    init = tf.variance_scaling_initializer(scale=2.0, mode='fan_out',
                                           distribution='untruncated_normal')
    with argscope([Conv2D, GroupNorm], data_format=data_format), \
            argscope(Conv2D, kernel_initializer=init):
        for k in range(num_convs):
            name = 'conv{}'.format(k)
            hidden = Conv2D(name, hidden, layer_width(name, cfg.FPN.FRCNN_CONV_HEAD_DIM), 3,
                            activation=tf.nn.relu)
            if norm is not None:
                hidden = GroupNorm('gn{}'.format(k), hidden)
    return FullyConnected('fc', _flatten_nchw(hidden, data_format),
                          layer_width('fc', cfg.FPN.FRCNN_FC_HEAD_DIM),
                          kernel_initializer=tf.variance_scaling_initializer(),
                          activation=tf.nn.relu)


def fastrcnn_4conv1fc_head(*args, **kwargs):
    return fastrcnn_Xconv1fc_head(*args, num_convs=4, **kwargs)


def fastrcnn_4conv1fc_gn_head(*args, **kwargs):
    return fastrcnn_Xconv1fc_head(*args, num_convs=4, norm='GN', **kwargs)


# FPN.FRCNN_HEAD_FUNC name -> function; the names are config_defaults.FRCNN_HEAD_FUNCS
# (validated by config.py).
HEAD_FUNCS = {name: globals()[name] for name in FRCNN_HEAD_FUNCS}
