"""data.py: anchor targets, the training preprocessor, dataflows."""
import logging
import math
import os
import pickle
import tracemalloc

import cv2
import numpy as np
import pytest

import common
import data
from config import config as cfg
from dataset import DatasetRegistry
from tests.tiny import ListSplit, full_mask
from utils.anchors import get_all_anchors, padded_size
from utils.graph_inputs import fpn_levels, input_names
from utils.np_box_ops import pairwise_iou

BALLOON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           '..', 'shared', 'data', 'balloon')


@pytest.fixture
def tiny_cfg(fresh_cfg):
    """Small images and masks (restored by ``fresh_cfg``)."""
    fresh_cfg.update_args(['PREPROC.TRAIN_SHORT_EDGE_SIZE=[96,128]', 'PREPROC.MAX_SIZE=200',
                           'PREPROC.IMAGE_CHANNELS=3', 'PREPROC.CHANNEL_ORDER=BGR',
                           'MRCNN.GT_MASK_SIZE=28', 'DATA.NUM_WORKERS=0',
                           'DATA.MAX_GT_INSTANCES=0'])
    return fresh_cfg


def _write_scene(path, h=100, w=140):
    """An image with a bright triangle and a bright rectangle on black; returns its roidb."""
    polys = [np.float32([[10, 12], [52, 12], [30, 62]]),
             np.float32([[70, 20], [124, 20], [124, 88], [70, 88]])]
    img = np.zeros((h, w, 3), np.uint8)
    for p in polys:
        img[full_mask([p], h, w).astype(bool)] = 255
    cv2.imwrite(path, img)
    boxes = np.float32([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()]
                        for p in polys])
    return {'file_name': path, 'image_id': os.path.basename(path), 'height': h, 'width': w,
            'boxes': boxes, 'class': np.int32([1, 2]), 'is_crowd': np.int8([0, 0]),
            'segmentation': [[p] for p in polys]}


def _register(name, roidbs):
    DatasetRegistry.register(name, lambda: ListSplit(roidbs))
    return name


# ---------------------------------------------------------------------------- anchor labels

def _dense_reference(anchors, gt, pos, neg):
    iou = pairwise_iou(anchors, gt)
    max_iou, argmax, gt_max = iou.max(1), iou.argmax(1), iou.max(0)
    labels = np.full(len(anchors), -1, np.int32)
    labels[max_iou < neg] = 0
    labels[((iou == gt_max[None]) & (gt_max[None] > 0)).any(1)] = 1
    labels[max_iou >= pos] = 1
    matched = np.where((labels == 1)[:, None], gt[argmax], 0).astype(np.float32)
    return labels, matched


def test_anchor_labels_equal_dense_reference(tiny_cfg, monkeypatch):
    cfg.RPN.BATCH_PER_IM = 10 ** 6  # no subsampling: compare every label
    monkeypatch.setattr(data, '_IOU_CHUNK_PAIRS', 5000)  # many chunks over gt
    rs = np.random.RandomState(1)
    anchors = get_all_anchors(16, (24, 48), (0.5, 1, 2), 160, 0.5)[:8, :10].reshape(-1, 4)
    _, anchors = common.filter_boxes_inside_shape(anchors, (128, 160))
    xy = rs.uniform(0, 120, (40, 2))
    gt = np.concatenate([xy, xy + rs.uniform(6, 60, (40, 2))], 1).astype(np.float32)
    gt = np.concatenate([gt, gt[:1]])  # a duplicate gt: ties across gt too
    labels, matched = data.get_anchor_labels(anchors, gt, np.zeros((0, 4)))
    ref_labels, ref_matched = _dense_reference(anchors, gt, cfg.RPN.POSITIVE_ANCHOR_THRESH,
                                               cfg.RPN.NEGATIVE_ANCHOR_THRESH)
    assert labels.dtype == np.int32 and matched.dtype == np.float32
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(matched, ref_matched)
    assert (labels == 1).sum() >= 20


