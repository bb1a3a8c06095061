"""The full models: backbone -> (FPN) -> RPN -> box head(s) -> mask head.

``build_model()`` is the one way to get the model of the config: ``ResNetC4Model``,
``ResNetFPNModel`` or ``CascadeRCNNModel``, tensorpack ``ModelDesc``s. Their inputs are
the tensors of NOTES.md ("Graph inputs"); in training ``build_graph`` returns the total
cost, in inference it defines the stable outputs ``output/boxes`` [N, 4] (pixels of the
fed image), ``output/scores`` [N], ``output/labels`` int32 [N] in 1..C and, with
MODE_MASK, ``output/masks`` [N, R, R] probabilities (R = MRCNN.RESOLUTION for FPN, 14 for
C4), plus ``output/proposal_boxes`` [P, 4] and their objectness logits
``output/proposal_scores`` [P] (visualisation, comparisons with tensorpack).

``GeneralizedRCNN.build_graph`` calls three hooks in order, each declared (with shapes) on
the base class: ``backbone`` -> ``rpn`` -> ``roi_heads``. The FPN models add one more,
``box_head``, which the cascade overrides.
"""
import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

import math

import tensorflow.compat.v1 as tf
from tensorpack import ModelDesc
from tensorpack.models import GlobalAvgPooling, l2_regularizer, regularize_cost
from tensorpack.tfutils.summary import add_moving_summary

from config import config as cfg
from utils.anchors import get_all_anchors, get_all_anchors_fpn, padded_size
from utils.compat import accum_grad_optimizer
from utils.graph_inputs import image_pad_multiple, input_names
from utils.precision import wrap_optimizer

from . import batching, model_frcnn, model_mrcnn
from .backbone import num_blocks_for_depth, resnet_c4_backbone, resnet_conv5, resnet_fpn_backbone
from .model_box import clip_boxes, roi_align
from .model_cascade import CascadeRCNNHead
from .model_fpn import (fpn_model, generate_fpn_proposals, multilevel_roi_align,
                        multilevel_rpn_losses)
from .model_frcnn import (BoxProposals, FastRCNNHead, fastrcnn_outputs, fastrcnn_predictions,
                          sample_fast_rcnn_targets)
from .model_mrcnn import crop_gt_masks, maskrcnn_loss, maskrcnn_upXconv_head
from .model_rpn import RPNAnchors, generate_rpn_proposals, rpn_head, rpn_losses

__all__ = ['build_model', 'GeneralizedRCNN', 'ResNetC4Model', 'ResNetFPNModel',
           'CascadeRCNNModel', 'model_input_names']


def build_model(images=None):
    """The model the global config describes (MODE_FPN, CASCADE.ENABLED), not yet built.

    images (int or None): images per graph run; None: TRAIN.IMAGES_PER_DEVICE (a training
    model; its inference towers, e.g. evaluation during training, take as many)."""
    images = cfg.TRAIN.IMAGES_PER_DEVICE if images is None else images
    if not cfg.MODE_FPN:
        return ResNetC4Model(images)
    return CascadeRCNNModel(images) if cfg.CASCADE.ENABLED else ResNetFPNModel(images)


def model_input_names(is_training, images=None):
    """Ordered graph input names (NOTES.md); training datapoints are lists in this order.

    images: images per run (None: TRAIN.IMAGES_PER_DEVICE in training, 1 in inference);
    more than one adds ``image_sizes`` after ``image``."""
    if images is None:
        images = cfg.TRAIN.IMAGES_PER_DEVICE if is_training else 1
    if not is_training:
        return ['image', 'image_sizes'] if images > 1 else ['image']
    return input_names(cfg.MODE_FPN, cfg.MODE_MASK, cfg.FPN.ANCHOR_STRIDES, images > 1)


