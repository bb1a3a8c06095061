"""Fast R-CNN / Mask R-CNN / Cascade heads: matching, sampling, losses, predictions, masks."""

import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tensorpack.models import FullyConnected

from config import config as cfg
from modeling import model_frcnn
from modeling.model_box import roi_align
from modeling.model_cascade import CascadeRCNNHead
from modeling.model_frcnn import (BoxProposals, FastRCNNHead, best_gt_match, fastrcnn_2fc_head,
                                  fastrcnn_4conv1fc_gn_head, fastrcnn_losses, fastrcnn_outputs,
                                  fastrcnn_predictions, sample_fast_rcnn_targets)
from modeling.model_mrcnn import (crop_gt_masks, maskrcnn_loss, maskrcnn_up4conv_gn_head,
                                  maskrcnn_up4conv_head)
from utils import np_box_ops


@pytest.fixture
def tiny_cfg(fresh_cfg):
    """A small, NHWC config (restored by ``fresh_cfg``)."""
    fresh_cfg.update_args(['BACKBONE.DATA_FORMAT=NHWC', 'FRCNN.BATCH_PER_IM=64',
                           'FPN.FRCNN_FC_HEAD_DIM=16',
                           'FPN.FRCNN_CONV_HEAD_DIM=32',  # GroupNorm's 32 groups
                           'MRCNN.HEAD_DIM=32'])
    return fresh_cfg