def test_anchor_labels_ties_zero_overlap_crowd_and_subsampling(tiny_cfg):
    anchors = np.float32([[0, 0, 10, 10], [10, 0, 20, 10], [50, 50, 60, 60], [80, 80, 90, 90]])
    gt = np.float32([[5, 0, 15, 10], [200, 200, 210, 210]])  # 2nd overlaps no anchor
    labels, matched = data.get_anchor_labels(anchors, gt, np.zeros((0, 4)))
    # Both tied best anchors (IoU 1/3, between the thresholds) are foreground.
    np.testing.assert_array_equal(labels, [1, 1, 0, 0])
    np.testing.assert_array_equal(matched[:2], gt[[0, 0]])
    cfg.RPN.CROWD_OVERLAP_THRESH = 0.7
    labels, _ = data.get_anchor_labels(anchors, gt, np.float32([[48, 48, 62, 62]]))
    np.testing.assert_array_equal(labels, [1, 1, -1, 0])

    cfg.RPN.BATCH_PER_IM, cfg.RPN.FG_RATIO = 16, 0.25
    rs = np.random.RandomState(2)
    xy = rs.uniform(0, 900, (2000, 2))
    many = np.concatenate([xy, xy + 64], 1).astype(np.float32)
    labels, _ = data.get_anchor_labels(many, many[::3] + 1, np.zeros((0, 4)),
                                       np.random.default_rng(0))
    assert (labels == 1).sum() == 4 and (labels == 0).sum() == 12


