"""Backbone, FPN and RPN graphs: shapes, variable names, freezing, losses, proposals.

NCHW graphs are built and their static shapes checked, but only NHWC graphs run: on CPU,
TensorFlow has no NCHW MaxPool kernel.
"""

import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tensorpack.tfutils.tower import TowerContext

from modeling import backbone, model_box, model_fpn, model_rpn
from utils import np_box_ops
from utils.anchors import get_all_anchors_fpn


@pytest.fixture
def config(fresh_cfg):
    """The global cfg in NHWC, unfrozen for the test (restored by ``fresh_cfg``)."""
    fresh_cfg.BACKBONE.DATA_FORMAT = 'NHWC'
    return fresh_cfg


def _image(fmt, h=64, w=96, c=3):
    return tf.placeholder(tf.float32, [1, h, w, c] if fmt == 'NHWC' else [1, c, h, w])


def _run(fetches, feed=None):
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        return sess.run(fetches, feed)


def _trainable_names():
    return {v.op.name for v in tf.trainable_variables()}


def _global_names():
    return {v.op.name for v in tf.global_variables()}


# ------------------------------------------------------------------------ backbone


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('fmt', ['NHWC', 'NCHW'])
def test_fpn_backbone_shapes(config, depth, fmt):
    config.BACKBONE.DEPTH = depth
    config.BACKBONE.DATA_FORMAT = fmt
    width = 1 if depth == 18 else 4
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        image = _image(fmt)
        feats = backbone.resnet_fpn_backbone(image, backbone.num_blocks_for_depth(depth))
        expected = [(1, 64 // s, 96 // s, c * width)
                    for s, c in zip((4, 8, 16, 32), (64, 128, 256, 512))]
        if fmt == 'NCHW':
            expected = [(n, c, h, w) for n, h, w, c in expected]
        assert [tuple(f.shape.as_list()) for f in feats] == expected
        if fmt == 'NHWC':
            out = _run(feats, {image: np.random.rand(1, 64, 96, 3)})
            assert [o.shape for o in out] == expected
            assert all(np.all(np.isfinite(o)) for o in out)


@pytest.mark.parametrize('fmt', ['NHWC', 'NCHW'])
def test_c4_backbone_and_conv5_shapes(config, fmt):
    config.BACKBONE.DEPTH = 18
    config.BACKBONE.DATA_FORMAT = fmt
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        image = _image(fmt, 64, 48, c=4)  # RGB-D input
        c4 = backbone.resnet_c4_backbone(image, [2, 2, 2])
        rois = tf.placeholder(tf.float32, [5, 14, 14, 256] if fmt == 'NHWC' else [5, 256, 14, 14])
        c5 = backbone.resnet_conv5(rois, 2)
        num_vars = len(tf.global_variables())
        again = backbone.resnet_conv5(rois[:2], 2)  # e.g. the mask head's RoIs: same weights
        assert len(tf.global_variables()) == num_vars
        assert again.shape.as_list()[0] == 2
        if fmt == 'NHWC':
            assert c4.shape.as_list() == [1, 4, 3, 256]
            assert c5.shape.as_list() == [5, 7, 7, 512]
        else:
            assert c4.shape.as_list() == [1, 256, 4, 3]
            assert c5.shape.as_list() == [5, 512, 7, 7]
        names = _global_names()
        assert 'conv0/W' in names and 'group3/block1/conv2/W' in names
        conv0 = [v for v in tf.global_variables() if v.op.name == 'conv0/W'][0]
        assert conv0.shape.as_list() == [7, 7, 4, 64]


def test_model_zoo_variable_names(config):
    config.BACKBONE.DEPTH = 50
    config.BACKBONE.FREEZE_AT = 0
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        backbone.resnet_fpn_backbone(_image('NHWC'), [3, 4, 6, 3])
        names = _global_names()
    for name in ['conv0/W', 'conv0/bn/gamma', 'conv0/bn/beta', 'conv0/bn/mean/EMA',
                 'conv0/bn/variance/EMA', 'group0/block0/conv1/W', 'group0/block0/conv2/W',
                 'group0/block0/conv3/W', 'group0/block0/conv3/bn/gamma',
                 'group0/block0/convshortcut/W', 'group0/block0/convshortcut/bn/beta',
                 'group2/block5/conv3/W', 'group3/block2/conv1/bn/gamma']:
        assert name in names, name
    assert 'group0/block1/convshortcut/W' not in names  # identity shortcut
    assert 'conv0/b' not in names  # no bias before a norm
    assert len([n for n in names if n.endswith('/W')]) == 53  # 1 + 16 blocks * 3 + 4


def test_stride_placement(config):
    config.BACKBONE.DEPTH = 50
    for stride_1x1 in (False, True):
        config.BACKBONE.STRIDE_1X1 = stride_1x1
        with tf.Graph().as_default(), TowerContext('', is_training=True):
            backbone.resnet_fpn_backbone(_image('NHWC'), [1, 1, 1, 1])
            graph = tf.get_default_graph()
            conv1, conv2 = [graph.get_tensor_by_name('group1/block0/{}/output:0'.format(c))
                            for c in ('conv1', 'conv2')]
            # group1's input is 16 x 24: the strided conv halves it
            assert conv1.shape.as_list()[1] == (8 if stride_1x1 else 16)
            assert conv2.shape.as_list()[1] == 8


@pytest.mark.parametrize('freeze_at, trainable, train_conv0, expected', [
    (0, 'all', False, {'conv0', 'group0', 'group1', 'group2', 'group3'}),
    (1, 'all', False, {'group0', 'group1', 'group2', 'group3'}),
    (2, 'all', False, {'group1', 'group2', 'group3'}),
    (0, '3+', False, {'group1', 'group2', 'group3'}),
    (2, '4+', False, {'group2', 'group3'}),
    (0, '5+', False, {'group3'}),
    (2, 'heads', False, set()),
    (2, 'all', True, {'conv0', 'group1', 'group2', 'group3'}),
    (0, 'heads', True, {'conv0'}),
])
def test_trainable_stages(config, freeze_at, trainable, train_conv0, expected):
    config.BACKBONE.DEPTH = 18
    config.BACKBONE.FREEZE_AT = freeze_at
    config.BACKBONE.TRAINABLE = trainable
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        image = _image('NHWC')
        feats = backbone.resnet_fpn_backbone(image, [2, 2, 2, 2], train_conv0=train_conv0)
        trainable_vars = _trainable_names()
        assert {n.split('/')[0] for n in trainable_vars} == expected
        if expected:  # frozen layers' norms are frozen too; trained layers' are not
            first = sorted(expected)[0]
            assert any(n.startswith(first) and n.endswith('bn/gamma') for n in trainable_vars)
        # frozen weights stay model weights (saved, exported); none is left out
        model_vars = {v.op.name for v in tf.get_collection(tf.GraphKeys.MODEL_VARIABLES)}
        weights = {n for n in _global_names() if not n.endswith('/EMA')}  # BN statistics
        assert weights <= trainable_vars | model_vars
        assert ('conv0/W' in model_vars) == ('conv0' not in expected)
        # Gradient reaches the image only if something down there trains.
        grad = tf.gradients(tf.reduce_sum(feats[-1]), image)[0]
        assert (grad is not None) == ('conv0' in expected)


def test_freeze_keeps_bn_statistics(config):
    """Frozen stages (and every FreezeBN layer) normalise with the stored statistics."""
    config.BACKBONE.DEPTH = 18
    config.BACKBONE.NORM = 'SyncBN'
    config.BACKBONE.FREEZE_AT = 2
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        backbone.resnet_fpn_backbone(_image('NHWC'), [1, 1, 1, 1])
        ops = [op.name for op in tf.get_default_graph().get_operations()]
    # the synced (trained) BN computes batch moments; the frozen ones do not
    assert any(n.startswith('group1/') and 'Mean' in n for n in ops)
    assert not any(n.startswith(('conv0/', 'group0/')) and 'Mean' in n for n in ops)


def test_norm_none_and_gn_build(config):
    config.BACKBONE.DEPTH = 18
    for norm, var in [('None', 'conv0/b'), ('GN', 'conv0/gn/gamma')]:
        config.BACKBONE.NORM = norm
        with tf.Graph().as_default(), TowerContext('', is_training=True):
            image = _image('NHWC')
            feats = backbone.resnet_fpn_backbone(image, [1, 1, 1, 1])
            assert var in _global_names()
            assert 'conv0/bn/gamma' not in _global_names()
            out = _run(feats[-1], {image: np.random.rand(1, 64, 96, 3)})
            assert out.shape == (1, 2, 3, 512) and np.all(np.isfinite(out))


@pytest.mark.parametrize('fmt', ['NHWC', 'NCHW'])
def test_group_norm_matches_numpy(fmt):
    rng = np.random.RandomState(0)
    x = rng.normal(2., 3., (2, 5, 7, 64)).astype(np.float32)  # NHWC, 64 channels
    feed = x if fmt == 'NHWC' else x.transpose(0, 3, 1, 2)
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        inp = tf.constant(feed)
        out = backbone.GroupNorm('gn', inp, group=32, data_format=fmt)
        params = {v.op.name: v for v in tf.global_variables()}
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            sess.run([params['gn/beta'].assign(np.arange(64, dtype=np.float32)),
                      params['gn/gamma'].assign(np.linspace(-2, 2, 64, dtype=np.float32))])
            got = sess.run(out)
    if fmt == 'NCHW':
        got = got.transpose(0, 2, 3, 1)
    grouped = x.reshape(2, 5, 7, 32, 2)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = grouped.var(axis=(1, 2, 4), keepdims=True)
    expected = ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * \
        np.linspace(-2, 2, 64) + np.arange(64)
    np.testing.assert_allclose(got, expected, atol=1e-4)


# ------------------------------------------------------------------------ FPN


def _fake_features(fmt, h=64, w=96, channels=(16, 24, 32, 40)):
    shapes = [(1, h // s, w // s, c) for s, c in zip((4, 8, 16, 32), channels)]
    if fmt == 'NCHW':
        shapes = [(n, c, hh, ww) for n, hh, ww, c in shapes]
    return [tf.placeholder(tf.float32, s) for s in shapes], shapes


@pytest.mark.parametrize('fmt', ['NHWC', 'NCHW'])
@pytest.mark.parametrize('norm', ['None', 'GN'])
def test_fpn_shapes_and_names(config, fmt, norm):
    config.BACKBONE.DATA_FORMAT = fmt
    config.FPN.NORM = norm
    config.FPN.NUM_CHANNEL = 32
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        feats, shapes = _fake_features(fmt)
        outs = model_fpn.fpn_model('fpn', feats)
        expected = [(1, 16, 24), (1, 8, 12), (1, 4, 6), (1, 2, 3), (1, 1, 2)]
        expected = [(n, h, w, 32) if fmt == 'NHWC' else (n, 32, h, w) for n, h, w in expected]
        assert [tuple(o.shape.as_list()) for o in outs] == expected
        names = _global_names()
        for i in range(2, 6):
            assert 'fpn/lateral_1x1_c{}/W'.format(i) in names
            assert 'fpn/posthoc_3x3_p{}/b'.format(i) in names
            assert ('fpn/gn_p{}/gamma'.format(i) in names) == (norm == 'GN')
        if fmt == 'NHWC':
            vals = _run(outs, {f: np.random.rand(*s) for f, s in zip(feats, shapes)})
            assert [v.shape for v in vals] == expected
            np.testing.assert_array_equal(vals[4], vals[3][:, ::2, ::2, :])  # P6


def test_upsample_crops_to_lateral(config):
    with tf.Graph().as_default():
        x = tf.constant(np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1))
        like = tf.zeros([1, 3, 5, 1])
        got = _run(model_fpn._upsample2x(x, like))[0, :, :, 0]
    np.testing.assert_array_equal(got, [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]])


def test_map_rois_to_levels():
    sizes = [10., 112., 224., 448., 1000., 0., 150., 300.]
    boxes = np.array([[5., 5., 5. + s, 5. + s] for s in sizes], np.float32)
    with tf.Graph().as_default():
        ids, lvl_boxes = model_fpn.fpn_map_rois_to_levels(tf.constant(boxes))
        ids, lvl_boxes = _run([ids, lvl_boxes])
    assert [sorted(i.tolist()) for i in ids] == [[0, 5], [1, 6], [2, 7], [3, 4]]
    for i, b in zip(ids, lvl_boxes):
        np.testing.assert_array_equal(b, boxes[i])


def test_multilevel_roi_align_keeps_box_order(config):
    rng = np.random.RandomState(1)
    feats_np = [rng.rand(1, 512 // s, 512 // s, 8).astype(np.float32) for s in (4, 8, 16, 32)]
    sizes = [500., 20., 130., 60., 300., 460., 30.]
    levels = [5, 2, 3, 2, 4, 5, 2]  # floor(4 + log2(size / 224)), clipped to 2..5
    boxes = np.array([[3. + i, 7., 3. + i + s, 7. + s] for i, s in enumerate(sizes)], np.float32)
    with tf.Graph().as_default():
        feats = [tf.constant(f) for f in feats_np]
        got = model_fpn.multilevel_roi_align(feats, tf.constant(boxes), 7)
        expected = [model_box.roi_align(feats[lvl - 2], tf.constant(box[None] / 2 ** lvl), 7)
                    for box, lvl in zip(boxes, levels)]
        got, expected = _run([got, tf.concat(expected, 0)])
    assert got.shape == (7, 7, 7, 8)
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------------ RPN


@pytest.mark.parametrize('fmt', ['NHWC', 'NCHW'])
def test_rpn_head_shapes_and_sharing(config, fmt):
    config.BACKBONE.DATA_FORMAT = fmt
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        feats, shapes = _fake_features(fmt, channels=(16, 16, 16, 16))
        outs = [model_rpn.rpn_head('rpn', f, 16, 3) for f in feats[:2]]
        names = _global_names()
        assert names == {'rpn/conv0/W', 'rpn/conv0/b', 'rpn/class/W', 'rpn/class/b',
                         'rpn/box/W', 'rpn/box/b'}
        assert outs[0][0].shape.as_list() == [16, 24, 3]
        assert outs[1][1].shape.as_list() == [8, 12, 3, 4]
        if fmt == 'NHWC':
            raw = tf.get_default_graph().get_tensor_by_name('rpn/box/output:0')
            vals, raw = _run([outs, raw], {f: np.random.rand(*s) for f, s in zip(feats, shapes)})
            assert vals[0][1].shape == (16, 24, 3, 4) and vals[1][0].shape == (8, 12, 3)
            # channel k * 4 + j of the box conv is anchor k, coordinate j
            val = vals[0][1]
            np.testing.assert_allclose(val[3, 4, 2], raw[0, 3, 4, 8:12], rtol=1e-6)


def test_rpn_losses(config):
    config.RPN.BATCH_PER_IM = 4
    labels = np.array([[1, 0, -1], [0, -1, 1]], np.int32)
    logits = np.array([[2., -1., 50.], [0.5, -50., -2.]], np.float32)
    targets = np.zeros((2, 3, 4), np.float32)
    box_logits = np.full((2, 3, 4), 0.05, np.float32)
    box_logits[0, 0] = [1., 0., 0., 0.]
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        losses = model_rpn.rpn_losses(*[tf.constant(a) for a in
                                        (labels, targets, logits, box_logits)])
        no_pos = model_rpn.rpn_losses(*[tf.constant(a) for a in
                                        (np.where(labels == 1, 0, labels), targets, logits,
                                         box_logits)])
        (label_loss, box_loss), (_, box_loss0) = _run([losses, no_pos])
    valid = labels != -1
    z, y = logits[valid], labels[valid]
    expected_label = np.sum(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))) / 4
    np.testing.assert_allclose(label_loss, expected_label, rtol=1e-5)
    # positives (0, 0): |1| > beta -> 1 - beta / 2, three zeros; (1, 2): four 0.05 < beta
    beta = 1. / 9
    expected_box = ((1. - beta / 2) + 4 * 0.5 * 0.05 ** 2 / beta) / 4
    np.testing.assert_allclose(box_loss, expected_box, rtol=1e-5)
    assert box_loss0 == 0. and np.isfinite(label_loss)


def test_generate_rpn_proposals(config):
    config.RPN.PROPOSAL_NMS_THRESH = 0.5
    config.RPN.MIN_SIZE = 2.
    rng = np.random.RandomState(2)
    xy = rng.uniform(-30, 120, (500, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.5, 60, (500, 2))], 1).astype(np.float32)
    boxes[:20] = [200., 200., 260., 260.]  # entirely outside: clipped to nothing, dropped
    scores = rng.rand(500).astype(np.float32)
    scores[:20] += 10.
    with tf.Graph().as_default():
        out = model_rpn.generate_rpn_proposals(tf.constant(boxes), tf.constant(scores),
                                               tf.constant([80, 100]), 300, 40)
        pb, ps = _run(out)
    assert 0 < len(pb) <= 40 and len(ps) == len(pb)
    assert pb.min() >= 0 and np.all(pb[:, [2, 0]] <= 100) and np.all(pb[:, [3, 1]] <= 80)
    assert np.all(pb[:, 2:] - pb[:, :2] > 2.)
    assert np.all(ps < 10.)  # the outside boxes are gone although they scored highest
    iou = np_box_ops.pairwise_iou(pb, pb)
    assert np.all(iou[np.triu_indices(len(pb), 1)] <= 0.5 + 1e-6)


