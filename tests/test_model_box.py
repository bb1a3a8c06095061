"""Box ops: TF encode/decode/IoU/RoIAlign against NumPy, the chunked matcher, anchors."""
import tracemalloc

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from config import config as cfg
from modeling import model_box
from utils import np_box_ops
from utils.anchors import cell_anchors, get_all_anchors, get_all_anchors_fpn


def _run(fn, *arrays):
    """Build ``fn`` on constants in a fresh graph and evaluate it."""
    with tf.Graph().as_default():
        out = fn(*[tf.constant(a) for a in arrays])
        with tf.Session() as sess:
            return sess.run(out)


def _random_boxes(rng, n, size=100., min_wh=1.):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_wh, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_encode_decode_round_trip():
    rng = np.random.RandomState(0)
    gt = _random_boxes(rng, 50)
    anchors = _random_boxes(rng, 50)
    for weights in [(1., 1., 1., 1.), (10., 10., 5., 5.)]:
        deltas, decoded = _run(lambda g, a: (
            model_box.encode_bbox_target(g, a, weights),
            model_box.decode_bbox_target(model_box.encode_bbox_target(g, a, weights), a,
                                         weights)), gt, anchors)
        np.testing.assert_allclose(decoded, gt, atol=1e-3)
    # weights scale the deltas: dx of a shifted box
    d = _run(lambda g, a: model_box.encode_bbox_target(g, a, (10., 10., 5., 5.)),
             np.array([[2., 0., 12., 20.]], np.float32), np.array([[0., 0., 10., 20.]], np.float32))
    np.testing.assert_allclose(d, [[2., 0., 0., 0.]], atol=1e-6)


@pytest.mark.parametrize('clip_size,max_size,width', [(0., 1344, 1344.), (1000., 1344, 1000.)])
def test_decode_clips_huge_deltas(monkeypatch, clip_size, max_size, width):
    """A 16-px anchor grows to at most FRCNN.DECODE_CLIP_SIZE px (0: PREPROC.MAX_SIZE, as
    tensorpack's log(MAX_SIZE / 16))."""
    monkeypatch.setattr(cfg.FRCNN, 'DECODE_CLIP_SIZE', clip_size, raising=False)
    monkeypatch.setattr(cfg.PREPROC, 'MAX_SIZE', max_size, raising=False)
    deltas = np.array([[0., 0., 100., 100.]], np.float32)
    anchors = np.array([[0., 0., 16., 16.]], np.float32)
    boxes = _run(model_box.decode_bbox_target, deltas, anchors)
    assert np.all(np.isfinite(boxes))
    np.testing.assert_allclose(boxes[0, 2] - boxes[0, 0], width, rtol=1e-4)


def test_clip_boxes():
    boxes = np.array([[-5., -3., 120., 40.], [10., 10., 20., 20.]], np.float32)
    out = _run(model_box.clip_boxes, boxes, np.array([50, 100], np.int32))
    np.testing.assert_allclose(out, [[0., 0., 100., 40.], [10., 10., 20., 20.]])


def test_tf_iou_matches_numpy():
    rng = np.random.RandomState(1)
    b1 = _random_boxes(rng, 30)
    b2 = np.concatenate([_random_boxes(rng, 20), np.zeros((1, 4), np.float32)])  # + empty box
    b1[0] = 0.  # empty vs empty: union 0 -> IoU 0
    iou_tf, area_tf = _run(lambda a, b: (model_box.pairwise_iou(a, b), model_box.area(a)), b1, b2)
    iou_np = np_box_ops.pairwise_iou(b1, b2)
    assert iou_tf.shape == (30, 21) and iou_np.dtype == np.float32
    np.testing.assert_allclose(iou_tf, iou_np, atol=1e-6)
    np.testing.assert_allclose(area_tf, np_box_ops.area(b1), rtol=1e-6)
    assert iou_np[0, -1] == 0. and np.all(np.isfinite(iou_np))


def test_numpy_iou_ioa_known_values():
    a = np.array([[0., 0., 10., 10.]], np.float32)
    b = np.array([[5., 0., 15., 10.], [0., 0., 5., 5.], [20., 20., 30., 30.]], np.float32)
    np.testing.assert_allclose(np_box_ops.area(b), [100., 25., 100.])
    np.testing.assert_allclose(np_box_ops.pairwise_iou(a, b), [[50. / 150., 0.25, 0.]])
    np.testing.assert_allclose(np_box_ops.pairwise_ioa(a, b), [[0.5, 1., 0.]])


