"""Several images per device (TRAIN.IMAGES_PER_DEVICE): batched training graph, data
grouping and padding, BatchNorm with batch statistics."""
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from config import config as cfg
from data_batch import AspectRatioGroups, pad_batch
from modeling.generalized_rcnn import model_input_names
from modeling.training_graph import build_training_step
from tests.test_model import _datapoint
from tests.tiny import configured


def _step():
    return build_training_step(optimizer=lambda: tf.train.MomentumOptimizer(0.01, 0.9))


def _head_losses(values):
    return {k: v for k, v in values.items() if k.endswith('loss') and '/' in k
            and not k.startswith('image')}


def _two_images():
    """Two tiny-config training images of different sizes and instance counts whose
    padded sizes (a multiple of 32, or 16) are equal: 154x189 (3 instances), 157x180 (2)."""
    dps = [_datapoint(3), _datapoint(13)]
    assert dps[0]['image'].shape != dps[1]['image'].shape
    assert len(dps[0]['gt_boxes']) != len(dps[1]['gt_boxes'])
    return dps


def test_pad_batch_pads_each_input_and_keeps_true_sizes():
    a = {'image': np.ones((3, 5, 3), np.float32), 'anchor_labels': np.ones((2, 3, 1), np.int32),
         'gt_boxes': np.ones((2, 4), np.float32), 'gt_labels': np.array([1, 2])}
    b = {'image': np.full((4, 2, 3), 2, np.float32),
         'anchor_labels': np.zeros((3, 1, 1), np.int32),
         'gt_boxes': np.full((1, 4), 2, np.float32), 'gt_labels': np.array([3])}
    names = ['image', 'image_sizes', 'anchor_labels', 'gt_boxes', 'gt_labels']
    image, sizes, labels, boxes, klass = pad_batch([a, b], names)
    assert image.shape == (2, 4, 5, 3) and image.dtype == np.float32
    assert (image[0, :3] == 1).all() and (image[0, 3:] == 0).all()
    assert (image[1, :, :2] == 2).all() and (image[1, :, 2:] == 0).all()
    assert sizes.tolist() == [[3, 5], [4, 2]] and sizes.dtype == np.int32
    assert labels.shape == (2, 3, 3, 1) and (labels[0, 2] == -1).all()
    assert (labels[1, :, 1:] == -1).all() and (labels[1, :, :1] == 0).all()
    assert boxes.shape == (2, 2, 4) and (boxes[1, 1] == 0).all()
    assert klass.tolist() == [[1, 2], [3, 0]]


def test_aspect_ratio_groups_never_mix_orientations():
    groups = AspectRatioGroups(2)
    shapes = [(10, 20), (30, 10), (12, 15), (40, 20), (8, 8)]
    out = [groups.add({'image': np.zeros(s + (3,))}) for s in shapes]
    assert out[0] is None and out[1] is None
    assert [dp['image'].shape[:2] for dp in out[2]] == [(10, 20), (12, 15)]
    assert [dp['image'].shape[:2] for dp in out[3]] == [(30, 10), (40, 20)]
    assert out[4] is None  # waits for another landscape (or square) image


def test_train_dataflow_yields_padded_batches_of_one_orientation():
    import data
    from utils.graph_inputs import input_names
    with configured(['TRAIN.IMAGES_PER_DEVICE=2']):
        names = input_names(cfg.MODE_FPN, cfg.MODE_MASK, cfg.FPN.ANCHOR_STRIDES, True)
        df = data.get_train_dataflow()
        df.reset_state()
        batches = [dict(zip(names, dp)) for _, dp in zip(range(4), df)]
    for b in batches:
        image, sizes = b['image'], b['image_sizes']
        assert image.shape[0] == 2 and sizes.shape == (2, 2)
        assert len(set(bool(h > w) for h, w in sizes)) == 1, sizes  # one orientation
        assert image.shape[1:3] == tuple(sizes.max(axis=0))
        for i, (h, w) in enumerate(sizes):
            assert not image[i, h:].any() and not image[i, :, w:].any()
        assert b['gt_labels'].shape[0] == 2 and (b['gt_labels'][:, 0] > 0).all()
        assert b['anchor_labels_lvl2'].shape[0] == 2


# C4 and FPN with masks also train in test_batch_loss_is_the_mean_of_single_image_losses.
VARIANTS = [
    (['MODE_FPN=False', 'MODE_MASK=False'], 'c4-faster'),
    (['MODE_FPN=True', 'MODE_MASK=False'], 'fpn-faster'),
    (['MODE_FPN=True', 'MODE_MASK=True', 'CASCADE.ENABLED=True'], 'fpn-cascade-mask'),
]


@pytest.mark.parametrize('overrides', [pytest.param(o, id=i) for o, i in VARIANTS])
def test_batch_of_two_trains_a_step(overrides):
    with configured(overrides + ['TRAIN.IMAGES_PER_DEVICE=2']):
        batch = pad_batch(_two_images(), model_input_names(True))
        # rpn label/box, frcnn label/box (per cascade stage), mask
        expected = 2 + 2 * (len(cfg.CASCADE.IOUS) if cfg.CASCADE.ENABLED else 1) + \
            (1 if cfg.MODE_MASK else 0)
        with tf.Graph().as_default():
            step = _step()
            variables = [v.op.name for v in tf.global_variables()]
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                _, values = sess.run([step.train_op, step.losses],
                                     dict(zip(step.placeholders, batch)))
    # the images share every variable: no per-image copies, names as with one image
    assert not [v for v in variables if v.startswith('image')]
    losses = _head_losses(values)
    assert len(losses) == expected, losses
    assert all(np.isfinite(v) for v in losses.values()), losses
    assert np.isfinite(values['total_cost']) and values['total_cost'] > 0