class GeneralizedRCNN(ModelDesc):
    """Shared parts: inputs, image normalisation and padding, optimizer, the cost; the
    hooks ``backbone``, ``rpn`` and ``roi_heads`` are the subclasses' (NotImplementedError
    here). ``self.training`` (tensorpack) tells whether the graph is a training tower.
    ``self.images`` images per run: with more than one every input gains a leading batch
    dimension N and ``image_sizes`` int32 [N, 2] gives each image's true (h, w)."""

    def __init__(self, images=1):
        self.images = images

    def inputs(self):
        c = cfg.PREPROC.IMAGE_CHANNELS
        specs = {'image': tf.TensorSpec((None, None, c), tf.float32, 'image'),
                 'gt_boxes': tf.TensorSpec((None, 4), tf.float32, 'gt_boxes'),
                 'gt_labels': tf.TensorSpec((None,), tf.int64, 'gt_labels'),
                 'gt_masks': tf.TensorSpec((None, cfg.MRCNN.GT_MASK_SIZE, cfg.MRCNN.GT_MASK_SIZE),
                                           tf.uint8, 'gt_masks')}
        a = cfg.RPN.NUM_ANCHOR
        for name in model_input_names(True):
            if name.startswith('anchor_labels'):
                specs[name] = tf.TensorSpec((None, None, a), tf.int32, name)
            elif name.startswith('anchor_boxes'):
                specs[name] = tf.TensorSpec((None, None, a, 4), tf.float32, name)
        if self.images > 1:
            specs = {n: tf.TensorSpec((self.images,) + tuple(s.shape), s.dtype, n)
                     for n, s in specs.items()}
            specs['image_sizes'] = tf.TensorSpec((self.images, 2), tf.int32, 'image_sizes')
        return [specs[n] for n in model_input_names(True, self.images)]

    def optimizer(self):
        lr = tf.get_variable('learning_rate', initializer=0.003, trainable=False)
        tf.summary.scalar('learning_rate-summary', lr)
        accum = cfg.TRAIN.GRADIENT_ACCUMULATION
        # AccumGradOptimizer sums k gradients; dividing the LR by k makes one update the
        # mean over the k x devices images, as the LR scaling rule assumes.
        opt = tf.train.MomentumOptimizer(lr / accum, cfg.TRAIN.MOMENTUM)
        if accum > 1:
            opt = accum_grad_optimizer(opt, accum)
        # fp16: dynamic loss scaling outermost, so a skipped (overflowed) step is skipped
        # before accumulation; fp32/bf16: unchanged (bf16 is a session graph rewrite).
        return wrap_optimizer(opt, cfg.TRAIN.PRECISION)

    def preprocess(self, image, sizes=None):
        """float32 [H, W, C] raw pixels -> normalised [1, Hp, Wp, C] or [1, C, Hp, Wp]; or
        a batch [N, H, W, C] with ``sizes`` int32 [N, 2] true (h, w) -> [N, Hp, Wp, C] (or
        NCHW), each image zero beyond its true size.

        Hp, Wp: H, W padded with zeros (after normalisation) to ``image_pad_multiple``
        (C4 without BACKBONE.C4_PAD_INPUT: not padded).
        """
        with tf.name_scope('image_preprocess'):
            mean = tf.constant(cfg.PREPROC.PIXEL_MEAN, tf.float32)
            std = tf.constant(cfg.PREPROC.PIXEL_STD, tf.float32)
            image = (image - mean) * (1. / std)
            mult = image_pad_multiple(cfg.MODE_FPN, cfg.BACKBONE.C4_PAD_INPUT)
            if sizes is None:
                image = (_pad_hw(image, mult, 0) if mult > 1 else image)[None]
            else:  # the batch padding is zero after normalisation, as the pad
                image = image * batching.valid_pixels(sizes, tf.shape(image)[1:3])
                image = _pad_hw(image, mult, 1) if mult > 1 else image
            if cfg.BACKBONE.DATA_FORMAT == 'NCHW':
                image = tf.transpose(image, [0, 3, 1, 2])
            return image

    def build_graph(self, *inputs):
        inputs = dict(zip(model_input_names(self.training, self.images), inputs))
        # conv0 must learn when the input channels differ from pretrained 3-channel weights
        train_conv0 = cfg.PREPROC.IMAGE_CHANNELS != 3
        if self.images == 1:
            image_shape2d = tf.shape(inputs['image'])[:2]
            features = self.backbone(self.preprocess(inputs['image']), train_conv0)
            losses = self.image_graph(features, inputs, image_shape2d)
        elif self.training:
            losses = self._batch_training_graph(inputs, train_conv0)
        else:
            self._batch_inference_graph(inputs, train_conv0)
        if not self.training:
            return None
        costs = [regularize_cost('.*/W', l2_regularizer(cfg.TRAIN.WEIGHT_DECAY), name='wd_cost')]
        if cfg.TRAIN.NORM_L1 > 0:  # sparse channel scales for prune.py --criterion gamma
            costs.append(regularize_cost(
                '.*/gamma', lambda g: cfg.TRAIN.NORM_L1 * tf.reduce_sum(tf.abs(g)),
                name='norm_l1_cost'))
        total_cost = tf.add_n(losses + costs, 'total_cost')
        add_moving_summary(total_cost, *costs)
        return total_cost

    def image_graph(self, features, inputs, image_shape2d):
        """``rpn`` then ``roi_heads`` of one image (arguments as theirs) -> list of losses."""
        proposals, rpn_losses_ = self.rpn(features, inputs, image_shape2d)
        return rpn_losses_ + self.roi_heads(features, proposals, inputs, image_shape2d)

    def _batch_training_graph(self, inputs, train_conv0):
        """The backbone once on the batch (BatchNorm statistics over all N images), then
        each image's RPN, sampling, heads and losses on its own region -> mean losses."""
        sizes = inputs['image_sizes']
        features = self.backbone(self.preprocess(inputs['image'], sizes), train_conv0)
        mult = image_pad_multiple(cfg.MODE_FPN, cfg.BACKBONE.C4_PAD_INPUT)
        per_image = []
        for i in range(self.images):
            with batching.image_scope(i):
                own = batching.image_features(features, i, sizes[i], self.feature_strides(),
                                              mult, cfg.BACKBONE.DATA_FORMAT)
                per_image.append(self.image_graph(own, batching.image_inputs(inputs, i),
                                                  sizes[i]))
        return batching.mean_losses(per_image)

    def _batch_inference_graph(self, inputs, train_conv0):
        """Each image through the whole single-image graph, padded only to its own
        multiple, so its outputs (``image{i}/output/...``) equal those of the image alone
        (a shared padded backbone would change the features near each image's border)."""
        sizes = inputs['image_sizes']
        for i in range(self.images):
            with batching.image_scope(i):
                image = inputs['image'][i, :sizes[i, 0], :sizes[i, 1]]
                features = self.backbone(self.preprocess(image), train_conv0)
                self.image_graph(features, {}, sizes[i])

    def feature_strides(self):
        """The strides of the maps ``backbone`` returns, e.g. (16,) or FPN.ANCHOR_STRIDES."""
        raise NotImplementedError

    def backbone(self, image, train_conv0):
        """Feature maps of the preprocessed image.

        Args:
            image: float32 [1, Hp, Wp, C] or [1, C, Hp, Wp] (BACKBONE.DATA_FORMAT), from
                ``preprocess``.
            train_conv0 (bool): the stem conv trains even where BACKBONE.FREEZE_AT freezes it.
        Returns:
            list of float32 [1, ch, Hp / s, Wp / s] (or NHWC) maps: [C4] at s = 16 (C4
            model) or [P2, ..., P6] at s = FPN.ANCHOR_STRIDES (FPN models).
        """
        raise NotImplementedError

    def rpn(self, features, inputs, image_shape2d):
        """Region proposals and, in training, the RPN losses.

        Args:
            features: the list ``backbone`` returned.
            inputs: dict of the graph inputs by name (NOTES.md), anchors included in training.
            image_shape2d: int32 [2], (H, W) of the unpadded input image.
        Returns:
            (BoxProposals of boxes float32 [P, 4] in image pixels, list of scalar losses;
            [] in inference). Also names the boxes ``output/proposal_boxes``.
        """
        raise NotImplementedError

    def roi_heads(self, features, proposals, inputs, image_shape2d):
        """Box (and mask) heads on the proposals.

        Args:
            features, inputs, image_shape2d: as ``rpn``; proposals: what ``rpn`` returned.
        Returns:
            list of scalar losses in training; in inference [] after defining the
            ``output/boxes``, ``output/scores``, ``output/labels`` (and ``output/masks``).
        """
        raise NotImplementedError

    def mask_outputs(self, mask_logits, labels):
        """[N, C, R, R] logits, labels int32 [N] in 1..C -> ``output/masks`` [N, R, R]."""
        idx = tf.stack([tf.range(tf.size(labels)), labels - 1], axis=1)
        return tf.sigmoid(tf.gather_nd(mask_logits, idx), name='output/masks')

    def mask_losses(self, mask_logits, proposals, inputs, resolution):
        """Mask loss on the foreground RoIs, targets cropped per RoI (never full-image)."""
        targets = crop_gt_masks(inputs['gt_masks'], inputs['gt_boxes'],
                                proposals.fg_inds_wrt_gt, proposals.fg_boxes(), resolution)
        return [maskrcnn_loss(mask_logits, proposals.fg_labels(), targets)]


