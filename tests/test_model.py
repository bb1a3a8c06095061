"""The full generalized R-CNN graph: every variant trains a step, overfits, infers."""
import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tensorpack.tfutils.tower import TowerContext

from config import config as cfg
from data import TrainingDataPreprocessor
from dataset import DatasetRegistry
from modeling.generalized_rcnn import build_model, model_input_names
from modeling.training_graph import build_training_step
from tests.tiny import configured


def _datapoint(index=0):
    roidb = DatasetRegistry.get('shapes_train').training_roidbs()[index]
    dp = TrainingDataPreprocessor(seed=index)(roidb)
    assert dp is not None
    return dp


def _build_training(lr=0.01):
    """Placeholders -> (placeholders, total cost, the head losses by name, train op), with
    plain momentum at a fixed ``lr``."""
    step = build_training_step(optimizer=lambda: tf.train.MomentumOptimizer(lr, 0.9))
    losses = {name: t for name, t in step.losses.items() if name.endswith('loss')}
    return step.placeholders, step.cost, losses, step.train_op


def _feed(placeholders, dp):
    return {p: dp[n] for p, n in zip(placeholders, model_input_names(True))}


VARIANTS = [  # (overrides, what it covers)
    (['MODE_FPN=True', 'MODE_MASK=True', 'BACKBONE.NORM=FreezeBN'], 'fpn-mask-freezebn'),
    (['MODE_FPN=True', 'MODE_MASK=True', 'CASCADE.ENABLED=True', 'BACKBONE.NORM=GN',
      'FPN.NORM=GN', 'FPN.FRCNN_HEAD_FUNC=fastrcnn_4conv1fc_gn_head',
      'FPN.MRCNN_HEAD_FUNC=maskrcnn_up4conv_gn_head'], 'fpn-mask-cascade-gn'),
    (['MODE_FPN=True', 'MODE_MASK=False', 'CASCADE.ENABLED=True', 'BACKBONE.NORM=None'],
     'fpn-cascade-nonorm'),
    (['MODE_FPN=True', 'MODE_MASK=False', 'FPN.FRCNN_HEAD_FUNC=fastrcnn_4conv1fc_head',
      'BACKBONE.TRAINABLE=3+'], 'fpn-4conv-3plus'),
    (['MODE_FPN=True', 'MODE_MASK=True', 'BACKBONE.NORM=SyncBN'], 'fpn-mask-syncbn'),
    (['MODE_FPN=True', 'MODE_MASK=True', 'MRCNN.RESOLUTION=14'], 'fpn-mask-res14'),
    (['MODE_FPN=False', 'MODE_MASK=True', 'BACKBONE.NORM=GN'], 'c4-mask-gn'),
    (['MODE_FPN=False', 'MODE_MASK=False', 'BACKBONE.NORM=FreezeBN', 'BACKBONE.DEPTH=50'],
     'c4-r50-freezebn'),
]


# The deeper backbones, built and stepped only with `pytest --run-slow` (tests/conftest.py).
SLOW_VARIANTS = [
    (['MODE_FPN=True', 'MODE_MASK=True', 'BACKBONE.DEPTH=34'], 'fpn-mask-r34'),
    (['MODE_FPN=True', 'MODE_MASK=True', 'BACKBONE.DEPTH=101', 'BACKBONE.NORM=FreezeBN'],
     'fpn-mask-r101'),
]


@pytest.mark.parametrize('overrides', [pytest.param(o, id=i) for o, i in VARIANTS] +
                         [pytest.param(o, id=i, marks=pytest.mark.slow) for o, i in SLOW_VARIANTS])
def test_variant_trains_one_step_without_nan(overrides):
    with configured(overrides):
        dp = _datapoint()
        with tf.Graph().as_default():
            placeholders, cost, losses, train_op = _build_training()
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                feed = _feed(placeholders, dp)
                values = sess.run([cost, train_op] + list(losses.values()), feed)
        expected = 4 + (1 if cfg.MODE_MASK else 0)   # rpn label/box, frcnn label/box, mask
    total, loss_values = values[0], values[2:]
    assert np.isfinite(total) and total > 0
    assert all(np.isfinite(v) for v in loss_values), dict(zip(losses, loss_values))
    assert len(loss_values) >= expected