def test_anchor_input_shapes(tiny_cfg):
    boxes = np.float32([[10, 10, 60, 50], [5, 5, 30, 30]])
    crowd = np.int8([0, 1])
    for shape in [(100, 140), (128, 200), (97, 33)]:
        levels = data.get_multilevel_rpn_anchor_input(shape, boxes, crowd)
        assert len(levels) == len(cfg.FPN.ANCHOR_STRIDES)
        for stride, (labels, aboxes) in zip(cfg.FPN.ANCHOR_STRIDES, levels):
            h, w = (math.ceil(padded_size(s, 32) / stride) for s in shape)
            assert labels.shape == (h, w, len(cfg.RPN.ANCHOR_RATIOS)) and labels.dtype == np.int32
            assert aboxes.shape == (h, w, len(cfg.RPN.ANCHOR_RATIOS), 4)
        labels, aboxes = data.get_rpn_anchor_input(shape, boxes, crowd)
        h, w = (s // 16 for s in shape)  # C4 input not padded: floor(H / 16) cells
        num = len(cfg.RPN.ANCHOR_SIZES) * len(cfg.RPN.ANCHOR_RATIOS)
        assert labels.shape == (h, w, num) and aboxes.shape == (h, w, num, 4)
        # the old layout: padded to 16 (ceil), anchors at cell centres
        cfg.BACKBONE.C4_PAD_INPUT, cfg.RPN.ANCHOR_OFFSET = True, 0.5
        padded_labels, _ = data.get_rpn_anchor_input(shape, boxes, crowd)
        cfg.BACKBONE.C4_PAD_INPUT, cfg.RPN.ANCHOR_OFFSET = False, 0.
        assert padded_labels.shape[:2] == tuple(math.ceil(padded_size(s, 16) / 16)
                                                for s in shape)
        if min(shape) < 64:  # few C4 anchors fit inside such a narrow image: the rest are -1
            assert (labels == -1).mean() > 0.9 and (padded_labels == -1).all()
            continue
        assert (labels == 1).any()
        fg_boxes = aboxes[labels == 1]
        np.testing.assert_array_equal(fg_boxes, np.broadcast_to(boxes[0], fg_boxes.shape))


def test_anchor_labels_memory_bounded_with_3000_gt(tiny_cfg):
    cfg.PREPROC.MAX_SIZE = 1333
    shape = (800, 1333)
    rs = np.random.RandomState(0)
    xy = rs.uniform(0, [1300, 770], (3000, 2))
    boxes = np.concatenate([xy, xy + rs.uniform(8, 30, (3000, 2))], 1).astype(np.float32)
    num_anchors = sum(math.ceil(800 / s) * math.ceil(1344 / s) * 3 for s in (4, 8, 16, 32, 64))
    bound = 600 * 2 ** 20
    assert num_anchors * len(boxes) * 4 > 4 * bound  # the dense IoU matrix would not fit
    tracemalloc.start()
    try:
        levels = data.get_multilevel_rpn_anchor_input(shape, boxes, np.zeros(3000, np.int8))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bound, peak / 2 ** 20
    labels = np.concatenate([lab.reshape(-1) for lab, _ in levels])
    assert (labels == 1).sum() == cfg.RPN.BATCH_PER_IM * cfg.RPN.FG_RATIO
    assert (labels >= 0).sum() == cfg.RPN.BATCH_PER_IM


# ---------------------------------------------------------------------------- preprocessor

def _check_datapoint(dp, mode_fpn, mode_mask, num_gt):
    img = dp['image']
    assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
    assert 96 <= min(img.shape[:2]) <= 128 and max(img.shape[:2]) <= 200
    names = input_names(mode_fpn, mode_mask)
    assert sorted(dp) == sorted(names)
    anchor_keys = [n for n in names if n.startswith('anchor_labels')]
    strides = cfg.FPN.ANCHOR_STRIDES if mode_fpn else [cfg.RPN.ANCHOR_STRIDE]
    for key, stride in zip(anchor_keys, strides):
        # FPN: padded to 32, ceil; C4: not padded (BACKBONE.C4_PAD_INPUT=False), floor
        h, w = (math.ceil(padded_size(s, 32) / stride) if mode_fpn else s // stride
                for s in img.shape[:2])
        labels, boxes = dp[key], dp[key.replace('labels', 'boxes')]
        assert labels.dtype == np.int32 and labels.shape[:2] == (h, w)
        assert boxes.dtype == np.float32 and boxes.shape == labels.shape + (4,)
    assert dp['gt_boxes'].dtype == np.float32 and dp['gt_boxes'].shape == (num_gt, 4)
    assert dp['gt_labels'].dtype == np.int64 and dp['gt_labels'].shape == (num_gt,)
    assert (dp['gt_boxes'][:, 2:] <= [img.shape[1], img.shape[0]]).all()
    if mode_mask:
        m = cfg.MRCNN.GT_MASK_SIZE
        assert dp['gt_masks'].dtype == np.uint8 and dp['gt_masks'].shape == (num_gt, m, m)


@pytest.mark.parametrize('mode_fpn', [True, False])
@pytest.mark.parametrize('mode_mask', [True, False])
def test_preprocessor_outputs(tiny_cfg, tmp_path, mode_fpn, mode_mask):
    cfg.MODE_FPN, cfg.MODE_MASK = mode_fpn, mode_mask
    roidb = _write_scene(str(tmp_path / 'scene.png'))
    dp = data.TrainingDataPreprocessor(seed=0)(roidb)
    _check_datapoint(dp, mode_fpn, mode_mask, 2)


def test_masks_follow_image_through_resize_and_flip(tiny_cfg, tmp_path):
    """gt_masks sampled back into the image land on the bright object pixels, flipped or not."""
    cfg.MODE_MASK = True
    roidb = _write_scene(str(tmp_path / 'scene.png'))
    pre = data.TrainingDataPreprocessor(seed=3)
    flips = set()
    for _ in range(8):
        dp = pre(roidb)
        img, m = dp['image'][:, :, 0], cfg.MRCNN.GT_MASK_SIZE
        flips.add(bool(dp['gt_boxes'][0, 0] > img.shape[1] / 2))  # the triangle is left
        for box, mask in zip(dp['gt_boxes'], dp['gt_masks']):
            xs = (box[0] + (np.arange(m) + 0.5) * (box[2] - box[0]) / m).astype(int)
            ys = (box[1] + (np.arange(m) + 0.5) * (box[3] - box[1]) / m).astype(int)
            bright = img[ys[:, None], xs[None, :]] > 127
            assert (bright == mask.astype(bool)).mean() > 0.93
    assert flips == {True, False}


def test_preprocessor_crowd_max_instances_and_readonly_input(tiny_cfg, tmp_path):
    from tensorpack.utils.serialize import MsgpackSerializer
    roidb = _write_scene(str(tmp_path / 'scene.png'))
    roidb['is_crowd'] = np.int8([1, 0])
    roidb['segmentation'][0] = {'size': [100, 140], 'counts': b'xyz'}  # crowd RLE: ignored
    # What a worker receives through msgpack: read-only arrays.
    roidb = MsgpackSerializer.loads(MsgpackSerializer.dumps(roidb))
    dp = data.TrainingDataPreprocessor(seed=0)(roidb)
    _check_datapoint(dp, True, True, 1)
    assert dp['gt_labels'].tolist() == [2]

    roidb['is_crowd'] = np.int8([0, 0])
    roidb['segmentation'][0] = [np.float32([[10, 12], [52, 12], [30, 62]])]
    cfg.DATA.MAX_GT_INSTANCES = 1
    dp = data.TrainingDataPreprocessor(seed=0)(roidb)
    _check_datapoint(dp, True, True, 1)


def test_preprocessor_pickles_with_its_config(tiny_cfg, tmp_path):
    cfg.MRCNN.GT_MASK_SIZE = 14
    blob = pickle.dumps(data.TrainingDataPreprocessor(seed=0))
    cfg.MRCNN.GT_MASK_SIZE = 56  # like a spawned worker's default config
    pre = pickle.loads(blob)
    assert cfg.MRCNN.GT_MASK_SIZE == 56  # the worker side never writes the global config
    dp = pre(_write_scene(str(tmp_path / 'scene.png')))
    assert dp['gt_masks'].shape == (2, 14, 14)
    assert cfg.MRCNN.GT_MASK_SIZE == 56


# ---------------------------------------------------------------------------- dataflows

def _collect(df, n=None):
    df.reset_state()
    out = []
    for dp in df:
        out.append(dp)
        if n is not None and len(out) >= n:
            break
    return out


def test_train_dataflow_skips_bad_images_and_filters_empty(tiny_cfg, tmp_path, caplog):
    good = [_write_scene(str(tmp_path / 'good{}.png'.format(i))) for i in range(2)]
    missing = dict(good[0], file_name=str(tmp_path / 'missing.png'))
    (tmp_path / 'corrupt.png').write_bytes(b'garbage')
    corrupt = dict(good[0], file_name=str(tmp_path / 'corrupt.png'))
    empty = dict(good[0], boxes=np.zeros((0, 4), np.float32), **{
        'class': np.zeros(0, np.int32), 'is_crowd': np.zeros(0, np.int8), 'segmentation': []})
    cfg.DATA.TRAIN = (_register('test_data_bad', good[:1] + [missing, corrupt, empty] +
                                good[1:]),)
    with caplog.at_level(logging.INFO, logger='data'):
        dps = _collect(data.get_train_dataflow())
    assert len(dps) == 2
    names = input_names(cfg.MODE_FPN, cfg.MODE_MASK, cfg.FPN.ANCHOR_STRIDES)
    for dp in dps:
        assert isinstance(dp, list) and len(dp) == len(names)
        _check_datapoint(dict(zip(names, dp)), cfg.MODE_FPN, cfg.MODE_MASK, 2)
    assert 'Filtered 1 images with no annotations out of 5' in caplog.text
    assert 'missing.png' in caplog.text and 'corrupt.png' in caplog.text

    from dataset import DatasetError
    cfg.DATA.TRAIN = (_register('test_data_all_empty', [empty, empty]),)
    with pytest.raises(DatasetError, match='No training images left'):
        data.get_train_dataflow()


def test_train_dataflow_shards_are_disjoint(tiny_cfg, tmp_path):
    # Fixed short edge 100, distinct widths: an image's width identifies it.
    roidbs = [_write_scene(str(tmp_path / 'img{}.png'.format(i)), w=140 + 10 * i)
              for i in range(5)]
    cfg.DATA.TRAIN = (_register('test_data_shards', roidbs),)
    cfg.PREPROC.TRAIN_SHORT_EDGE_SIZE = [100, 100]
    cfg.MODE_MASK = False
    shards = [sorted(dp[0].shape[1] for dp in _collect(data.get_train_dataflow(shard=(r, 2))))
              for r in range(2)]
    assert sorted(len(s) for s in shards) == [2, 3]
    assert sorted(shards[0] + shards[1]) == [140, 150, 160, 170, 180]


def test_train_dataflow_multiprocess(tiny_cfg, tmp_path):
    roidbs = [_write_scene(str(tmp_path / 'img{}.png'.format(i))) for i in range(3)]
    cfg.DATA.TRAIN = (_register('test_data_mp', roidbs),)
    cfg.DATA.NUM_WORKERS = 2
    df = data.get_train_dataflow()
    try:
        dps = _collect(df, 4)
    finally:
        df.ds.__del__()  # stop the worker processes now
    names = input_names(cfg.MODE_FPN, cfg.MODE_MASK, cfg.FPN.ANCHOR_STRIDES)
    assert len(dps) == 4
    for dp in dps:
        _check_datapoint(dict(zip(names, dp)), cfg.MODE_FPN, cfg.MODE_MASK, 2)


# ---------------------------------------------------------------------------- real data

def test_shapes_images(tiny_cfg, tmp_path):
    from dataset.shapes import ShapesDataset
    name = 'test_data_shapes_train'  # the first images of shapes_train, cached in tmp_path
    DatasetRegistry.register(name, lambda: ShapesDataset('train', 3, 0, cache_root=str(tmp_path)))
    cfg.DATA.TRAIN = (name,)
    roidbs = DatasetRegistry.get(name).training_roidbs()
    dps = _collect(data.get_train_dataflow())
    assert len(dps) == 3
    names = input_names(cfg.MODE_FPN, cfg.MODE_MASK, cfg.FPN.ANCHOR_STRIDES)
    for dp in dps:
        dp = dict(zip(names, dp))
        assert dp['gt_masks'].any(axis=(1, 2)).all()  # every visible shape has mask pixels
        assert len(dp['gt_boxes']) in [len(r['boxes']) for r in roidbs]


def test_balloon_images(tiny_cfg):
    if not os.path.isdir(BALLOON_DIR):
        pytest.skip('balloon data not found at {} (only in the shared workspace)'.format(
            BALLOON_DIR))
    from dataset import register_balloon
    register_balloon(BALLOON_DIR)
    cfg.DATA.TRAIN = ('balloon_train',)
    df = data.get_train_dataflow()
    names = input_names(cfg.MODE_FPN, cfg.MODE_MASK, cfg.FPN.ANCHOR_STRIDES)
    for dp in _collect(df, 2):
        dp = dict(zip(names, dp))
        _check_datapoint(dp, True, True, len(dp['gt_boxes']))
        assert len(dp['gt_boxes']) >= 1 and dp['gt_masks'].mean() > 0.3  # balloons fill boxes



def test_crowd_anchors_ignored_only_when_the_option_is_on(tiny_cfg, tmp_path):
    """RPN.CROWD_OVERLAP_THRESH <= 1: anchors over a crowd region are neither positive nor
    negative (-1); off (> 1, the default): the same anchors are background (0)."""
    roidb = _write_scene(str(tmp_path / 'scene.png'))
    roidb['is_crowd'] = np.int8([1, 0])  # the triangle is a crowd region
    cfg.PREPROC.HORIZONTAL_FLIP = False
    cfg.RPN.BATCH_PER_IM = 10 ** 6  # no subsampling: every label is the matching's

    def labels(thresh):
        cfg.RPN.CROWD_OVERLAP_THRESH = thresh
        dp = data.TrainingDataPreprocessor(seed=0)(roidb)
        return np.concatenate([dp['anchor_labels_lvl{}'.format(lv)].ravel()
                               for lv in fpn_levels(cfg.FPN.ANCHOR_STRIDES)])
    on, off = labels(0.7), labels(9.99)
    ignored = (on == -1) & (off != -1)
    assert ignored.sum() >= 10
    assert (off[ignored] == 0).all()  # background without the option
    np.testing.assert_array_equal(on[~ignored], off[~ignored])  # nothing else changes
    roidb['is_crowd'] = np.int8([0, 0])
    assert ((labels(0.7) == -1) == (labels(9.99) == -1)).all()  # no crowd: no effect