def _run_losses(batch, weights=None):
    """Build the training graph of the current config, load ``weights`` ({name: value})
    or initialise; -> (losses of ``batch``, the weights). Then one training step on it,
    which must leave the losses finite."""
    with tf.Graph().as_default():
        step = _step()
        with tf.Session() as sess:
            variables = tf.global_variables()
            # one run each (a run per variable would prune and optimise the graph each time)
            init = {v.initializer.inputs[1]: weights[v.op.name] for v in variables
                    if weights is not None and v.op.name in weights}
            sess.run([v.initializer for v in variables], init)
            feed = dict(zip(step.placeholders, batch))
            values = sess.run(step.losses, feed)
            weights = dict(zip([v.op.name for v in variables], sess.run(variables)))
            sess.run(step.train_op, feed)
            after = sess.run(step.losses, feed)
    assert all(np.isfinite(v) for v in after.values()), after
    return _head_losses(values), weights


@pytest.mark.parametrize('mode_fpn', [True, False], ids=['fpn', 'c4'])
def test_batch_loss_is_the_mean_of_single_image_losses(mode_fpn):
    """With every proposal sampled (FRCNN.BATCH_PER_IM above the proposal count, so the
    random sampling picks all of them) and two images of equal padded size (so the
    batched backbone sees exactly what each image alone sees; C4 pads its input to 16
    for that), each loss of the batch is the mean of the two single-image losses."""
    overrides = ['MODE_FPN={}'.format(mode_fpn), 'MODE_MASK=True', 'BACKBONE.C4_PAD_INPUT=True',
                 'FRCNN.BATCH_PER_IM=100000', 'FRCNN.FG_RATIO=0.5']
    with configured(overrides):
        dps = _two_images()
        names = model_input_names(True)
        single, weights = zip(*[_run_losses([dp[n] for n in names]) for dp in dps[:1]])
        single = list(single) + [_run_losses([dps[1][n] for n in names], weights[0])[0]]
    with configured(overrides + ['TRAIN.IMAGES_PER_DEVICE=2']):
        batched, _ = _run_losses(pad_batch(dps, model_input_names(True)), weights[0])
    assert set(batched) == set(single[0]), (sorted(batched), sorted(single[0]))
    for name, value in batched.items():
        want = (single[0][name] + single[1][name]) / 2
        assert value == pytest.approx(want, rel=1e-4, abs=1e-6), name
    # not trivially equal: the two images' losses differ
    assert any(single[0][n] != pytest.approx(single[1][n], rel=1e-3) for n in batched)


def test_batchnorm_trains_with_batch_statistics():
    with configured(['MODE_FPN=True', 'MODE_MASK=False', 'BACKBONE.NORM=BN',
                     'TRAIN.IMAGES_PER_DEVICE=2']):
        batch = pad_batch(_two_images(), model_input_names(True))
        with tf.Graph().as_default():
            step = _step()
            # tensorpack's BatchNorm keeps its moving statistics in bn/mean/EMA, bn/variance/EMA
            moving = [v for v in tf.global_variables() if v.op.name.endswith('/EMA')
                      and '/bn/' in v.op.name]
            gammas = [v for v in tf.trainable_variables() if v.op.name.endswith('bn/gamma')]
            updates = tf.get_collection(tf.GraphKeys.UPDATE_OPS)
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                before = sess.run(moving + gammas)
                feed = dict(zip(step.placeholders, batch))
                sess.run([step.train_op] + updates, feed)
                after = sess.run(moving + gammas)
    assert moving and gammas
    changed = [not np.allclose(b, a) for b, a in zip(before, after)]
    assert all(changed[:len(moving)]), 'moving statistics did not change'
    assert any(changed[len(moving):]), 'BatchNorm gammas did not train'


@pytest.mark.slow
def test_train_py_two_images_per_device_with_evaluation(tmp_path):
    """train.py end to end at N = 2: grouped batches from a data worker, the total batch
    in the log, and the final evaluation through the training model's 2-image tower."""
    from tests.test_train import AP_KEY, fail_info, read_stats, run_train
    from tests.tiny import TINY
    logdir = str(tmp_path / 'log')
    p = run_train(logdir, TINY + [
        'TRAIN.IMAGES_PER_DEVICE=2', 'DATA.NUM_WORKERS=1', 'TRAIN.REFERENCE_BATCH=2',
        'TRAIN.WARMUP=1', 'TRAIN.LR_SCHEDULE=(4,4,4)', 'TRAIN.STEPS_PER_EPOCH=2',
        'TRAIN.EVAL_PERIOD=2', 'TRAIN.CHECKPOINT_PERIOD=2'])
    assert p.returncode == 0, fail_info(p)
    assert 'total batch 2 (1 device(s) x 2 image(s) x 1 accumulation)' in p.stdout
    stats = read_stats(logdir)
    assert [s['global_step'] for s in stats] == [2, 4]
    assert np.isfinite(stats[-1]['total_cost']) and 0. <= stats[-1][AP_KEY] <= 1.
