"""eval.py (mask pasting, prediction, COCO results, EvalCallback) and viz.py."""
import json
import os
import tracemalloc
import types

import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from tensorpack import OfflinePredictor, PredictConfig, TrainConfig
from tensorpack import SimpleTrainer, launch_train_with_config
from tensorpack.dataflow import DataFromList
from tensorpack.utils import logger

import eval as ev
import viz
from tests.stand_in import StandInModel, add_corrupt_image, make_image

tf1 = tf.compat.v1


# ------------------------------------------------------------------ mask pasting
def reference_paste(mask, box, shape, threshold=0.5):
    """Pixel loops: a pixel is set iff its centre is in the box and the mask cell that
    contains the centre is above the threshold (nearest-cell sampling)."""
    res = mask.shape[0]
    x1, y1, x2, y2 = box
    out = np.zeros(shape, dtype=np.uint8)
    for y in range(shape[0]):
        for x in range(shape[1]):
            cx, cy = x + 0.5, y + 0.5
            if x1 <= cx < x2 and y1 <= cy < y2:
                c = int((cx - x1) / (x2 - x1) * res)
                r = int((cy - y1) / (y2 - y1) * res)
                out[y, x] = mask[r, c] > threshold
    return out


def reference_zeros_paste(mask, box, shape, threshold=0.5):
    """Pixel loops: bilinear interpolation of the mask at each pixel centre, with value 0
    outside the grid (cell c's centre at c; detectron2's grid_sample with zero padding and
    align_corners=False, tensorpack's accurate paste); set iff >= threshold."""
    res = mask.shape[0]
    x1, y1, x2, y2 = box
    out = np.zeros(shape, dtype=np.uint8)

    def cell(r, c):
        return float(mask[r, c]) if 0 <= r < res and 0 <= c < res else 0.
    for y in range(shape[0]):
        for x in range(shape[1]):
            u = (x + 0.5 - x1) / (x2 - x1) * res - 0.5
            v = (y + 0.5 - y1) / (y2 - y1) * res - 0.5
            c0, r0 = int(np.floor(u)), int(np.floor(v))
            fu, fv = u - c0, v - r0
            val = ((1 - fv) * ((1 - fu) * cell(r0, c0) + fu * cell(r0, c0 + 1)) +
                   fv * ((1 - fu) * cell(r0 + 1, c0) + fu * cell(r0 + 1, c0 + 1)))
            out[y, x] = val >= threshold
    return out


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.


@pytest.mark.parametrize('box', [(3, 5, 17, 12), (0, 0, 40, 30), (-6, 20, 9, 45),
                                 (30, 1, 60, 9), (50, 50, 70, 80)])
def test_paste_constant_mask_is_exact_on_integer_boxes(box):
    mask = np.full((14, 14), 0.9, dtype=np.float32)
    got = ev.paste_mask(mask, box, (40, 50), border='edge')
    assert got.dtype == np.uint8 and got.shape == (40, 50)
    np.testing.assert_array_equal(got, reference_paste(mask, box, (40, 50)))


# Bilinear sampling equals nearest-cell sampling when each cell covers 1x1 or 2x2 pixels
# (at 3x3 and more, bilinear rounds off the convex corners of isolated blocks).
@pytest.mark.parametrize('scale', [1, 2])
def test_paste_blocky_mask_is_exact_on_integer_scales(scale):
    rs = np.random.RandomState(scale)
    mask = (rs.uniform(size=(8, 8)) > 0.5).astype(np.float32)
    box = (4, 7, 4 + 8 * scale, 7 + 8 * scale)
    got = ev.paste_mask(mask, box, (40, 45), border='edge')
    np.testing.assert_array_equal(got, reference_paste(mask, box, (40, 45)))
    assert got.sum() == mask.sum() * scale ** 2  # each cell became scale x scale pixels


def test_paste_fractional_boxes_close_to_reference():
    yy, xx = np.mgrid[:28, :28] + 0.5
    disc = ((yy - 14) ** 2 + (xx - 13) ** 2 < 11 ** 2).astype(np.float32)
    rs = np.random.RandomState(0)
    for _ in range(10):
        x1, y1 = rs.uniform(-10, 60, size=2)
        w, h = rs.uniform(30, 70, size=2)
        box = (x1, y1, x1 + w, y1 + h)
        got = ev.paste_mask(disc, box, (90, 100), border='edge')
        want = reference_paste(disc, box, (90, 100))
        assert want.sum() > 100 and iou(got, want) >= 0.97, (box, iou(got, want))


