"""utils/training.py: the scaled LR schedule, weight loading with skips, the non-finite
guard (on a toy tensorpack training), the log file and config file helpers."""
import logging
import os

import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tensorpack import ModelDesc
from tensorpack.callbacks import ModelSaver
from tensorpack.dataflow import DataFromList
from tensorpack.train import SimpleTrainer, TrainConfig, launch_train_with_config

from config import config as cfg
from utils.training import (NonFiniteGuard, ScaledSchedule, TrainingDiverged, UserInputError,
                            WeightsLoader, add_log_file, read_weights, write_config)


@pytest.fixture
def schedule_cfg(fresh_cfg):
    fresh_cfg.update_args(['TRAIN.BASE_LR=0.02', 'TRAIN.WARMUP=1000', 'TRAIN.WARMUP_INIT_LR=0.002',
                           'TRAIN.LR_SCHEDULE=[60000,80000,90000]', 'TRAIN.REFERENCE_BATCH=16',
                           'TRAIN.STEPS_PER_EPOCH=500'])
    return fresh_cfg


def test_schedule_at_reference_batch(schedule_cfg):
    s = ScaledSchedule(16)
    assert s.base_lr == pytest.approx(0.02)
    assert s.lr_at(0) == pytest.approx(0.002)
    assert s.lr_at(500) == pytest.approx(0.011)           # halfway through warm-up
    assert s.lr_at(1000) == pytest.approx(0.02)
    assert s.lr_at(59999) == pytest.approx(0.02)
    assert s.lr_at(60000) == pytest.approx(0.002)
    assert s.lr_at(80000) == pytest.approx(0.0002)
    assert s.total_iters == 90000 and s.max_epoch == 180


def test_schedule_scales_linearly_with_batch(schedule_cfg):
    s = ScaledSchedule(1)     # one device, one image: 16x more steps at 1/16 of the LR
    assert s.base_lr == pytest.approx(0.02 / 16)
    assert s.decay_iters == [960000, 1280000] and s.total_iters == 1440000
    cfg.update_args(['TRAIN.GRADIENT_ACCUMULATION=4'])
    s = ScaledSchedule(2)     # batch 8 per update, 4 iterations per update
    assert s.total_batch == 8 and s.base_lr == pytest.approx(0.01)
    assert s.total_iters == 90000 * 2 * 4   # updates x accumulation
    assert s.warmup_iters == 8000


def _make_vars():
    tf.get_variable('conv0/W', initializer=np.zeros((3, 3, 4, 8), np.float32))
    tf.get_variable('fastrcnn/class/W', initializer=np.zeros((8, 3), np.float32))
    tf.get_variable('fpn/lateral/W', initializer=np.zeros((2,), np.float32))
    tf.get_variable('rpn/conv0/W', initializer=np.zeros((2,), np.float32))


def test_weights_loader_skips_and_reports(tmp_path):
    path = str(tmp_path / 'w.npz')
    np.savez(path, **{'conv0/W': np.ones((7, 7, 3, 8), np.float32),      # other channels
                      'fastrcnn/class/W:0': np.ones((8, 3), np.float32),  # ':0' suffix ok
                      'rpn/conv0/W': np.ones((2,), np.float32),
                      'extra/unused': np.ones(1, np.float32)})
    with tf.Graph().as_default():
        _make_vars()
        loader = WeightsLoader(path, skip_regex='^rpn/')
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            loader._run_init(sess)
            values = {v.op.name: sess.run(v) for v in tf.global_variables()}
    assert values['fastrcnn/class/W'].sum() == 24          # loaded
    assert values['conv0/W'].sum() == 0                     # shape differs: kept
    assert values['rpn/conv0/W'].sum() == 0                 # skipped by regex
    assert loader.loaded == ['fastrcnn/class/W']
    assert loader.skipped['matched --load-skip'] == ['rpn/conv0/W']
    assert loader.skipped['not in file'] == ['fpn/lateral/W']
    assert loader.skipped['shape differs'][0].startswith('conv0/W [3, 3, 4, 8]')