def test_max_iou_over_gt_equals_dense():
    rng = np.random.RandomState(2)
    anchors = _random_boxes(rng, 2000)
    gt = _random_boxes(rng, 300)
    gt[7] = gt[3]  # duplicate: the argmax must pick the first, like dense argmax
    dense = np_box_ops.pairwise_iou(anchors, gt)
    for chunk in (1, 7, 64, 1000):
        amax, arg, gmax, best = np_box_ops.max_iou_over_gt(anchors, gt, chunk=chunk,
                                                           best_anchors=True)
        np.testing.assert_array_equal(amax, dense.max(axis=1))
        np.testing.assert_array_equal(arg, dense.argmax(axis=1))
        np.testing.assert_array_equal(gmax, dense.max(axis=0))
        np.testing.assert_array_equal(best, (dense == dense.max(axis=0)).any(axis=1))


def test_best_anchors_skip_unmatched_gt():
    anchors = np.array([[0., 0., 10., 10.], [100., 100., 110., 110.]], np.float32)
    gt = np.array([[500., 500., 510., 510.]], np.float32)  # overlaps nothing
    _, _, gmax, best = np_box_ops.max_iou_over_gt(anchors, gt, best_anchors=True)
    assert gmax[0] == 0.
    assert not best.any()


def test_max_iou_over_gt_memory_is_bounded():
    rng = np.random.RandomState(3)
    anchors = _random_boxes(rng, 20000, size=1000.)
    gt = _random_boxes(rng, 3000, size=1000.)
    dense_bytes = 20000 * 3000 * 4  # 240 MB for one float32 IoU matrix
    tracemalloc.start()
    try:
        amax, _, gmax = np_box_ops.max_iou_over_gt(anchors, gt, chunk=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2 ** 20 < dense_bytes, peak  # ~3 * 20000 * 32 * 4 B = 7.7 MB
    assert amax.shape == (20000,) and gmax.shape == (3000,) and amax.max() > 0.


# ------------------------------------------------------------------------ RoIAlign


def _bilinear_clamped(fmap, y, x):
    """Sample fmap [H, W, C] at continuous (y, x) (pixel i covers [i, i+1)), Detectron's
    rule: 0 beyond one pixel outside the centres, else clamp to the border, then bilinear."""
    h, w = fmap.shape[:2]
    u, v = y - 0.5, x - 0.5  # pixel-index coordinates: pixel i's centre is at i
    if u < -1 or u > h or v < -1 or v > w:
        return np.zeros(fmap.shape[2], np.float64)
    u = min(max(u, 0.), h - 1.)
    v = min(max(v, 0.), w - 1.)
    u0, v0 = int(np.floor(u)), int(np.floor(v))
    u1, v1 = min(u0 + 1, h - 1), min(v0 + 1, w - 1)
    fu, fv = u - u0, v - v0
    return ((1 - fu) * (1 - fv) * fmap[u0, v0] + (1 - fu) * fv * fmap[u0, v1] +
            fu * (1 - fv) * fmap[u1, v0] + fu * fv * fmap[u1, v1])


def _bilinear_zero_outside(fmap, y, x):
    """Sample fmap [H, W, C] at continuous (y, x): 0 unless both pixel-index coordinates
    lie within the pixel centres [0, H - 1] x [0, W - 1], else bilinear."""
    h, w = fmap.shape[:2]
    u, v = y - 0.5, x - 0.5
    if u < 0 or u > h - 1 or v < 0 or v > w - 1:
        return np.zeros(fmap.shape[2], np.float64)
    return _bilinear_clamped(fmap, y, x)  # no clamping happens inside the centres


def _roi_align_reference(fmap, boxes, res):
    """fmap [H, W, C], boxes [N, 4] -> [N, res, res, C], 2 x 2 samples per bin."""
    out = np.zeros((len(boxes), res, res, fmap.shape[2]), np.float64)
    for n, (x0, y0, x1, y1) in enumerate(boxes.astype(np.float64)):
        bin_h, bin_w = (y1 - y0) / res, (x1 - x0) / res
        for i in range(res):
            for j in range(res):
                samples = [_bilinear_clamped(fmap, y0 + (i + (k + 0.5) / 2) * bin_h,
                                             x0 + (j + (m + 0.5) / 2) * bin_w)
                           for k in range(2) for m in range(2)]
                out[n, i, j] = np.mean(samples, axis=0)
    return out


ROI_BOXES = np.array([
    [0., 0., 9., 7.],          # the whole map
    [2., 1., 6., 5.],          # integer box inside
    [1.3, 0.7, 4.9, 3.2],      # fractional inside
    [0.1, 0.2, 0.6, 0.5],      # tiny, in the outer half-pixel (clamped to the border)
    [-2.5, -1.7, 3.3, 2.9],    # crossing the top-left border (some samples are 0)
    [6.2, 4.4, 11.8, 9.1],     # crossing the bottom-right border
    [-6., -6., -2., -3.],      # entirely outside: all zeros
], np.float32)


@pytest.mark.parametrize('data_format', ['NHWC', 'NCHW'])
def test_roi_align_matches_reference(data_format):
    rng = np.random.RandomState(4)
    fmap = rng.uniform(-1, 1, (7, 9, 3)).astype(np.float32)  # H=7, W=9
    res = 4
    expected = _roi_align_reference(fmap, ROI_BOXES, res)
    feed = fmap[None] if data_format == 'NHWC' else fmap.transpose(2, 0, 1)[None]
    got = _run(lambda f, b: model_box.roi_align(f, b, res, data_format), feed, ROI_BOXES)
    if data_format == 'NCHW':
        assert got.shape == (len(ROI_BOXES), 3, res, res)
        got = got.transpose(0, 2, 3, 1)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.all(got[-1] == 0.) and np.any(got[4] != 0.)


def test_crop_and_resize_aligned_samples_bin_centres():
    rng = np.random.RandomState(5)
    images = rng.uniform(-1, 1, (2, 6, 8, 2)).astype(np.float32)
    size = 3
    indices = np.array([0, 1, 1, 0, 1, 0, 0], np.int32)
    got = _run(lambda im, b, i: model_box.crop_and_resize_aligned(im, b, i, size),
               images, ROI_BOXES, indices)
    assert got.shape == (len(ROI_BOXES), size, size, 2)
    for n, (x0, y0, x1, y1) in enumerate(ROI_BOXES.astype(np.float64)):
        for i in range(size):
            for j in range(size):
                expected = _bilinear_zero_outside(images[indices[n]],
                                                  y0 + (i + 0.5) * (y1 - y0) / size,
                                                  x0 + (j + 0.5) * (x1 - x0) / size)
                np.testing.assert_allclose(got[n, i, j], expected, atol=1e-5)
    assert np.all(got[3] == 0.)  # the tiny box lies in the outer half-pixel: outside


def test_roi_align_known_value():
    # fmap value = 6 * row + col: linear, so a bin's mean is the value at its centre
    fmap = np.arange(30, dtype=np.float32).reshape(1, 5, 6, 1)
    box = np.array([[1., 1., 5., 4.]], np.float32)  # centres of bins of a 2x2 grid
    got = _run(lambda f, b: model_box.roi_align(f, b, 2), fmap, box)[0, :, :, 0]
    # bin (0, 0) centre at continuous (y=1.75, x=2) -> index (1.25, 1.5)
    np.testing.assert_allclose(got, [[6 * 1.25 + 1.5, 6 * 1.25 + 3.5],
                                      [6 * 2.75 + 1.5, 6 * 2.75 + 3.5]], atol=1e-5)


# ------------------------------------------------------------------------ anchors


@pytest.mark.parametrize('offset', [0., 0.5])
def test_anchor_counts_and_centres(offset):
    sizes, ratios = (32., 64.), (0.5, 1., 2.)
    anchors = get_all_anchors(16, sizes, ratios, 100, offset)
    assert anchors.shape == (7, 7, 6, 4) and anchors.dtype == np.float32
    centres = (anchors[..., :2] + anchors[..., 2:]) / 2
    ys, xs = np.mgrid[0:7, 0:7]
    np.testing.assert_allclose(centres[..., 0], np.broadcast_to(((xs + offset) * 16)[..., None],
                                                                (7, 7, 6)), atol=1e-4)
    np.testing.assert_allclose(centres[..., 1], np.broadcast_to(((ys + offset) * 16)[..., None],
                                                                (7, 7, 6)), atol=1e-4)
    cell = cell_anchors(16, sizes, ratios, offset)
    wh = cell[:, 2:] - cell[:, :2]
    np.testing.assert_allclose(np.sqrt(wh[:, 0] * wh[:, 1]), [32.] * 3 + [64.] * 3, rtol=1e-5)
    np.testing.assert_allclose(wh[:, 1] / wh[:, 0], list(ratios) * 2, rtol=1e-5)


@pytest.mark.parametrize('offset', [0., 0.5])
def test_fpn_anchor_levels(offset):
    strides, sizes = (4, 8, 16, 32, 64), (32, 64, 128, 256, 512)
    levels = get_all_anchors_fpn(strides, sizes, (0.5, 1., 2.), 128, offset)
    assert [a.shape for a in levels] == [(f, f, 3, 4) for f in (32, 16, 8, 4, 2)]
    for stride, size, a in zip(strides, sizes, levels):
        f = a.shape[0]
        np.testing.assert_allclose((a[-1, 0, 1, :2] + a[-1, 0, 1, 2:]) / 2,
                                   [offset * stride, (f - 1 + offset) * stride], atol=1e-4)
        np.testing.assert_allclose(a[0, 0, 1, 2:] - a[0, 0, 1, :2], [size, size], rtol=1e-5)