def _pad_hw(image, mult, first):
    """Zero-pad axes ``first`` and ``first + 1`` (H, W of an HWC or NHWC image) at their
    end up to multiples of ``mult``."""
    shape = tf.shape(image)[first:first + 2]
    padded = tf.cast(tf.math.ceil(tf.cast(shape, tf.float32) / mult) * mult, tf.int32)
    pad = padded - shape
    return tf.pad(image, [[0, 0]] * first + [[0, pad[0]], [0, pad[1]], [0, 0]])


def _final_detections(head, image_shape2d):
    """Per-class NMS over a head's decoded boxes -> named output tensors (boxes, scores,
    labels int32 1..C)."""
    boxes = clip_boxes(head.decoded_output_boxes(), image_shape2d)   # [K, C+1, 4]
    scores = head.output_scores(name='output_scores')              # [K, C+1]
    boxes, scores, labels = fastrcnn_predictions(boxes[:, 1:], scores[:, 1:])
    return (tf.identity(boxes, name='output/boxes'), tf.identity(scores, name='output/scores'),
            tf.identity(labels, name='output/labels'))


class ResNetC4Model(GeneralizedRCNN):
    """ResNet stem..res4 -> RPN on C4 -> RoIAlign 14x14 -> res5 -> box and mask heads."""

    def feature_strides(self):
        return (cfg.RPN.ANCHOR_STRIDE,)

    def backbone(self, image, train_conv0):
        return [resnet_c4_backbone(image, num_blocks_for_depth(cfg.BACKBONE.DEPTH)[:3],
                                   train_conv0)]

    def rpn(self, features, inputs, image_shape2d):
        featuremap = features[0]
        training = self.training
        label_logits, box_logits = rpn_head('rpn', featuremap, cfg.RPN.HEAD_DIM, cfg.RPN.NUM_ANCHOR)
        max_size = padded_size(cfg.PREPROC.MAX_SIZE, image_pad_multiple(cfg.MODE_FPN, cfg.BACKBONE.C4_PAD_INPUT))
        all_anchors = get_all_anchors(cfg.RPN.ANCHOR_STRIDE, cfg.RPN.ANCHOR_SIZES,
                                      cfg.RPN.ANCHOR_RATIOS, max_size, cfg.RPN.ANCHOR_OFFSET)
        anchors = RPNAnchors(all_anchors, inputs.get('anchor_labels'),
                             inputs.get('anchor_boxes')).narrow_to(featuremap)
        pred_boxes = anchors.decode_logits(box_logits)  # [h, w, A, 4]
        proposals, proposal_scores = generate_rpn_proposals(
            tf.reshape(pred_boxes, [-1, 4]), tf.reshape(label_logits, [-1]), image_shape2d,
            cfg.RPN.TRAIN_PRE_NMS_TOPK if training else cfg.RPN.TEST_PRE_NMS_TOPK,
            cfg.RPN.TRAIN_POST_NMS_TOPK if training else cfg.RPN.TEST_POST_NMS_TOPK)
        tf.identity(proposals, name='output/proposal_boxes')
        tf.identity(proposal_scores, name='output/proposal_scores')
        if not training:
            return BoxProposals(proposals), []
        losses = rpn_losses(anchors.gt_labels, anchors.encoded_gt_boxes(), label_logits, box_logits)
        return BoxProposals(proposals), list(losses)

    def _res5_features(self, featuremap, boxes):
        rois = roi_align(featuremap, boxes * (1. / cfg.RPN.ANCHOR_STRIDE), 14,
                         cfg.BACKBONE.DATA_FORMAT)
        return resnet_conv5(rois, num_blocks_for_depth(cfg.BACKBONE.DEPTH)[-1])  # 7x7

    def _mask_logits(self, res5_features):
        # no extra convs on the C4 model: res5 features -> deconv 2x -> 14x14 logits
        return maskrcnn_upXconv_head('maskrcnn', res5_features, cfg.DATA.NUM_CATEGORY, 0)

    def roi_heads(self, features, proposals, inputs, image_shape2d):
        featuremap = features[0]
        if self.training:
            proposals = sample_fast_rcnn_targets(proposals.boxes, inputs['gt_boxes'],
                                                 inputs['gt_labels'])
        res5 = self._res5_features(featuremap, proposals.boxes)
        gap = GlobalAvgPooling('gap', res5, data_format=cfg.BACKBONE.DATA_FORMAT)
        label_logits, box_logits = fastrcnn_outputs('fastrcnn', gap, cfg.DATA.NUM_CATEGORY)
        head = FastRCNNHead(proposals, box_logits, label_logits, inputs.get('gt_boxes'),
                            cfg.FRCNN.BBOX_REG_WEIGHTS)
        if self.training:
            losses = list(head.losses())
            if cfg.MODE_MASK:
                fg_res5 = tf.gather(res5, proposals.fg_inds())
                losses += self.mask_losses(self._mask_logits(fg_res5), proposals, inputs, 14)
            return losses
        boxes, _, labels = _final_detections(head, image_shape2d)
        if cfg.MODE_MASK:
            with tf.variable_scope(tf.get_variable_scope(), reuse=True):  # res5 again
                res5_final = self._res5_features(featuremap, boxes)
            self.mask_outputs(self._mask_logits(res5_final), labels)
        return []


