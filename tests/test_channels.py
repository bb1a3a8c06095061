"""N-channel input and one channel order everywhere.

- Grayscale (1 channel) and RGB-D (4 channels, 16-bit PNG) COCO datasets train, predict and
  evaluate end to end.
- A 3-channel checkpoint loads into a 1-channel model: only conv0/W is skipped (listed),
  and conv0 trains even with BACKBONE.TRAINABLE=heads.
- Training, evaluation and predict.py feed the graph the same array for the same file,
  in BGR or RGB (RGB really reversed).
"""
import json
import os

import cv2
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import data
from common import read_image
from dataset import DatasetRegistry, DatasetSplit, register_coco_json
from dataset.shapes import CLASS_NAMES, generate_image
from modeling.generalized_rcnn import model_input_names
from modeling.training_graph import build_training_step
from tests.tiny import configured

CHANNEL_CONFIG = {
    1: ['PREPROC.IMAGE_CHANNELS=1', 'PREPROC.PIXEL_MEAN=[120.]', 'PREPROC.PIXEL_STD=[60.]'],
    3: [],
    4: ['PREPROC.IMAGE_CHANNELS=4', 'PREPROC.PIXEL_MEAN=[103.,116.,123.,128.]',
        'PREPROC.PIXEL_STD=[57.,57.,58.,64.]'],
}


def _to_channels(img, channels):
    """uint8 BGR shapes image -> what the file holds: 8-bit gray, BGR, or 16-bit BGR + depth."""
    if channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if channels == 3:
        return img
    # A depth-like 4th channel that differs from the colours: distance from the centre.
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    depth = np.hypot(yy - h / 2, xx - w / 2) / np.hypot(h / 2, w / 2) * 65535
    return np.dstack([img.astype(np.uint16) * 257, depth.astype(np.uint16)])


def _register_coco(folder, name, channels, num=4):
    """``num`` shapes images as a COCO-format split with ``channels``-channel PNGs."""
    os.makedirs(folder, exist_ok=True)
    images, anns = [], []
    for i in range(num):
        img, roidb = generate_image(11, i, 96, 128)
        file_name = '{}.png'.format(i)
        cv2.imwrite(os.path.join(folder, file_name), _to_channels(img, channels))
        images.append({'id': i + 1, 'file_name': file_name, 'height': img.shape[0],
                       'width': img.shape[1]})
        for box, klass, polys in zip(roidb['boxes'], roidb['class'], roidb['segmentation']):
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({'id': len(anns) + 1, 'image_id': i + 1, 'category_id': int(klass),
                         'iscrowd': 0, 'bbox': [x1, y1, x2 - x1, y2 - y1],
                         'area': (x2 - x1) * (y2 - y1),
                         'segmentation': [p.reshape(-1).tolist() for p in polys]})
    cats = [{'id': i + 1, 'name': n} for i, n in enumerate(CLASS_NAMES)]
    json_file = os.path.join(folder, 'annotations.json')
    with open(json_file, 'w') as f:
        json.dump({'images': images, 'annotations': anns, 'categories': cats}, f)
    register_coco_json(name, json_file, folder)
    return name


def _save_untrained(path):
    """Variables of the configured model (inference graph) at their initial values, saved
    to ``path``. Returns (trainable variable names, {name: value})."""
    from tensorpack.tfutils.tower import TowerContext

    from config import config as cfg
    from modeling.generalized_rcnn import build_model
    with tf.Graph().as_default():
        image = tf.placeholder(tf.float32, [None, None, cfg.PREPROC.IMAGE_CHANNELS], 'image')
        with TowerContext('', is_training=False):
            build_model().build_graph(image)
        trainable = [v.op.name for v in tf.trainable_variables()]
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            values = sess.run({v.op.name: v for v in tf.global_variables()})
            tf.train.Saver().save(sess, path)
    return trainable, values