def test_zeros_paste_equals_zero_padded_bilinear_reference():
    """TEST.MASK_PASTE='zeros' (the default): tensorpack's accurate paste / detectron2."""
    rs = np.random.RandomState(3)
    for i in range(8):
        mask = rs.uniform(size=(14, 14)).astype(np.float32)
        if i % 2:
            mask = (mask > 0.3).astype(np.float32)  # steps: ties at exactly 0.5 matter
        x1, y1 = rs.uniform(-8, 30, size=2)
        box = (x1, y1, x1 + rs.uniform(5, 40), y1 + rs.uniform(5, 40))
        got = ev.paste_mask(mask, box, (50, 60))
        want = reference_zeros_paste(mask, box, (50, 60))
        # float32 vs float64 interpolation may flip a pixel sitting on the threshold
        assert want.sum() > 10 and (got != want).sum() <= 2, (box, (got != want).sum())


def test_zeros_and_edge_paste_differ_only_in_the_outer_half_cell():
    ones = np.ones((14, 14), dtype=np.float32)
    box = (5, 5, 33, 33)  # 2 px per cell
    for border in ('zeros', 'edge'):  # a certain mask fills exactly its box either way
        got = ev.paste_mask(ones, box, (40, 40), border=border)
        assert got[5:33, 5:33].all() and got.sum() == 28 * 28
    soft = np.full((14, 14), 0.8, dtype=np.float32)
    edge = ev.paste_mask(soft, box, (40, 40), border='edge')
    zeros = ev.paste_mask(soft, box, (40, 40), border='zeros')
    assert edge.sum() == 28 * 28
    # 'zeros' fades 0.8 to 0.4 at the box edge: the outermost pixel ring (centre 0.25 cell
    # inside: 0.8 * 0.75 = 0.6) stays, the corners (0.6 * 0.75 = 0.45) go
    assert zeros[5:33, 5:33].sum() == 28 * 28 - 4 and zeros.sum() == 28 * 28 - 4


def test_paste_box_outside_image_or_degenerate_gives_empty_mask():
    ones = np.ones((28, 28), dtype=np.float32)
    assert ev.paste_mask(ones, (60, 60, 80, 90), (50, 50)).sum() == 0
    assert ev.paste_mask(ones, (10, 10, 10, 20), (50, 50)).sum() == 0


def test_rle_pasting_matches_full_masks_and_bounds_memory():
    rs = np.random.RandomState(1)
    n, shape = 3000, (400, 500)
    xy = rs.uniform(0, 480, size=(n, 2)) * [1, 0.78]
    boxes = np.concatenate([xy, xy + rs.uniform(4, 20, size=(n, 2))], axis=1)
    masks = rs.uniform(size=(n, 28, 28)).astype(np.float32)

    gen = ev.iter_paste_masks(masks, boxes, shape)
    assert isinstance(gen, types.GeneratorType)
    tracemalloc.start()
    rles = ev.paste_masks_rle(masks, boxes, shape)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 3000 full masks would take 600 MB; one at a time (plus the RLE strings) stays small.
    assert peak < 30 * 2 ** 20, peak
    assert len(rles) == n and all(isinstance(r['counts'], str) for r in rles)
    for i, full in zip(range(5), gen):
        np.testing.assert_array_equal(mask_util.decode(rles[i]), full)
        assert full.sum() > 0


# ------------------------------------------------------------------ predict_image
def test_predict_image_maps_boxes_back_per_axis(fresh_cfg):
    fresh_cfg.PREPROC.TEST_SHORT_EDGE_SIZE = 50
    fresh_cfg.PREPROC.MAX_SIZE = 1000
    seen = []

    def model_func(resized):  # a known box: the whole resized image, and one fixed box
        seen.append(resized.shape)
        h, w = resized.shape[:2]
        return (np.float32([[0, 0, w, h], [10, 20, 30, 40]]), np.float32([0.9, 0.8]),
                np.int32([1, 2]))

    img = np.zeros((123, 77, 3), dtype=np.float32)  # 79.87 x 50 -> 80 x 50: sy != sx
    timings = {}
    results = ev.predict_image(img, model_func, timings=timings)
    assert seen == [(80, 50, 3)]
    np.testing.assert_allclose(results[0].box, [0, 0, 77, 123], rtol=1e-6)
    np.testing.assert_allclose(results[1].box, [10 * 77 / 50, 20 * 123 / 80,
                                                30 * 77 / 50, 40 * 123 / 80], rtol=1e-6)
    assert [r.class_id for r in results] == [1, 2] and results[0].mask is None
    assert set(timings) == set(ev.PHASES) and all(t >= 0 for t in timings.values())


def test_predict_image_masks_full_and_rle_agree(fresh_cfg):
    fresh_cfg.PREPROC.TEST_SHORT_EDGE_SIZE = 30  # 60 x 80 -> 30 x 40
    fresh_cfg.PREPROC.MAX_SIZE = 1000

    def model_func(resized):  # box in resized pixels = (5, 5, 25, 15) in the original
        return (np.float32([[2.5, 2.5, 12.5, 7.5]]), np.float32([1.]), np.int32([1]),
                np.ones((1, 28, 28), np.float32))

    img = np.zeros((60, 80, 3), dtype=np.float32)
    full = ev.predict_image(img, model_func)[0]
    rle = ev.predict_image(img, model_func, mask_format='rle')[0]
    assert full.mask.shape == (60, 80) and full.mask[5:15, 5:25].all() and full.mask.sum() == 200
    np.testing.assert_array_equal(mask_util.decode(rle.mask), full.mask)
    assert ev.detection_to_dict(full, 7)['segmentation'] == rle.mask