class ResNetFPNModel(GeneralizedRCNN):
    """ResNet -> FPN P2..P6 -> RPN per level -> multilevel RoIAlign -> box head -> mask."""

    def feature_strides(self):
        return tuple(cfg.FPN.ANCHOR_STRIDES)

    def backbone(self, image, train_conv0):
        c2345 = resnet_fpn_backbone(image, num_blocks_for_depth(cfg.BACKBONE.DEPTH), train_conv0)
        return fpn_model('fpn', c2345)

    def rpn(self, features, inputs, image_shape2d):
        max_size = padded_size(cfg.PREPROC.MAX_SIZE, image_pad_multiple(cfg.MODE_FPN, cfg.BACKBONE.C4_PAD_INPUT))
        all_anchors = get_all_anchors_fpn(cfg.FPN.ANCHOR_STRIDES, cfg.RPN.ANCHOR_SIZES,
                                          cfg.RPN.ANCHOR_RATIOS, max_size, cfg.RPN.ANCHOR_OFFSET)
        anchors, label_logits, box_logits = [], [], []
        for i, (featuremap, stride) in enumerate(zip(features, cfg.FPN.ANCHOR_STRIDES)):
            lvl = int(round(math.log2(stride)))
            # one RPN head shared by all levels
            with tf.variable_scope(tf.get_variable_scope(), reuse=i > 0):
                logits, deltas = rpn_head('rpn', featuremap, cfg.FPN.NUM_CHANNEL,
                                          len(cfg.RPN.ANCHOR_RATIOS))
            anchors.append(RPNAnchors(
                all_anchors[i], inputs.get('anchor_labels_lvl{}'.format(lvl)),
                inputs.get('anchor_boxes_lvl{}'.format(lvl))).narrow_to(featuremap))
            label_logits.append(logits)
            box_logits.append(deltas)
        pred_boxes = [a.decode_logits(d) for a, d in zip(anchors, box_logits)]
        proposals, proposal_scores = generate_fpn_proposals(pred_boxes, label_logits,
                                                            image_shape2d, self.training)
        tf.identity(proposals, name='output/proposal_boxes')
        tf.identity(proposal_scores, name='output/proposal_scores')
        if not self.training:
            return BoxProposals(proposals), []
        losses = multilevel_rpn_losses(anchors, label_logits, box_logits)
        return BoxProposals(proposals), list(losses)

    def box_head(self, roi_func, proposals, inputs, image_shape2d):
        """The box head on the RPN's proposals: one Fast R-CNN head (scope ``fastrcnn``).

        Args:
            roi_func: boxes float32 [K, 4] -> RoI features [K, ch, 7, 7] (or NHWC).
            proposals: BoxProposals from ``rpn``; inputs, image_shape2d: as ``rpn``.
        Returns:
            (proposals, head): the proposals sampled with targets in training (else as
            given), and a head with ``losses()``, ``decoded_output_boxes()`` [K, C+1, 4]
            and ``output_scores(name)`` [K, C+1].
        """
        if self.training:
            proposals = sample_fast_rcnn_targets(proposals.boxes, inputs['gt_boxes'],
                                                 inputs['gt_labels'],
                                                 fg_thresh=cfg.FRCNN.FG_THRESH)
        head_func = model_frcnn.HEAD_FUNCS[cfg.FPN.FRCNN_HEAD_FUNC]
        feature = head_func('fastrcnn', roi_func(proposals.boxes))
        label_logits, box_logits = fastrcnn_outputs('fastrcnn/outputs', feature,
                                                    cfg.DATA.NUM_CATEGORY)
        return proposals, FastRCNNHead(proposals, box_logits, label_logits,
                                       inputs.get('gt_boxes'), cfg.FRCNN.BBOX_REG_WEIGHTS)

    def roi_heads(self, features, proposals, inputs, image_shape2d):
        p2345 = features[:4]

        def roi_func(boxes):
            return multilevel_roi_align(p2345, boxes, 7)

        proposals, head = self.box_head(roi_func, proposals, inputs, image_shape2d)
        mask_head = model_mrcnn.HEAD_FUNCS[cfg.FPN.MRCNN_HEAD_FUNC]
        # the mask head upsamples its RoI features 2x to MRCNN.RESOLUTION
        mask_roi_size = cfg.MRCNN.RESOLUTION // 2
        num_cat = cfg.DATA.NUM_CATEGORY
        if self.training:
            losses = list(head.losses())
            if cfg.MODE_MASK:
                rois = multilevel_roi_align(p2345, proposals.fg_boxes(), mask_roi_size)
                logits = mask_head('maskrcnn', rois, num_cat)
                losses += self.mask_losses(logits, proposals, inputs, cfg.MRCNN.RESOLUTION)
            return losses
        boxes, _, labels = _final_detections(head, image_shape2d)
        if cfg.MODE_MASK:
            rois = multilevel_roi_align(p2345, boxes, mask_roi_size)
            self.mask_outputs(mask_head('maskrcnn', rois, num_cat), labels)
        return []


class CascadeRCNNModel(ResNetFPNModel):
    """The FPN model with Cascade R-CNN's box heads (CASCADE.*) in place of Fast R-CNN's."""

    def box_head(self, roi_func, proposals, inputs, image_shape2d):
        """As ``ResNetFPNModel.box_head``; stage 1 samples at IoU CASCADE.IOUS[0]."""
        if self.training:
            proposals = sample_fast_rcnn_targets(proposals.boxes, inputs['gt_boxes'],
                                                 inputs['gt_labels'],
                                                 fg_thresh=cfg.CASCADE.IOUS[0])
        head = CascadeRCNNHead(proposals, roi_func, model_frcnn.HEAD_FUNCS[cfg.FPN.FRCNN_HEAD_FUNC],
                               (inputs.get('gt_boxes'), inputs.get('gt_labels')),
                               image_shape2d, cfg.DATA.NUM_CATEGORY, self.training)
        return proposals, head
