"""Cascade R-CNN (Cai & Vasconcelos, 2018): three box heads, each refining the last's boxes.

Boxes are float32 x1y1x2y2 image pixels, floating-point convention. K RoIs, C classes.
Written with plain graph ops only (no custom gradients, no control flow around the heads),
so it builds and trains under TF 2.18's tf.compat.v1 graph mode.
"""
import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow.compat.v1 as tf
from tensorpack.tfutils.tower import get_current_tower_context

from config import config as cfg

from .model_box import area, clip_boxes
from .model_frcnn import BoxProposals, FastRCNNHead, fastrcnn_outputs, match_boxes_to_gt

__all__ = ['CascadeRCNNHead']


def _scale_gradient(x, scale):
    """Exactly ``x`` forward; gradient multiplied by ``scale`` (plain ops, no custom gradient)."""
    frozen = tf.stop_gradient(x)
    return frozen + scale * (x - frozen)


class CascadeRCNNHead:
    """The cascade of CASCADE.IOUS stages, scopes ``cascade_rcnn_stage{1,2,3}``.

    Stage s regresses class-agnostic boxes with weights CASCADE.BBOX_REG_WEIGHTS[s]; its
    clipped, gradient-stopped output boxes are the next stage's RoIs. In training, stage
    s > 1 relabels every incoming box against the ground truth at IoU CASCADE.IOUS[s] (no
    sub-sampling, as Detectron's Cascade R-CNN), dropping empty boxes first. The RoI
    features' gradient is scaled by 1 / #stages so the backbone sees the average stage.

    Scores (our choice, as the tensorpack model zoo): the mean of the stages' softmax
    scores, each stage scoring its own input RoIs. In inference no box is dropped, so row
    i of every stage is the same proposal refined step by step; this costs no extra head
    run, unlike re-scoring the last stage's RoIs with the earlier classifiers.

    Args:
        proposals (BoxProposals): stage-1 RoIs, sampled with targets in training (IoU
            threshold CASCADE.IOUS[0]).
        roi_func: float32 [K, 4] boxes -> RoI features [K, ...].
        fastrcnn_head_func: layer_register'd head, called as ``f('head', features)``.
        gt_targets: (gt_boxes float32 [G, 4], gt_labels int64 [G]); ignored in inference.
        image_shape2d: int [2] (h, w) of the input image, to clip boxes.
        num_categories (int): C.
        is_training (bool or None): None = the current tower context's.
    """

    def __init__(self, proposals, roi_func, fastrcnn_head_func, gt_targets, image_shape2d,
                 num_categories, is_training=None):
        self.roi_func = roi_func
        self.fastrcnn_head_func = fastrcnn_head_func
        self.gt_boxes, self.gt_labels = gt_targets
        self.image_shape2d = image_shape2d
        self.num_categories = num_categories
        if is_training is None:
            is_training = get_current_tower_context().is_training
        self.is_training = is_training
        ious = cfg.CASCADE.IOUS
        self.num_stages = len(ious)
        assert self.num_stages == len(cfg.CASCADE.BBOX_REG_WEIGHTS), 'one weight per stage'

        self._heads, self._boxes = [], []
        for stage in range(self.num_stages):
            with tf.variable_scope('cascade_rcnn_stage{}'.format(stage + 1)):
                if stage > 0:
                    proposals = self._match_box_with_gt(self._boxes[-1], ious[stage])
                head, boxes = self._run_head(proposals, stage)
            self._heads.append(head)
            self._boxes.append(boxes)

    def _run_head(self, proposals, stage):
        """One stage on ``proposals``; returns (FastRCNNHead, refined boxes float32 [K', 4])."""
        features = _scale_gradient(self.roi_func(proposals.boxes), 1. / self.num_stages)
        hidden = self.fastrcnn_head_func('head', features)
        label_logits, box_logits = fastrcnn_outputs(
            'outputs', hidden, self.num_categories, class_agnostic_regression=True)
        head = FastRCNNHead(proposals, box_logits, label_logits, self.gt_boxes,
                            cfg.CASCADE.BBOX_REG_WEIGHTS[stage])
        boxes = clip_boxes(head.decoded_output_boxes_class_agnostic(), self.image_shape2d)
        if self.is_training:  # an empty box has no regression target (log of 0)
            boxes = tf.boolean_mask(boxes, area(boxes) > 0)
        return head, tf.stop_gradient(boxes, name='output_boxes')

    def _match_box_with_gt(self, boxes, iou_threshold):
        """BoxProposals of ``boxes``: relabelled against the gt in training, bare otherwise."""
        if not self.is_training:
            return BoxProposals(boxes)
        return match_boxes_to_gt(boxes, self.gt_boxes, self.gt_labels, iou_threshold,
                                 name_scope='match_box_with_gt_{}'.format(iou_threshold))

    def losses(self):
        """[label_loss, box_loss] of every stage, equally weighted (2 * #stages scalars)."""
        ret = []
        for stage, head in enumerate(self._heads):
            with tf.name_scope('cascade_loss_stage{}'.format(stage + 1)):
                ret.extend(head.losses())
        return ret

    def decoded_output_boxes(self):
        """float32 [K, C + 1, 4]: the last stage's class-agnostic boxes for every class."""
        boxes = self._boxes[-1][:, None, :]
        return tf.tile(boxes, [1, self.num_categories + 1, 1])

    def output_scores(self, name=None):
        """float32 [K, C + 1]: the mean of the stages' softmax scores."""
        scores = [head.output_scores('cascade_scores_stage{}'.format(stage + 1))
                  for stage, head in enumerate(self._heads)]
        return tf.multiply(tf.add_n(scores), 1. / self.num_stages, name=name)
