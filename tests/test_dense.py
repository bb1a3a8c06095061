"""Dense scenes (thousands of instances): the fast anchor matcher equals the dense one,
anchor labelling is fast, training memory grows at most linearly with the instance count,
a model trains, evaluates and predicts thousands of detections on a dense image, and crop
training (PREPROC.CROP_SIZE) keeps boxes and masks consistent with the cropped image."""
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc

import cv2
import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from pycocotools import mask as mask_util

import data
from common import filter_boxes_inside_shape, read_image
from config import config as cfg
from dataset import DatasetRegistry
from dataset.shapes import CLASS_NAMES, ShapesDataset
from modeling.generalized_rcnn import model_input_names
from modeling.training_graph import build_training_step
from tests.tiny import TINY, configured
from utils import np_box_ops
from utils.anchors import get_all_anchors_fpn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TINY at 512 px: dense shapes stay a few pixels wide instead of vanishing at 128 px.
DENSE_TINY = TINY + ['PREPROC.TRAIN_SHORT_EDGE_SIZE=[512,512]',
                     'PREPROC.TEST_SHORT_EDGE_SIZE=512', 'PREPROC.MAX_SIZE=512',
                     'PREPROC.HORIZONTAL_FLIP=False']


def _scene(rng, n, h, w):
    """n gt boxes of an h x w image: mostly small, plus ones spanning (and leaving) the
    image, exact duplicates, and zero-width / zero-height boxes."""
    xy = rng.uniform(0, [w, h], (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 40, (n, 2))], 1)
    big = rng.choice(n, max(n // 20, 3), replace=False)
    boxes[big, :2] = rng.uniform(-50, [w / 2, h / 2], (len(big), 2))
    boxes[big, 2:] = boxes[big, :2] + rng.uniform([w / 3, h / 3], [w * 1.2, h * 1.2],
                                                  (len(big), 2))
    boxes[big[0]] = [-10, -10, w + 10, h + 10]  # covers everything
    boxes[5] = boxes[2]
    boxes[7, 2] = boxes[7, 0]
    boxes[8, 3] = boxes[8, 1]
    return boxes.astype(np.float32)


@pytest.mark.parametrize('chunk,max_pairs', [(1, 1 << 22), (5, 300), (16, 1 << 22),
                                             (64, 2000)])
def test_fast_matcher_equals_dense(chunk, max_pairs):
    rng = np.random.default_rng(chunk)
    h, w = 160, 224
    grids = get_all_anchors_fpn((4, 8, 16, 32, 64), (16, 32, 64, 128, 256), (0.5, 1, 2), 256,
                                0.)
    flat = np.concatenate([g.reshape(-1, 4) for g in grids])
    _, anchors = filter_boxes_inside_shape(flat, (h, w))
    anchors = np.concatenate([anchors, rng.uniform(0, 200, (50, 4)).astype(np.float32)])
    gt = _scene(rng, 400, h, w)
    dense = np_box_ops.pairwise_iou(anchors, gt)
    amax, arg, gmax, best = np_box_ops.max_iou_over_gt(anchors, gt, chunk, max_pairs,
                                                       best_anchors=True)
    np.testing.assert_array_equal(amax, dense.max(axis=1))
    np.testing.assert_array_equal(arg, dense.argmax(axis=1))  # ties: lowest gt index
    np.testing.assert_array_equal(gmax, dense.max(axis=0))
    at_max = ((dense == dense.max(axis=0)) & (dense.max(axis=0) > 0)).any(axis=1)
    np.testing.assert_array_equal(best, at_max)
    assert (amax > 0).mean() > 0.5 and at_max.sum() >= 100  # the comparison has teeth
    crowd = gt[::40]
    np.testing.assert_array_equal(np_box_ops.max_coverage(anchors, crowd, chunk, max_pairs),
                                  np_box_ops.pairwise_ioa(crowd, anchors).max(axis=0))
    assert not np_box_ops.max_coverage(anchors, np.zeros((0, 4), np.float32)).any()


def test_anchor_labelling_3000_gt_is_fast():
    """FPN anchor targets for 3000 gt on an 800 x 1333 image: ~48 s when every gt chunk
    met every anchor, ~0.5 s of CPU with the spatial index."""
    with cfg.override(['PREPROC.MAX_SIZE=1333']):
        shape = (800, 1333)
        rng = np.random.default_rng(0)
        xy = rng.uniform(0, [1300, 770], (3000, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(8, 30, (3000, 2))], 1).astype(np.float32)
        start = time.process_time()  # CPU time: other jobs on a shared machine do not count
        levels = data.get_multilevel_rpn_anchor_input(shape, boxes, np.zeros(3000, np.int8),
                                                      np.random.default_rng(0))
        cpu = time.process_time() - start
    labels = np.concatenate([lab.reshape(-1) for lab, _ in levels])
    assert (labels == 1).sum() == 128 and (labels >= 0).sum() == 256
    assert cpu < 3., cpu


def _bench(instances, config):
    """bench/dense.py's JSON lines for a 512 px scene, each count in its own process."""
    cmd = [sys.executable, os.path.join(ROOT, 'bench', 'dense.py'), '--image-size', '512',
           '512', '--steps', '1', '--warmup', '1', '--instances'] + \
        [str(n) for n in instances] + ['--config'] + config
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]


def test_training_memory_grows_at_most_linearly():
    """300 -> 1500 instances: every per-instance cost is linear and small (N x M^2 mask
    bytes, chunked IoUs). One (anchors x gt) float32 matrix would add ~300 MB."""
    config = DENSE_TINY + ['RPN.TRAIN_PER_LEVEL_NMS_TOPK=1000', 'RPN.TRAIN_POST_NMS_TOPK=1000',
                           'FRCNN.BATCH_PER_IM=256']
    small, large = _bench([300, 1500], config)
    assert small['gt_boxes'] >= 280 and large['gt_boxes'] >= 1400, (small, large)
    assert small['finite'] and large['finite'], (small, large)
    num_anchors = sum(3 * math.ceil(512 / s) ** 2 for s in (4, 8, 16, 32, 64))
    growth = large['peak_rss_mb'] - small['peak_rss_mb']
    extra_gt = large['gt_boxes'] - small['gt_boxes']
    assert num_anchors * extra_gt * 4 / 2 ** 20 > 250  # what one dense IoU matrix costs
    assert growth < 100, (small, large)   # measured: ~10-40 MB (allocator noise included)


def _dense_split(name, split, seed, tmp):
    """A registered one-image split: image 0 of shapes_dense_<split> (same seed and sizes)."""
    DatasetRegistry.register(name, lambda: ShapesDataset(split, 1, seed, 896, 1024, dense=True,
                                                         cache_root=tmp))
    DatasetRegistry.register_metadata(name, 'class_names', list(CLASS_NAMES))
    return name


def test_dense_train_evaluate_predict_thousands(tmp_path):
    from eval import evaluate_on_dataset, predict_image
    from predict import build_predictor
    from utils.training import WeightsLoader
    train = _dense_split('shapes_dense_train_1img', 'dense_train', 2, str(tmp_path))
    val = _dense_split('shapes_dense_val_1img', 'dense_val', 3, str(tmp_path))
    overrides = DENSE_TINY + [
        'DATA.TRAIN=' + train, 'DATA.VAL=' + val, 'TEST.RESULTS_PER_IM=3000',
        'TEST.RESULT_SCORE_THRESH=0.0', 'RPN.TEST_PER_LEVEL_NMS_TOPK=3000',
        'RPN.TEST_POST_NMS_TOPK=3000', 'RPN.TEST_PRE_NMS_TOPK=3000']
    ckpt = str(tmp_path / 'model')
    with configured(overrides):
        roidb = DatasetRegistry.get(train).training_roidbs()[0]
        assert len(roidb['boxes']) >= 1000
        preprocess = data.TrainingDataPreprocessor(seed=0)
        with tf.Graph().as_default():
            tf.set_random_seed(0)
            placeholders, _, losses, train_op = build_training_step()
            saver = tf.train.Saver()
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                for _ in range(2):
                    dp = preprocess(roidb)
                    feed = {p: dp[n] for p, n in zip(placeholders, model_input_names(True))}
                    values = sess.run([train_op, losses], feed)[1]
                    assert all(np.isfinite(v) for v in values.values()), values
                saver.save(sess, ckpt)
        assert len(dp['gt_boxes']) >= 1000

        predictor = build_predictor(WeightsLoader(ckpt))
        metrics = evaluate_on_dataset(val, predictor)
        assert metrics and all(np.isfinite(v) for v in metrics.values()), metrics

        val_roidb = DatasetRegistry.get(val).training_roidbs()[0]
        img = read_image(val_roidb['file_name'])
        tracemalloc.start()
        try:
            results = predict_image(img, predictor, mask_format='rle')
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    h, w = img.shape[:2]
    assert 1000 <= len(results) <= 3000, len(results)  # measured: 3000 (the cap)
    assert all(r.mask['size'] == [h, w] for r in results)
    # Full-image uint8 masks of every detection would take len(results) * H * W bytes
    # (~3 GB); streamed RLE pasting measured ~6 MB.
    assert peak < 0.1 * len(results) * h * w, (peak, len(results))


def _triangles_scene(path, h=256, w=320):
    """White triangles on black, drawn with the same rasteriser as the masks; its roidb."""
    rng = np.random.default_rng(0)
    polys = []
    for y in range(8, h - 40, 48):
        for x in range(8, w - 40, 52):
            corners = np.float32([[x, y], [x + 40, y + rng.uniform(0, 20)],
                                  [x + rng.uniform(0, 40), y + 40]])
            polys.append(corners)
    rles = mask_util.frPyObjects([p.reshape(-1).tolist() for p in polys], h, w)
    full = mask_util.decode(rles).max(axis=2)
    cv2.imwrite(path, np.repeat(full[:, :, None] * 255, 3, axis=2).astype(np.uint8))
    boxes = np.float32([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()]
                        for p in polys])
    return {'file_name': path, 'image_id': 0, 'height': h, 'width': w, 'boxes': boxes,
            'class': np.ones(len(polys), np.int32), 'is_crowd': np.zeros(len(polys), np.int8),
            'segmentation': [[p] for p in polys]}