@pytest.mark.parametrize('mode', ['Level', 'Joint'])
@pytest.mark.parametrize('training', [True, False])
def test_generate_fpn_proposals(config, mode, training):
    config.FPN.PROPOSAL_MODE = mode
    config.RPN.TRAIN_POST_NMS_TOPK, config.RPN.TEST_POST_NMS_TOPK = 30, 20
    config.RPN.TRAIN_PER_LEVEL_NMS_TOPK = config.RPN.TEST_PER_LEVEL_NMS_TOPK = 15
    rng = np.random.RandomState(3)
    anchors = get_all_anchors_fpn((4, 8, 16, 32, 64), (32, 64, 128, 256, 512), (0.5, 1., 2.),
                                  128, 0.)
    with tf.Graph().as_default(), TowerContext('', is_training=training):
        boxes = [model_box.decode_bbox_target(
            tf.constant(rng.normal(0, 0.2, a.shape).astype(np.float32)), tf.constant(a))
            for a in anchors]
        logits = [tf.constant(rng.normal(0, 1, a.shape[:3]).astype(np.float32))
                  for a in anchors]
        pb, ps = _run(model_fpn.generate_fpn_proposals(boxes, logits, tf.constant([128, 128]),
                                                       training))
    assert 10 < len(pb) <= (30 if training else 20) and ps.shape == (len(pb),)
    assert pb.min() >= 0 and pb.max() <= 128