def _train(steps, save_to, session_init=None):
    """Build the training graph, optionally load weights, run ``steps`` steps on the
    first DATA.TRAIN image and save. Returns (trainable variable names, losses of the
    last step, {name: value} of every global variable before and after the steps)."""
    from config import config as cfg
    roidb = DatasetRegistry.get(cfg.DATA.TRAIN[0]).training_roidbs()[0]
    dp = data.TrainingDataPreprocessor(seed=0)(roidb)
    assert dp['image'].shape[2] == cfg.PREPROC.IMAGE_CHANNELS
    with tf.Graph().as_default():
        placeholders, _, losses, train_op = build_training_step()
        trainable = [v.op.name for v in tf.trainable_variables()]
        everything = {v.op.name: v for v in tf.global_variables()}
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            if session_init is not None:
                session_init.init(sess)
            before = sess.run(everything)
            feed = {p: dp[n] for p, n in zip(placeholders, model_input_names(True))}
            for _ in range(steps):
                values = sess.run([train_op, losses], feed)[1]
            after = sess.run(everything)
            tf.train.Saver().save(sess, save_to)
    return trainable, values, before, after


def _predict_and_evaluate(name, checkpoint, channels):
    """Predict the first image of ``name`` and evaluate on all of it, from ``checkpoint``."""
    from eval import evaluate_on_dataset, predict_image
    from predict import build_predictor
    from utils.training import WeightsLoader
    predictor = build_predictor(WeightsLoader(checkpoint))
    roidb = DatasetRegistry.get(name).training_roidbs()[0]
    img = read_image(roidb['file_name'])
    assert img.shape == (roidb['height'], roidb['width'], channels)
    if channels == 4:  # the 16-bit depth channel arrives scaled to [0, 255], not dropped
        raw = cv2.imread(roidb['file_name'], cv2.IMREAD_UNCHANGED)
        np.testing.assert_allclose(img[:, :, 3], raw[:, :, 3] / 257., rtol=1e-6)
    for r in predict_image(img, predictor):
        assert r.mask.shape == img.shape[:2] and 0 <= r.box[0] <= r.box[2] <= img.shape[1]
    metrics = evaluate_on_dataset(name, predictor)
    assert 'mAP(bbox)/IoU=0.5:0.95' in metrics and 'mAP(segm)/IoU=0.5:0.95' in metrics


def test_grayscale_from_rgb_weights_trains_conv0_with_heads_only(tmp_path):
    """1 channel, initialised from a 3-channel checkpoint with BACKBONE.TRAINABLE=heads:
    conv0/W alone is skipped (listed), the rest loads, conv0 trains, then predict and
    evaluate on the grayscale dataset."""
    from utils.training import WeightsLoader
    name = _register_coco(str(tmp_path / 'data'), 'shapes_gray', 1)
    rgb, gray = str(tmp_path / 'rgb'), str(tmp_path / 'gray')
    with configured(['BACKBONE.TRAINABLE=heads']):
        trainable, saved = _save_untrained(rgb)
    assert 'conv0/W' not in trainable  # 3 channels: the stem is frozen with the rest

    with configured(CHANNEL_CONFIG[1] + ['BACKBONE.TRAINABLE=heads', 'DATA.TRAIN=' + name,
                                         'DATA.VAL=' + name]):
        loader = WeightsLoader(rgb)
        trainable, losses, before, after = _train(2, gray, session_init=loader)
        assert all(np.isfinite(v) for v in losses.values()), losses
        assert [s.split()[0] for s in loader.skipped['shape differs']] == ['conv0/W']
        assert before['conv0/W'].shape == (7, 7, 1, 64)
        assert len(loader.loaded) > 50
        for var in loader.loaded:
            np.testing.assert_array_equal(before[var], saved[var])
        # conv0 is new and trains although only the heads do; the frozen res2 does not move.
        assert 'conv0/W' in trainable and not any(n.startswith('group') for n in trainable)
        assert not np.array_equal(before['conv0/W'], after['conv0/W'])
        np.testing.assert_array_equal(before['group0/block0/conv1/W'],
                                      after['group0/block0/conv1/W'])
        _predict_and_evaluate(name, gray, 1)