def _boxes(rng, n, size=200., lo=8., hi=60.):
    xy = rng.uniform(0, size - hi, (n, 2))
    wh = rng.uniform(lo, hi, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _session_run(fetches, run_options=None, run_metadata=None):
    with tf.Session() as sess:
        sess.run([tf.global_variables_initializer(), tf.local_variables_initializer()])
        return sess.run(fetches, options=run_options, run_metadata=run_metadata)


def test_chunked_match_equals_dense_numpy():
    rng = np.random.RandomState(0)
    boxes, gt = _boxes(rng, 300), _boxes(rng, 700)  # 700 gt = 3 chunks, the last partial
    assert model_frcnn.GT_MATCH_CHUNK == 256
    with tf.Graph().as_default():
        max_iou, best_gt, per_gt = _session_run(best_gt_match(tf.constant(boxes),
                                                              tf.constant(gt)))
    dense = np_box_ops.pairwise_iou(boxes, gt)
    np.testing.assert_allclose(max_iou, dense.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(per_gt, dense.max(axis=0), atol=1e-5)
    # argmax wherever the best gt is not tied (within float error) with a runner-up
    top2 = np.sort(dense, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.sum() > 250
    np.testing.assert_array_equal(best_gt[clear], dense.argmax(axis=1)[clear])
    # ... and the matched gt really reaches the max everywhere
    np.testing.assert_allclose(dense[np.arange(300), best_gt], dense.max(axis=1), atol=1e-5)


def _sample(boxes, gt, labels, fg_thresh=None):
    with tf.Graph().as_default():
        p = sample_fast_rcnn_targets(tf.constant(boxes), tf.constant(gt.reshape(-1, 4)),
                                     tf.constant(labels, tf.int64), fg_thresh=fg_thresh)
        return _session_run([p.boxes, p.labels, p.fg_inds_wrt_gt])


def test_sampling_thresholds_and_caps(tiny_cfg):
    rng = np.random.RandomState(1)
    gt = _boxes(rng, 40)
    labels = rng.randint(1, 5, 40).astype(np.int64)
    # proposals: jittered gt (many foregrounds) plus random boxes (mostly background)
    jitter = gt[rng.randint(0, 40, 400)] + rng.uniform(-6, 6, (400, 4)).astype(np.float32)
    boxes = np.concatenate([jitter, _boxes(rng, 400)])
    rois, roi_labels, fg_wrt_gt = _sample(boxes, gt, labels)
    num_fg = int((roi_labels > 0).sum())
    assert len(rois) == cfg.FRCNN.BATCH_PER_IM  # plenty of both kinds
    assert num_fg == int(cfg.FRCNN.BATCH_PER_IM * cfg.FRCNN.FG_RATIO)  # capped, many more exist
    assert np.all(roi_labels[:num_fg] > 0) and np.all(roi_labels[num_fg:] == 0)  # fg first
    np.testing.assert_array_equal(roi_labels[:num_fg], labels[fg_wrt_gt])
    iou = np_box_ops.pairwise_iou(rois, gt)
    assert np.all(iou[np.arange(num_fg), fg_wrt_gt] >= cfg.FRCNN.FG_THRESH - 1e-6)
    np.testing.assert_allclose(iou[np.arange(num_fg), fg_wrt_gt], iou[:num_fg].max(1), atol=1e-5)
    assert np.all(iou[num_fg:].max(axis=1) < cfg.FRCNN.FG_THRESH)


def test_sampling_includes_gt_and_handles_no_gt(tiny_cfg):
    rng = np.random.RandomState(2)
    gt = np.array([[10, 10, 50, 60], [100, 100, 140, 130]], np.float32)
    far = _boxes(rng, 50, size=60.) + 140.  # nowhere near the gt: all background
    rois, roi_labels, fg_wrt_gt = _sample(far, gt, np.array([3, 1], np.int64))
    assert (roi_labels > 0).sum() == 2  # exactly the gt boxes, matched to themselves
    order = np.argsort(fg_wrt_gt)
    np.testing.assert_array_equal(rois[:2][order], gt)
    np.testing.assert_array_equal(roi_labels[:2][order], [3, 1])
    assert len(rois) == 52

    rois, roi_labels, fg_wrt_gt = _sample(far, np.zeros((0, 4), np.float32),
                                          np.zeros([0], np.int64))
    assert len(rois) == 50 and np.all(roi_labels == 0) and fg_wrt_gt.size == 0


def test_dense_scene_never_builds_dense_iou(tiny_cfg):
    """5000 gt x 2000 proposals: no tensor of the run may be anywhere near [N + G, G]."""
    rng = np.random.RandomState(3)
    num_boxes, num_gt = 2000, 5000
    boxes, gt = _boxes(rng, num_boxes, size=1000.), _boxes(rng, num_gt, size=1000., hi=30.)
    with tf.Graph().as_default():
        p = sample_fast_rcnn_targets(tf.constant(boxes), tf.constant(gt),
                                     tf.constant(rng.randint(1, 9, num_gt), tf.int64))
        meta = tf.RunMetadata()
        rois, labels = _session_run([p.boxes, p.labels],
                                    tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE), meta)
    assert len(rois) == cfg.FRCNN.BATCH_PER_IM and labels.max() > 0
    sizes = [int(np.prod([d.size for d in out.tensor_description.shape.dim]))
             for dev in meta.step_stats.dev_stats for node in dev.node_stats
             for out in node.output]
    assert len(sizes) > 50  # the trace did record the loop's tensors
    # a chunk's IoU is 2000 x 256; a dense one would be >= 2000 x 5000
    assert max(sizes) <= num_boxes * model_frcnn.GT_MATCH_CHUNK, max(sizes)


def test_predictions_per_class_nms_threshold_and_cap(tiny_cfg):
    a = [10., 10., 50., 50.]
    b = [12., 12., 52., 52.]  # IoU(a, b) ~ 0.82
    far = [[100. + 20 * i, 100., 115. + 20 * i, 115.] for i in range(5)]
    boxes = np.array([[a, a], [b, b]] + [[f, f] for f in far], np.float32)  # [7, 2 classes, 4]
    scores = np.array([[0.9, 0.0], [0.8, 0.7]] + [[0.3 - 0.01 * i, 0.01] for i in range(5)],
                      np.float32)

    def run():
        with tf.Graph().as_default():
            return _session_run(fastrcnn_predictions(tf.constant(boxes), tf.constant(scores)))

    out_boxes, out_scores, out_labels = run()
    assert out_labels.dtype == np.int32
    # a (class 1) suppresses b in class 1, b survives in class 2; 0.01 scores are thresholded
    np.testing.assert_allclose(out_scores, [0.9, 0.7, 0.3, 0.29, 0.28, 0.27, 0.26], atol=1e-6)
    np.testing.assert_array_equal(out_labels, [1, 2, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(out_boxes[:2], [a, b])
    cfg.TEST.RESULTS_PER_IM = 3
    _, out_scores, _ = run()
    np.testing.assert_allclose(out_scores, [0.9, 0.7, 0.3], atol=1e-6)


def test_fastrcnn_losses_match_numpy():
    rng = np.random.RandomState(4)
    labels = np.array([2, 0, 1, 0, 0, 3], np.int64)
    logits = rng.randn(6, 4).astype(np.float32)
    targets = rng.randn(3, 4).astype(np.float32) * 2
    box_logits = rng.randn(3, 4, 4).astype(np.float32)
    with tf.Graph().as_default():
        label_loss, box_loss = _session_run(fastrcnn_losses(
            tf.constant(labels), tf.constant(logits), tf.constant(targets),
            tf.constant(box_logits)))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(label_loss, -logp[np.arange(6), labels].mean(), rtol=1e-5)
    diff = np.abs(targets - box_logits[np.arange(3), labels[labels > 0]])
    smooth = np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5)
    np.testing.assert_allclose(box_loss, smooth.sum() / 6, rtol=1e-5)  # / all RoIs


def test_fastrcnn_head_overfits_toy(tiny_cfg):
    rng = np.random.RandomState(5)
    num, num_cat = 32, 3
    rois = _boxes(rng, num)
    labels = rng.randint(0, num_cat + 1, num).astype(np.int64)
    fg = np.flatnonzero(labels)
    gt = rois[fg] + rng.uniform(-5, 5, (len(fg), 4)).astype(np.float32)
    with tf.Graph().as_default():
        feature = tf.constant(rng.randn(num, 16).astype(np.float32))
        hidden = FullyConnected('fc', feature, 32, activation=tf.nn.relu)
        label_logits, box_logits = fastrcnn_outputs('fastrcnn', hidden, num_cat)
        proposals = BoxProposals(tf.constant(rois), tf.constant(labels),
                                 tf.constant(np.arange(len(fg)), tf.int64))
        head = FastRCNNHead(proposals, box_logits, label_logits, tf.constant(gt),
                            cfg.FRCNN.BBOX_REG_WEIGHTS)
        losses = head.losses()
        train = tf.train.AdamOptimizer(0.01).minimize(tf.add_n(losses))
        decoded = head.decoded_output_boxes()
        assert decoded.shape.as_list() == [num, num_cat + 1, 4]
        with tf.Session() as sess:
            sess.run([tf.global_variables_initializer(), tf.local_variables_initializer()])
            first = sess.run(losses)
            for _ in range(150):
                sess.run(train)
            last, boxes = sess.run([losses, decoded])
    assert np.all(np.isfinite(first)) and np.all(np.isfinite(last))
    assert last[0] < 0.3 * first[0] and last[1] < 0.3 * first[1], (first, last)
    # the regression learnt the gt boxes of the foregrounds' own class
    np.testing.assert_allclose(boxes[fg, labels[fg]], gt, atol=1.5)


def test_box_and_mask_head_shapes_and_names(tiny_cfg):
    with tf.Graph().as_default():
        roi_feature = tf.zeros([5, 7, 7, 8])
        fc = fastrcnn_2fc_head('fastrcnn', roi_feature)
        conv = fastrcnn_4conv1fc_gn_head('fastrcnn_gn', roi_feature)
        masks = maskrcnn_up4conv_head('maskrcnn', tf.zeros([5, 14, 14, 8]), 3)
        gn_masks = maskrcnn_up4conv_gn_head('maskrcnn_gn', tf.zeros([5, 14, 14, 8]), 3)
        names = {v.op.name for v in tf.global_variables()}
    assert fc.shape.as_list() == [5, 16] and conv.shape.as_list() == [5, 16]
    assert masks.shape.as_list() == [5, 3, 28, 28] == gn_masks.shape.as_list()
    for name in ['fastrcnn/fc6/W', 'fastrcnn/fc7/b', 'fastrcnn_gn/conv3/W', 'fastrcnn_gn/fc/W',
                 'maskrcnn/fcn0/W', 'maskrcnn/fcn3/W', 'maskrcnn/deconv/W', 'maskrcnn/conv/W']:
        assert name in names, (name, sorted(names))
    assert any(n.startswith('fastrcnn_gn/gn0/') for n in names)
    assert any(n.startswith('maskrcnn_gn/gn3/') for n in names)

    cfg.BACKBONE.DATA_FORMAT = 'NCHW'  # built only: NCHW convs are unusable on CPU
    with tf.Graph().as_default():
        conv = fastrcnn_4conv1fc_gn_head('fastrcnn', tf.zeros([5, 8, 7, 7]))
        masks = maskrcnn_up4conv_gn_head('maskrcnn', tf.zeros([5, 8, 14, 14]), 3)
    assert conv.shape.as_list() == [5, 16] and masks.shape.as_list() == [5, 3, 28, 28]


def _np_mask_targets(masks, gt_boxes, inds, rois, res):
    """Bilinear value of the zero-extended bitmap at each bin centre, binarised at 0.5."""
    size = masks.shape[1]
    out = np.zeros((len(rois), res, res), np.float64)
    for k, (roi, g) in enumerate(zip(rois, inds)):
        bitmap = np.pad(masks[g].astype(np.float64), 1)
        gx1, gy1, gx2, gy2 = gt_boxes[g]
        centres = (np.arange(res) + 0.5) / res
        xs = ((roi[0] + centres * (roi[2] - roi[0])) - gx1) / (gx2 - gx1) * size - 0.5 + 1
        ys = ((roi[1] + centres * (roi[3] - roi[1])) - gy1) / (gy2 - gy1) * size - 0.5 + 1
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                y0, x0 = int(np.floor(y)), int(np.floor(x))
                fy, fx = y - y0, x - x0
                val = 0.
                for dy, wy in ((0, 1 - fy), (1, fy)):
                    for dx, wx in ((0, 1 - fx), (1, fx)):
                        yy, xx = y0 + dy, x0 + dx
                        if 0 <= yy < size + 2 and 0 <= xx < size + 2:
                            val += wy * wx * bitmap[yy, xx]
                out[k, i, j] = val
    return out


def _crop(masks, gt_boxes, inds, rois, res):
    with tf.Graph().as_default():
        return _session_run(crop_gt_masks(tf.constant(masks), tf.constant(gt_boxes),
                                          tf.constant(inds), tf.constant(rois), res))


def test_crop_gt_masks_integer_aligned_exact():
    rng = np.random.RandomState(6)
    masks = (rng.rand(2, 8, 8) > 0.5).astype(np.uint8)
    gt_boxes = np.array([[10, 20, 26, 36], [0, 0, 8, 8]], np.float32)  # 2 px per bitmap pixel
    rois = np.array([[14, 24, 22, 32],  # bitmap pixels 2..5
                     [6, 20, 14, 28],   # half outside the gt box on the left
                     [2, 3, 6, 7]], np.float32)  # 1 px per bitmap pixel, 4 bins
    inds = np.array([0, 0, 1], np.int64)
    out = _crop(masks, gt_boxes, inds, rois, 4)
    assert out.dtype == np.float32 and out.shape == (3, 4, 4)
    np.testing.assert_array_equal(out[0], masks[0, 2:6, 2:6])
    np.testing.assert_array_equal(out[1, :, :2], 0)  # outside the gt box: 0
    np.testing.assert_array_equal(out[1, :, 2:], masks[0, 0:4, 0:2])
    np.testing.assert_array_equal(out[2], masks[1, 3:7, 2:6])
    np.testing.assert_array_equal(out, _np_mask_targets(masks, gt_boxes, inds, rois, 4) >= 0.5)


def test_crop_gt_masks_fractional_close_to_numpy():
    rng = np.random.RandomState(7)
    masks = np.zeros((3, 16, 16), np.uint8)
    masks[:, 3:13, 4:11] = 1  # blobs, so the bilinear field has real 0.5 crossings
    masks[1, 6:9, :] = 0
    gt_boxes = _boxes(rng, 3, size=100., lo=20., hi=50.)
    inds = rng.randint(0, 3, 12)
    rois = gt_boxes[inds] + rng.uniform(-8, 8, (12, 4)).astype(np.float32)
    out = _crop(masks, gt_boxes, inds, rois, 7)
    soft = _np_mask_targets(masks, gt_boxes, inds, rois, 7)
    decided = np.abs(soft - 0.5) > 1e-3
    assert decided.mean() > 0.95 and 0.1 < out.mean() < 0.9
    np.testing.assert_array_equal(out[decided], (soft >= 0.5)[decided])


def test_mask_loss_uses_only_gt_channel():
    rng = np.random.RandomState(8)
    logits = rng.randn(3, 4, 6, 6).astype(np.float32)
    labels = np.array([1, 3, 4], np.int64)
    targets = (rng.rand(3, 6, 6) > 0.5).astype(np.float32)

    def loss(lg):
        with tf.Graph().as_default():
            return _session_run(maskrcnn_loss(tf.constant(lg), tf.constant(labels),
                                              tf.constant(targets)))

    base = loss(logits)
    chosen = logits[np.arange(3), labels - 1]
    ref = np.maximum(chosen, 0) - chosen * targets + np.log1p(np.exp(-np.abs(chosen)))
    np.testing.assert_allclose(base, ref.mean(), rtol=1e-5)
    others = logits.copy()
    others[[0, 0, 1, 2], [1, 3, 0, 1]] += 5.  # channels that are not the gt class
    np.testing.assert_allclose(loss(others), base, rtol=1e-6)
    changed = logits.copy()
    changed[1, 2] += 1.  # the gt class's channel of RoI 1
    assert abs(loss(changed) - base) > 1e-3


def _cascade(is_training, gt, gt_labels, proposals_np, num_cat=3):
    rng = np.random.RandomState(9)
    featuremap = tf.constant(rng.randn(1, 16, 16, 8).astype(np.float32))
    featuremap = FullyConnected('feat', tf.reshape(featuremap, [-1, 8]), 8)  # trainable input
    featuremap = tf.reshape(featuremap, [1, 16, 16, 8])
    gt_boxes = tf.constant(gt)
    if is_training:
        proposals = sample_fast_rcnn_targets(tf.constant(proposals_np), gt_boxes,
                                             tf.constant(gt_labels), fg_thresh=cfg.CASCADE.IOUS[0])
    else:
        proposals = BoxProposals(tf.constant(proposals_np))
    return CascadeRCNNHead(proposals, lambda b: roi_align(featuremap, b / 8., 7),
                           fastrcnn_2fc_head, (gt_boxes, tf.constant(gt_labels)),
                           tf.constant([128, 128]), num_cat, is_training=is_training)


def test_cascade_trains_one_step_and_infers(tiny_cfg):
    rng = np.random.RandomState(10)
    gt = _boxes(rng, 4, size=128., lo=20., hi=50.)
    gt_labels = np.array([1, 2, 3, 1], np.int64)
    proposals = np.concatenate([gt + rng.uniform(-4, 4, (4, 4)).astype(np.float32),
                                _boxes(rng, 40, size=128.)])
    with tf.Graph().as_default():
        head = _cascade(True, gt, gt_labels, proposals)
        losses = head.losses()
        assert len(losses) == 6
        train = tf.train.GradientDescentOptimizer(0.01).minimize(tf.add_n(losses))
        names = {v.op.name for v in tf.global_variables()}
        with tf.Session() as sess:
            sess.run([tf.global_variables_initializer(), tf.local_variables_initializer()])
            before = sess.run(losses)
            sess.run(train)
            after = sess.run(losses)
    assert np.all(np.isfinite(before)) and np.all(np.isfinite(after))
    assert not np.allclose(before, after)  # the step changed the weights
    for stage in (1, 2, 3):
        assert 'cascade_rcnn_stage{}/head/fc6/W'.format(stage) in names
        assert 'cascade_rcnn_stage{}/outputs/box/W'.format(stage) in names

    with tf.Graph().as_default():
        head = _cascade(False, gt, gt_labels, proposals)
        boxes, scores = head.decoded_output_boxes(), head.output_scores()
        final = fastrcnn_predictions(boxes[:, 1:], scores[:, 1:])
        boxes, scores, final = _session_run([boxes, scores, final])
    assert boxes.shape == (44, 4, 4) and scores.shape == (44, 4)
    assert np.all(np.isfinite(boxes)) and np.all(boxes >= 0) and np.all(boxes <= 128)
    np.testing.assert_allclose(scores.sum(axis=1), 1., rtol=1e-5)
    assert final[0].shape[1] == 4 and len(final[0]) == len(final[1]) == len(final[2])