# ------------------------------------------------------------------ a stand-in model
# tests/stand_in.py: StandInModel, make_image, RECTS; fixtures coco_split and stand_in_cfg
# (tests/conftest.py).


def test_evaluate_on_dataset_original_ids_and_perfect_ap(stand_in_cfg, coco_split, tmp_path):
    name, json_file = coco_split
    predictor = OfflinePredictor(PredictConfig(
        model=StandInModel(), input_names=['image'],
        output_names=ev.get_inference_output_names()))
    add_corrupt_image(tmp_path, json_file)  # skipped, not fatal

    out = str(tmp_path / 'results.json')
    metrics = ev.evaluate_on_dataset(name, predictor, out)
    assert metrics['mAP(bbox)/IoU=0.5:0.95'] == pytest.approx(1.0)
    assert metrics['mAP(segm)/IoU=0.5:0.95'] == pytest.approx(1.0)
    assert metrics['mAP(bbox)/class/red'] == pytest.approx(1.0)
    with open(out) as f:
        dets = json.load(f)
    assert {d['category_id'] for d in dets} == {3, 7} and len(dets) == 8
    coco_dt = COCO(json_file).loadRes(out)  # pycocotools accepts our json as is
    assert len(coco_dt.getAnnIds()) == 8


def test_eval_callback_writes_metrics_to_monitors(stand_in_cfg, coco_split, tmp_path):
    name, _ = coco_split
    logdir = str(tmp_path / 'log')
    logger.set_logger_dir(logdir, action='k')
    rs = np.random.RandomState(0)
    df = DataFromList([[make_image(rs)[0].astype(np.float32)] for _ in range(2)],
                      shuffle=False)
    with tf.Graph().as_default():
        launch_train_with_config(TrainConfig(
            model=StandInModel(), dataflow=df, steps_per_epoch=2, max_epoch=3,
            callbacks=[ev.EvalCallback(dataset_names=[name], eval_period=2)],
            monitors=None), SimpleTrainer())
    with open(os.path.join(logdir, 'stats.json')) as f:
        stats = json.load(f)
    key = name + '/mAP(bbox)/IoU=0.5:0.95'
    # Evaluated at epoch 2 (period) and 3 (the last), not at epoch 1.
    assert [s['epoch_num'] for s in stats if key in s] == [2, 3]
    assert all(s[key] == pytest.approx(1.0) for s in stats if key in s)
    assert sorted(f for f in os.listdir(logdir) if f.startswith('outputs')) == \
        ['outputs4-{}.json'.format(name), 'outputs6-{}.json'.format(name)]


# ------------------------------------------------------------------ viz
def test_to_display_bgr_handles_gray_rgba_and_rgb():
    gray = np.full((4, 5, 1), 300., dtype=np.float32)
    assert viz.to_display_bgr(gray).shape == (4, 5, 3) and viz.to_display_bgr(gray).max() == 255
    rgbd = np.zeros((4, 5, 4), dtype=np.float32)
    rgbd[..., 0] = 200  # red, in RGB order
    out = viz.to_display_bgr(rgbd, 'RGB')
    assert out.shape == (4, 5, 3) and (out[..., 2] == 200).all() and (out[..., 0] == 0).all()


def test_draw_predictions_blends_masks_and_panel_layout():
    img = np.zeros((60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[30:50, 40:70] = 1
    results = [ev.DetectionResult(np.float32([40, 30, 70, 50]), 0.9, 1, mask),
               ev.DetectionResult(np.float32([5, 5, 20, 20]), 0.9, 2,
                                  ev.encode_mask(np.pad(np.ones((15, 15), np.uint8),
                                                        ((5, 40), (5, 60))))),
               ev.DetectionResult(np.float32([0, 0, 10, 10]), 0.1, 1, None)]
    out = viz.draw_predictions(img, results, ['BG', 'a', 'b'], score_thresh=0.5)
    assert img.max() == 0  # the input is untouched
    assert out[40, 55].any() and out[12, 12].any()  # both masks (array and RLE) blended
    assert not out[55:, :30].any()  # nothing where nothing was predicted
    panel = viz.draw_final_outputs_panel(img, [[1, 1, 30, 30]], [1], None, results,
                                         ['BG', 'a', 'b'])
    assert panel.shape == (60, 3 * 80 + 8, 3)
    nothing = viz.draw_predictions(img, results, ['BG', 'a', 'b'], score_thresh=1.)
    np.testing.assert_array_equal(nothing, img)
