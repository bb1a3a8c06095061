"""utils/training.py: the scaled LR schedule and weight loading with skips."""
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from config import config as cfg
from utils.training import ScaledSchedule, UserInputError, WeightsLoader, read_weights


@pytest.fixture
def schedule_cfg():
    cfg.freeze(False)
    keys = ['TRAIN.BASE_LR', 'TRAIN.WARMUP', 'TRAIN.WARMUP_INIT_LR', 'TRAIN.LR_SCHEDULE',
            'TRAIN.GRADIENT_ACCUMULATION', 'TRAIN.REFERENCE_BATCH', 'TRAIN.STEPS_PER_EPOCH']
    saved = {k: cfg._lookup(k)[0].__dict__[cfg._lookup(k)[1]] for k in keys}
    cfg.update_args(['TRAIN.BASE_LR=0.02', 'TRAIN.WARMUP=1000', 'TRAIN.WARMUP_INIT_LR=0.002',
                     'TRAIN.LR_SCHEDULE=[60000,80000,90000]', 'TRAIN.REFERENCE_BATCH=16',
                     'TRAIN.STEPS_PER_EPOCH=500'])
    yield cfg
    for k, v in saved.items():
        node, leaf = cfg._lookup(k)
        node.__dict__[leaf] = v


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