def test_rpn_anchors_narrow_and_losses(config):
    h, w = 64, 96
    all_anchors = get_all_anchors_fpn((4, 8, 16, 32, 64), (32, 64, 128, 256, 512),
                                      (0.5, 1., 2.), 128, 0.)
    with tf.Graph().as_default(), TowerContext('', is_training=True):
        feats, _ = _fake_features('NHWC', h, w, channels=(8, 8, 8, 8))
        feats.append(tf.zeros([1, 1, 2, 8]))  # P6
        label_ph = [tf.placeholder(tf.int32, [None, None, 3]) for _ in range(5)]
        box_ph = [tf.placeholder(tf.float32, [None, None, 3, 4]) for _ in range(5)]
        levels = [model_rpn.RPNAnchors(a, lab, box)
                  for a, lab, box in zip(all_anchors, label_ph, box_ph)]
        narrowed = [a.narrow_to(f) for a, f in zip(levels, feats)]
        # a zero box (the usual placeholder of non-foreground anchors) must not leak NaN
        feed = {}
        for i, f in enumerate(feats):
            fh, fw = f.shape.as_list()[1:3]
            lab = np.full((fh, fw, 3), -1, np.int32)
            lab[0, 0, 0], lab[0, 1, 1] = 1, 0
            gtb = np.zeros((fh, fw, 3, 4), np.float32)
            gtb[0, 0, 0] = [1., 2., 30., 40.]
            feed[label_ph[i]], feed[box_ph[i]] = lab, gtb
        label_logits = [tf.zeros(tf.shape(a.gt_labels)) for a in narrowed]
        box_logits = [tf.zeros(tf.shape(a.gt_boxes)) for a in narrowed]
        losses = model_fpn.multilevel_rpn_losses(narrowed, label_logits, box_logits)
        decoded = narrowed[0].decode_logits(narrowed[0].encoded_gt_boxes())
        grads = tf.gradients(losses, box_logits)
        vals = _run([[a.boxes for a in narrowed], losses, decoded, grads], feed)
    assert [v.shape[:2] for v in vals[0]] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    # P3 (stride 8), cell (y=2, x=3), ratio 1 of size 64: centred at (3 * 8, 2 * 8)
    np.testing.assert_allclose(vals[0][1][2, 3, 1], [24 - 32, 16 - 32, 24 + 32, 16 + 32])
    assert np.all(np.isfinite(vals[1])) and vals[1][1] > 0
    assert all(np.all(np.isfinite(g)) for g in vals[3]) and np.any(vals[3][0] != 0)
    np.testing.assert_allclose(vals[2][0, 0, 0], [1., 2., 30., 40.], atol=1e-4)