def test_crop_training_keeps_boxes_and_masks_on_the_cropped_image(tmp_path):
    """CROP_SIZE=128 out of 256 x 320: boxes are clipped to the crop, instances cut by it
    keep their visible part, and each box-frame mask lands on the white pixels."""
    roidb = _triangles_scene(str(tmp_path / 'scene.png'))
    cut = 0
    with configured(['PREPROC.TRAIN_SHORT_EDGE_SIZE=[256,256]', 'PREPROC.MAX_SIZE=320',
                     'PREPROC.CROP_SIZE=128']):
        size = cfg.MRCNN.GT_MASK_SIZE
        for seed in range(6):
            dp = data.TrainingDataPreprocessor(seed=seed)(roidb)
            img = dp['image'][:, :, 0]
            assert img.shape == (128, 128)
            boxes = dp['gt_boxes']
            assert len(boxes) >= 2 and (boxes >= 0).all() and (boxes <= 128).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            for box, mask in zip(boxes, dp['gt_masks']):
                if min(box[2] - box[0], box[3] - box[1]) < 6:
                    continue
                cut += bool(((box == 0) | (box == 128)).any())
                xs = (box[0] + (np.arange(size) + .5) * (box[2] - box[0]) / size).astype(int)
                ys = (box[1] + (np.arange(size) + .5) * (box[3] - box[1]) / size).astype(int)
                white = img[ys[:, None], xs[None, :]] > 127
                assert (white == mask.astype(bool)).mean() > 0.9
    assert cut >= 3  # instances cut by the crop border were checked too