def test_rgbd_16bit_trains_predicts_evaluates(tmp_path):
    name = _register_coco(str(tmp_path / 'data'), 'shapes_rgbd', 4)
    ckpt = str(tmp_path / 'model')
    with configured(CHANNEL_CONFIG[4] + ['DATA.TRAIN=' + name, 'DATA.VAL=' + name]):
        _, losses, before, after = _train(2, ckpt)
        assert before['conv0/W'].shape == (7, 7, 4, 64)
        assert all(np.isfinite(v) for v in losses.values()), losses
        assert not np.array_equal(before['conv0/W'], after['conv0/W'])
        _predict_and_evaluate(name, ckpt, 4)


class _OneImage(DatasetSplit):
    """One image with one box, for the data paths (no evaluation)."""

    def __init__(self, path, h, w):
        self.roidb = {'file_name': path, 'image_id': 1, 'height': h, 'width': w,
                      'boxes': np.float32([[10, 20, 60, 70]]), 'class': np.int32([1]),
                      'is_crowd': np.int8([0]),
                      'segmentation': [[np.float32([[10, 20], [60, 20], [60, 70], [10, 70]])]]}

    def training_roidbs(self):
        return [self.roidb]

    def inference_roidbs(self):
        return [{k: self.roidb[k] for k in ('file_name', 'image_id', 'height', 'width')}]


class _Recorder:
    """A stand-in model function: records the image it is fed, detects nothing."""

    def __init__(self):
        self.images = []

    def __call__(self, img):
        self.images.append(np.array(img))
        return [np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32),
                np.zeros((0, 28, 28), np.float32)]


@pytest.mark.parametrize('channels', [3, 4])
def test_training_evaluation_and_predict_feed_the_same_array(tmp_path, channels):
    import eval as ev
    import predict
    rs = np.random.RandomState(channels)
    h, w = 96, 128
    raw = rs.randint(0, 256, (h, w, channels)).astype(np.uint8)  # every channel distinct
    folder = str(tmp_path / 'data')
    os.makedirs(folder)
    path = os.path.join(folder, 'img.png')
    cv2.imwrite(path, raw)
    name = 'order_{}ch'.format(channels)
    DatasetRegistry.register(name, lambda: _OneImage(path, h, w))
    DatasetRegistry.register_metadata(name, 'class_names', list(CLASS_NAMES))

    fed = {}
    for order in ('BGR', 'RGB'):
        # No resize (short edge = the image's), no flip: the graph sees the file's pixels.
        with configured(CHANNEL_CONFIG[channels] + [
                'PREPROC.CHANNEL_ORDER=' + order, 'DATA.TRAIN=' + name, 'DATA.VAL=' + name,
                'PREPROC.TRAIN_SHORT_EDGE_SIZE=[{0},{0}]'.format(h),
                'PREPROC.TEST_SHORT_EDGE_SIZE={}'.format(h), 'PREPROC.MAX_SIZE=256',
                'PREPROC.HORIZONTAL_FLIP=False']):
            train = data.get_train_dataflow()
            train.reset_state()
            train_img = next(iter(train))[0]
            recorder = _Recorder()
            roidbs = DatasetRegistry.get(name).inference_roidbs()
            ev.predict_dataflow(ev.read_inference_images(roidbs, []), recorder)
            predict.run_predict(predict.parse_args(
                ['--load', 'unused', '--predict', path, '--output', str(tmp_path / order)]),
                recorder)
        eval_img, predict_img = recorder.images
        for img in (eval_img, predict_img):
            np.testing.assert_array_equal(img, train_img)
        fed[order] = train_img
    np.testing.assert_array_equal(fed['BGR'], raw.astype(np.float32))
    rgb = raw[:, :, [2, 1, 0] + ([3] if channels == 4 else [])]
    np.testing.assert_array_equal(fed['RGB'], rgb.astype(np.float32))
    assert not np.array_equal(fed['RGB'], fed['BGR'])