def test_read_weights_from_checkpoint_and_bad_paths(tmp_path):
    with tf.Graph().as_default():
        v = tf.get_variable('a/W', initializer=np.full((2,), 3., np.float32))
        with tf.Session() as sess:
            sess.run(v.initializer)
            prefix = tf.train.Saver().save(sess, str(tmp_path / 'model'), global_step=7)
    for path in (prefix, prefix + '.index', str(tmp_path)):
        assert read_weights(path)['a/W'].tolist() == [3., 3.]
    with pytest.raises(UserInputError, match='does not exist'):
        read_weights(str(tmp_path / 'nope.npz'))
    with pytest.raises(UserInputError, match='does not exist'):
        read_weights(str(tmp_path / 'nothing_here'))
    (tmp_path / 'weights.h5').write_text('x')
    with pytest.raises(UserInputError, match='neither an .npz file nor a TF checkpoint'):
        read_weights(str(tmp_path / 'weights.h5'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(UserInputError, match='no checkpoint found'):
        read_weights(str(empty))


class _ToyModel(ModelDesc):
    """total_cost = a_loss + b_loss, a_loss = tanh(w) . x, b_loss = 0.1 |tanh(w - 1)|^2.

    w starts at [1, 1], where an input x = 0 gives zero gradients. The losses stay finite
    for any w, even infinite: the forward pass may read w before or after the update of
    the same iteration (no ordering between them), and either way gives the same verdict.
    """

    def __init__(self, lr):
        self._lr = lr

    def inputs(self):
        return [tf.TensorSpec((2,), tf.float32, 'x')]

    def build_graph(self, x):
        w = tf.get_variable('w', initializer=np.ones(2, np.float32))
        a = tf.reduce_sum(tf.tanh(w) * x, name='a_loss')
        b = tf.multiply(tf.reduce_sum(tf.square(tf.tanh(w - 1.))), 0.1, name='b_loss')
        return tf.add_n([a, b], name='total_cost')

    def optimizer(self):
        return tf.train.GradientDescentOptimizer(self._lr)


def _train_toy(xs, lr, ckpt_dir):
    """Train on the points ``xs`` in order, 2 iterations per epoch, saving every epoch
    (after the guard, as train.py orders them). Returns the guard."""
    guard = NonFiniteGuard(checkpoint_dir=ckpt_dir)
    config = TrainConfig(
        model=_ToyModel(lr), dataflow=DataFromList([[np.float32(x)] for x in xs], shuffle=False),
        callbacks=[guard, ModelSaver(checkpoint_dir=ckpt_dir)], monitors=[],
        steps_per_epoch=2, max_epoch=len(xs) // 2)
    with tf.Graph().as_default():
        launch_train_with_config(config, SimpleTrainer())
    return guard


def test_guard_stops_at_the_first_nan_loss(tmp_path):
    # iteration 3 (the last of epoch 2) sees a NaN input: its a_loss and the total are NaN
    xs = [[1, 1], [1, 1], [1, 1], [np.nan, 1], [1, 1], [1, 1]]
    guard = _train_toy(xs, 0.01, str(tmp_path))
    with pytest.raises(TrainingDiverged) as e:
        guard.raise_if_diverged()
    msg = str(e.value)
    assert 'non-finite loss at global step 3 (epoch 2, iteration 2 of 2)' in msg
    assert 'total_cost=nan, a_loss=nan' in msg and 'b_loss' not in msg
    assert 'TRAIN.BASE_LR' in msg and 'TRAIN.WARMUP' in msg
    # epoch 2 ended with that iteration, yet nothing was saved after it
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith('model-2')
    assert 'model-2 is kept' in msg


def test_guard_checks_the_weights_before_the_epoch_is_saved(tmp_path):
    # iteration 1's loss is finite (about 1e30), but its update sends w[0] to -inf
    xs = [[0, 0], [1e30, 1], [1, 1], [1, 1]]
    guard = _train_toy(xs, 1e10, str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r'weights became non-finite in the last update '
                                               r'of epoch 1 \(global step 1\).*: w\b'):
        guard.raise_if_diverged()
    assert tf.train.latest_checkpoint(str(tmp_path)) is None  # model-2 would hold -inf
    assert 'no checkpoint was written' in str(guard.error)


def test_guard_is_quiet_on_finite_training(tmp_path):
    guard = _train_toy([[1, 1]] * 4, 0.01, str(tmp_path))
    guard.raise_if_diverged()
    assert guard.error is None
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith('model-4')


def test_add_log_file_shares_tensorpack_handler(tmp_path):
    """Stdlib records go through tensorpack's own file handler: one file offset, so the
    two loggers' lines interleave instead of overwriting each other."""
    path = str(tmp_path / 'log.log')
    tp_logger = logging.getLogger('tensorpack')
    tp_handler = logging.FileHandler(path, mode='w')  # as tensorpack opens it
    tp_logger.addHandler(tp_handler)
    root = logging.getLogger()
    try:
        assert add_log_file(str(tmp_path)) is tp_handler
        tp_logger.info('from tensorpack 1')
        logging.getLogger('data').warning('from the data pipeline')
        tp_logger.info('from tensorpack 2')
    finally:
        tp_logger.removeHandler(tp_handler)
        root.removeHandler(tp_handler)
        tp_handler.close()
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines == ['from tensorpack 1', 'from the data pipeline', 'from tensorpack 2']


def test_write_config_keeps_a_different_previous_config(tmp_path):
    logdir = str(tmp_path)
    assert write_config(logdir) is None
    with open(os.path.join(logdir, 'config.yaml')) as f:
        current = f.read()
    assert 'BASE_LR' in current
    mtime = os.stat(os.path.join(logdir, 'config.yaml')).st_mtime_ns
    assert write_config(logdir) is None                      # same config: left alone
    assert os.stat(os.path.join(logdir, 'config.yaml')).st_mtime_ns == mtime
    with open(os.path.join(logdir, 'config.yaml'), 'w') as f:
        f.write('TRAIN: {BASE_LR: 0.5}\n')                    # an earlier run's
    backup = write_config(logdir)
    with open(backup) as f:
        assert f.read() == 'TRAIN: {BASE_LR: 0.5}\n'
    with open(os.path.join(logdir, 'config.yaml')) as f:
        assert f.read() == current
    with open(os.path.join(logdir, 'config.yaml'), 'w') as f:
        f.write('another\n')
    second = write_config(logdir)                             # same second: no clobbering
    assert second != backup and os.path.isfile(backup) and os.path.isfile(second)
    assert sorted(os.listdir(logdir)) == sorted(
        ['config.yaml', os.path.basename(backup), os.path.basename(second)])


@pytest.mark.parametrize('trainer, gpus, rank, size, want', [
    ('replicated', 0, 0, 1, ('simple', 1, None)),        # CPU
    ('replicated', 1, 0, 1, ('simple', 1, None)),        # one GPU
    ('replicated', 4, 0, 1, ('replicated', 4, None)),    # 4 towers in one process: all data
    ('horovod', 1, 2, 4, ('horovod', 4, (2, 4))),        # rank 2 of 4 reads its shard
    ('horovod', 0, 0, 1, ('horovod', 1, None)),          # a single rank reads everything
])
def test_plan_devices_trainer_and_shard(trainer, gpus, rank, size, want):
    from utils.training import plan_devices
    assert tuple(plan_devices(trainer, gpus, rank, size)) == want


def test_planned_shards_cover_the_data_once():
    """Horovod ranks read disjoint shards that cover the training set; a replicated
    process (any GPU count) reads all of it."""
    from data import get_train_dataflow
    from tiny import configured
    from utils.training import plan_devices

    def images(shard):
        ds = get_train_dataflow(shard=shard)
        while not hasattr(ds, 'lst'):  # MapData(...(DataFromList)): the roidb list
            ds = ds.ds
        return [r['image_id'] for r in ds.lst]
    with configured():
        everything = images(plan_devices('replicated', 8).shard)
        ranks = [images(plan_devices('horovod', 1, r, 3).shard) for r in range(3)]
    assert len(everything) == 40
    assert sorted(sum(ranks, [])) == sorted(everything)
    assert all(12 <= len(r) <= 14 for r in ranks)


def test_gradient_accumulation_updates_once_by_the_mean_gradient():
    """TRAIN.GRADIENT_ACCUMULATION=2 through the model's own optimizer(): the first step
    leaves the weights alone, the second applies the mean of both gradients, exactly what
    one k=1 step on the averaged gradient does (w -= lr * mean g, momentum's first step)."""
    from modeling.generalized_rcnn import GeneralizedRCNN
    from tiny import configured
    w0, lr = np.float32([1., -2., .5]), 0.1
    x1, x2 = np.float32([3., 1., -1.]), np.float32([-1., 0., 2.])

    def weights_after(accum, batches):
        with configured(['TRAIN.GRADIENT_ACCUMULATION={}'.format(accum)]), \
                tf.Graph().as_default():
            x = tf.placeholder(tf.float32, [3])
            w = tf.get_variable('w', initializer=w0)
            loss = 0.5 * tf.reduce_sum(tf.square(w - x))  # gradient w - x
            opt = GeneralizedRCNN().optimizer()
            train_op = opt.minimize(loss, global_step=tf.train.get_or_create_global_step())
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                tf.get_variable_scope().reuse_variables()
                sess.run(tf.get_variable('learning_rate').assign(lr))
                out = []
                for batch in batches:
                    sess.run(train_op, {x: batch})
                    out.append(sess.run(w))
        return out

    after = weights_after(2, [x1, x2] * 40)
    first, second, third = after[:3]
    np.testing.assert_array_equal(first, w0)                      # accumulated only
    want = w0 - lr * ((w0 - x1) + (w0 - x2)) / 2
    np.testing.assert_allclose(second, want, rtol=1e-6)           # one update, mean gradient
    np.testing.assert_array_equal(third, second)                  # accumulating again
    # Every odd step only accumulates, every even one moves (an ordering race once made
    # step 1 apply: utils/compat.py shim 10).
    for i in range(2, len(after), 2):
        np.testing.assert_array_equal(after[i], after[i - 1], err_msg='step {}'.format(i + 1))
        assert not np.array_equal(after[i + 1], after[i]), 'step {}'.format(i + 2)
    np.testing.assert_allclose(weights_after(1, [(x1 + x2) / 2])[0], second, rtol=1e-6)