def test_random_crop_contains_a_chosen_instance():
    from common import random_crop
    img = np.zeros((400, 600, 3), np.uint8)
    boxes = np.float32([[500, 350, 540, 390], [10, 10, 20, 20]])  # one instance, one crowd
    crowd = np.int8([0, 1])
    rng = np.random.default_rng(0)
    for _ in range(50):
        out, shifted, _ = random_crop(img, boxes, crowd, None, 128, rng)
        assert out.shape == (128, 128, 3)
        assert (shifted[0, :2] >= 0).all() and (shifted[0, 2:] <= 128).all()  # whole inside
    big = np.float32([[0, 0, 600, 400]])  # larger than the crop: its centre is kept
    for _ in range(20):
        _, shifted, _ = random_crop(img, big, np.int8([0]), None, 128, rng)
        centre = (shifted[0, :2] + shifted[0, 2:]) / 2
        assert (centre >= 0).all() and (centre <= 128).all()
    out, _, _ = random_crop(img[:100], boxes[1:], crowd[1:], None, 128, rng)  # crowd only
    assert out.shape == (100, 128, 3)


@pytest.mark.slow
def test_two_dense_images_per_step_cost_at_most_1_5x_memory_per_image():
    """2000 instances, TRAIN.IMAGES_PER_DEVICE 1 vs 2 (two dense scenes per step): the
    memory a step adds to the built graph, per image, grows at most 1.5x (per-image
    targets, sampling and losses: no anchors x objects matrix for the whole batch)."""
    config = DENSE_TINY + ['FRCNN.BATCH_PER_IM=256']
    one = _bench([2000], config)[0]
    two = _bench([2000], config + ['TRAIN.IMAGES_PER_DEVICE=2'])[0]
    assert one['images'] == 1 and two['images'] == 2
    assert one['gt_boxes'] >= 1500 and one['finite'] and two['finite'], (one, two)
    per_image = [(r['peak_rss_mb'] - r['rss_built_mb']) / r['images'] for r in (one, two)]
    # 20 MB: allocator noise on a step of a few hundred MB
    assert per_image[1] <= 1.5 * per_image[0] + 20, (one, two)
    assert two['peak_rss_mb'] <= 1.5 * 2 * one['peak_rss_mb'], (one, two)