@pytest.mark.parametrize('mode_fpn', [True, False], ids=['fpn', 'c4'])
def test_nchw_graph_builds(mode_fpn):
    """The GPU layout builds (running NCHW convs on CPU is not supported by oneDNN)."""
    with configured(['MODE_FPN={}'.format(mode_fpn), 'BACKBONE.DATA_FORMAT=NCHW']):
        with tf.Graph().as_default():
            _, cost, losses, _ = _build_training()
            assert cost.shape.ndims == 0 and losses
            convs = [op for op in tf.get_default_graph().get_operations()
                     if op.type == 'Conv2D']
            assert convs and all(op.get_attr('data_format') == b'NCHW' for op in convs)


def test_overfit_one_image_drives_every_loss_down():
    with configured(['MODE_FPN=True', 'MODE_MASK=True', 'PREPROC.HORIZONTAL_FLIP=False',
                     'PREPROC.TRAIN_SHORT_EDGE_SIZE=[128,128]']):
        dp = _datapoint(1)
        with tf.Graph().as_default():
            tf.set_random_seed(0)
            placeholders, cost, losses, train_op = _build_training(lr=0.01)
            names = sorted(losses)
            labels = tf.get_default_graph().get_tensor_by_name(
                'sample_fast_rcnn_targets/sampled_labels:0')
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                feed = _feed(placeholders, dp)
                history = []
                for _ in range(100):
                    values = sess.run([losses[n] for n in names] + [labels, train_op], feed)
                    sampled = values[-2]
                    row = values[:-2]
                    # The Fast R-CNN box loss is normalised by all sampled RoIs; early on the
                    # only foregrounds are the gt boxes themselves (zero targets) and their
                    # number grows as the RPN learns. Per foreground it must fall.
                    box = names.index('fastrcnn_losses/box_loss')
                    row[box] *= len(sampled) / max(1, (sampled > 0).sum())
                    history.append(row)
    history = np.asarray(history)
    assert history.shape[1] == 5, names
    window = np.stack([history[i:i + 5].mean(axis=0) for i in range(len(history) - 4)])
    for name, column in zip(names, window.T):
        if name == 'fastrcnn_losses/box_loss':
            # It first rises while the RPN finds new foregrounds, and is noisy as their
            # number changes (seeds and CPUs differ in when): it must fall to half its peak.
            assert column[-30:].min() < 0.5 * column.max(), (name, column)
        else:
            assert column[-1] < 0.5 * column[0], (name, column)


@pytest.mark.parametrize('overrides', [['MODE_FPN=True', 'MODE_MASK=True'],
                                       ['MODE_FPN=True', 'MRCNN.RESOLUTION=14'],
                                       ['MODE_FPN=True', 'CASCADE.ENABLED=True'],
                                       ['MODE_FPN=False', 'MODE_MASK=True']],
                         ids=['fpn-mask-res28', 'fpn-mask-res14', 'cascade-mask', 'c4-mask'])
def test_inference_outputs(overrides):
    with configured(overrides, is_training=False):
        model = build_model()
        resolution = cfg.MRCNN.RESOLUTION if cfg.MODE_FPN else 14  # MRCNN.RESOLUTION is FPN's
        num_classes = cfg.DATA.NUM_CATEGORY
        with tf.Graph().as_default():
            image = tf.placeholder(tf.float32, [None, None, 3], 'image')
            with TowerContext('', is_training=False):
                model.build_graph(image)
            g = tf.get_default_graph()
            names = ['output/boxes', 'output/scores', 'output/labels', 'output/masks',
                     'output/proposal_boxes']
            outputs = [g.get_tensor_by_name(n + ':0') for n in names]
            # Random weights score everything low: accept every detection to see outputs.
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                img = np.random.RandomState(0).uniform(0, 255, (100, 150, 3)).astype('f4')
                boxes, scores, labels, masks, proposals = sess.run(outputs, {image: img})
    n = len(boxes)
    assert boxes.shape == (n, 4) and scores.shape == (n,) and labels.shape == (n,)
    assert masks.shape == (n, resolution, resolution) and labels.dtype == np.int32
    assert n <= 20 and proposals.shape[1] == 4 and len(proposals) <= 100
    if n:
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 150).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 100).all()
        assert ((labels >= 1) & (labels <= num_classes)).all()
        assert ((scores > 0) & (scores <= 1)).all()
        assert ((masks >= 0) & (masks <= 1)).all()
