"""augment.py: each augmentor keeps image, boxes, masks and crowd flags aligned; the default
list reproduces the old resize + flip + crop datapoints; copy-paste; channels and 16 bits."""
import cv2
import numpy as np
import pytest

import augment
import common
import data
from augment import Sample, apply_augmentors
from tests.tiny import full_mask

H, W = 60, 80
# Instance k is painted with value 40 * (k + 1) in every channel; the last one is crowd.
POLYS = [np.float32([[6, 8], [30, 8], [18, 40]]),
         np.float32([[40, 10], [72, 10], [72, 30], [40, 30]]),
         np.float32([[10, 44], [70, 44], [70, 56], [10, 56]])]


def _scene(channels=3, as_masks=False):
    """A generated Sample whose instance pixels are known: value 40 * (k + 1)."""
    img = np.zeros((H, W, channels), np.float32)
    for k, p in enumerate(POLYS):
        img[full_mask([p], H, W).astype(bool)] = 40 * (k + 1)
    boxes = np.float32([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()]
                        for p in POLYS])
    s = Sample(img, boxes, np.array([False, False, True]), np.int64([1, 2, 1]),
               [[p] for p in POLYS])
    if as_masks:
        s.masks, s.segms = np.stack([full_mask([p], H, W) for p in POLYS]), None
    return s


def _instance_masks(s):
    """uint8 [N, H, W] of the sample (rasterised polygons, or its masks)."""
    if s.masks is not None:
        return s.masks
    return np.stack([full_mask(polys, *s.img.shape[:2]) for polys in s.segms])


GEOMETRIC = {
    'hflip': lambda: augment.HorizontalFlip(1.),
    'vflip': lambda: augment.VerticalFlip(1.),
    'rot90': lambda: augment.Rotate90(1.),
    'crop': lambda: augment.RandomCrop(32),
    'resize': lambda: augment.ResizeShortestEdge([90, 120], 200),
    'lsj': lambda: augment.LargeScaleJitter(64, 0.5, 2., pad_value=[0, 0, 0]),
}
EXACT = ('hflip', 'vflip', 'rot90', 'crop')  # no resampling: pixel-exact


@pytest.mark.parametrize('as_masks', [False, True])
@pytest.mark.parametrize('name', sorted(GEOMETRIC))
def test_geometric_augmentors_keep_everything_aligned(name, as_masks):
    for seed in range(4):
        s = apply_augmentors([GEOMETRIC[name]()], _scene(as_masks=as_masks),
                             np.random.default_rng(seed))
        assert s.is_crowd.tolist() == [False, False, True] and s.klass.tolist() == [1, 2, 1]
        masks, boxes = _instance_masks(s), common.clip_boxes(s.boxes, s.img.shape)
        assert masks.shape[1:] == s.img.shape[:2]
        for k, (m, box) in enumerate(zip(masks, boxes)):
            painted = s.img[:, :, 0] == 40 * (k + 1)
            if name in EXACT:
                assert (painted == m.astype(bool)).all(), (name, k)
            else:  # bilinear image vs exact polygon: the borders differ
                near = np.abs(s.img[:, :, 0] - 40 * (k + 1)) < 20
                assert (near & m.astype(bool)).sum() >= 0.8 * m.sum(), (name, k)
            if m.any():  # the box holds the mask tightly (up to rasterising a thin tip)
                ys, xs = np.nonzero(m)
                tight = np.float32([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                tol = 1.5 if name in EXACT else 2.5
                assert np.abs(box - tight).max() <= tol, (name, k, box, tight)


def _legacy(img, boxes, is_crowd, segms, c, rng):
    """The resize + flip + crop of data.py before PREPROC.AUGMENTATIONS existed."""
    pre = c.PREPROC
    short = int(rng.integers(pre.TRAIN_SHORT_EDGE_SIZE[0], pre.TRAIN_SHORT_EDGE_SIZE[1] + 1))
    img, (sy, sx) = common.resize_shortest_edge(img, short, pre.MAX_SIZE,
                                                uint8=pre.RESIZE_UINT8)
    boxes, segms = common.scale_boxes(boxes, sy, sx), common.scale_polygons(segms, sy, sx)
    if pre.HORIZONTAL_FLIP and rng.random() < 0.5:
        width = img.shape[1]
        img, boxes = common.flip_image(img), common.flip_boxes(boxes, width)
        segms = common.flip_polygons(segms, width)
    if pre.CROP_SIZE > 0:
        img, boxes, segms = common.random_crop(img, boxes, is_crowd, segms, pre.CROP_SIZE, rng)
    return img, boxes, segms


@pytest.mark.parametrize('keys', [[], ['PREPROC.CROP_SIZE=64'], ['PREPROC.HORIZONTAL_FLIP=False'],
                                  ['PREPROC.RESIZE_UINT8=True', 'PREPROC.CROP_SIZE=32']])
def test_default_list_reproduces_the_old_recipe(fresh_cfg, keys):
    fresh_cfg.update_args(['PREPROC.TRAIN_SHORT_EDGE_SIZE=[70,130]', 'PREPROC.MAX_SIZE=200']
                          + keys)
    augs = augment.build_augmentors(fresh_cfg)
    for seed in range(6):
        old_rng, new_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        s = _scene()
        img, boxes, segms = _legacy(s.img, s.boxes, s.is_crowd, s.segms, fresh_cfg, old_rng)
        s = apply_augmentors(augs, s, new_rng)
        assert np.array_equal(img, s.img) and np.array_equal(boxes, s.boxes)
        assert all(np.array_equal(a, b) for pa, pb in zip(segms, s.segms)
                   for a, b in zip(pa, pb))
        # The same draws were consumed: the RPN sampling that follows is unchanged too.
        assert old_rng.bit_generator.state == new_rng.bit_generator.state


def test_preprocessor_default_datapoints_are_unchanged(fresh_cfg, tmp_path):
    """The whole preprocessor with the default list against the old recipe + targets."""
    fresh_cfg.update_args(['PREPROC.TRAIN_SHORT_EDGE_SIZE=[70,130]', 'PREPROC.MAX_SIZE=200',
                           'MRCNN.GT_MASK_SIZE=28', 'PREPROC.CROP_SIZE=64'])
    path = str(tmp_path / 'scene.png')
    s = _scene()
    cv2.imwrite(path, s.img.astype(np.uint8))
    roidb = {'file_name': path, 'boxes': s.boxes, 'class': s.klass,
             'is_crowd': s.is_crowd.astype(np.int8), 'segmentation': s.segms}
    for seed in range(3):
        dp = data.TrainingDataPreprocessor(seed=seed)(roidb)
        rng = np.random.default_rng([seed])  # the preprocessor's stream in its own process
        img, boxes, segms = _legacy(common.read_image(path, 3, 'BGR'), s.boxes, s.is_crowd,
                                    s.segms, fresh_cfg, rng)
        boxes = common.clip_boxes(boxes, img.shape)
        keep = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        gt = [i for i in keep if not s.is_crowd[i]]
        assert np.array_equal(dp['image'], img) and np.array_equal(dp['gt_boxes'], boxes[gt])
        for k, i in enumerate(gt):
            assert np.array_equal(dp['gt_masks'][k],
                                  common.polygons_to_box_frame_mask(segms[i], boxes[i], 28))


def test_copy_paste_occludes_drops_and_recomputes_boxes():
    dst = _scene(as_masks=True)
    # The source covers instance 1 (rectangle) entirely and the left half of the crowd one.
    src_poly = np.float32([[38, 8], [74, 8], [74, 58], [38, 58]])
    src = Sample(np.full((H, W, 3), 7, np.float32), np.float32([[38, 8, 74, 58]]),
                 np.array([True]), np.int64([3]), [[src_poly]])
    out = augment.CopyPaste(1., 0.95).paste(dst, src)
    pasted = full_mask([src_poly], H, W).astype(bool)
    assert out.klass.tolist() == [1, 1, 3] and out.is_crowd.tolist() == [False, True, True]
    assert np.array_equal(out.masks[0], dst.masks[0])  # untouched triangle
    assert np.array_equal(out.masks[1], dst.masks[2] & ~pasted)
    assert np.array_equal(out.masks[2], pasted)
    assert np.array_equal(out.boxes, augment.masks_to_boxes(out.masks))
    assert out.boxes[1].tolist() == [10, 44, 38, 56]  # the crowd box lost its covered part
    assert (out.img[pasted] == 7).all() and (out.img[~pasted] == dst.img[~pasted]).all()


def test_copy_paste_in_the_pipeline_and_empty_samples(fresh_cfg):
    augs = [augment.LargeScaleJitter(64, 0.5, 1.5, [0, 0, 0]), augment.CopyPaste(1., 0.95),
            augment.HorizontalFlip(1.), augment.Rotate90(1.)]
    s = apply_augmentors(augs, _scene(), np.random.default_rng(0), lambda rng: _scene())
    assert s.img.shape[:2] == (64, 64) and s.masks.shape[1:] == (64, 64)
    assert np.array_equal(common.clip_boxes(s.boxes, s.img.shape),
                          augment.masks_to_boxes(s.masks))  # boxes follow masks
    empty = Sample(np.zeros((H, W, 3), np.float32), np.zeros((0, 4), np.float32),
                   np.zeros(0, bool), np.zeros(0, np.int64), [])
    fresh_cfg.set_value('PREPROC.TRAIN_SHORT_EDGE_SIZE', [50, 90])
    fresh_cfg.set_value('PREPROC.AUGMENTATIONS', [
        'ResizeShortestEdge', 'HorizontalFlip', 'VerticalFlip', 'Rotate90', 'ColorJitter',
        ['LargeScaleJitter', {'size': 64}], ['CopyPaste', {'prob': 1}],
        ['RandomCrop', {'size': 32}]])
    every = augment.build_augmentors(fresh_cfg)
    out = apply_augmentors(every, empty, np.random.default_rng(1), lambda rng: empty)
    assert out.boxes.shape == (0, 4) and out.img.shape == (32, 32, 3)
    assert out.masks.shape == (0, 32, 32)
    # A source without instances changes nothing of the destination's instances.
    out = augment.CopyPaste(1., 0.95).paste(_scene(), empty)
    assert np.array_equal(out.masks, _instance_masks(_scene()))


def test_colour_jitter_channels_order_and_range(tmp_path):
    path = str(tmp_path / 'deep.png')
    rgbd = np.random.default_rng(0).integers(0, 65536, (H, W, 4)).astype(np.uint16)
    cv2.imwrite(path, rgbd)
    for channels in (1, 3, 4):
        img = common.read_image(path, channels, 'BGR')  # 16 bits -> [0, 255] floats
        s = Sample(img, np.zeros((0, 4), np.float32), np.zeros(0, bool), np.zeros(0, np.int64))
        jit = augment.ColorJitter(0.4, 0.4, 0.4, 0.1, channels, 'BGR')
        out = jit(s, np.random.default_rng(3)).img
        assert out.shape == img.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 255
        assert not np.allclose(out[:, :, :1], img[:, :, :1])
        if channels == 4:
            assert np.array_equal(out[:, :, 3], img[:, :, 3])  # depth is not a colour
    # Same draws on the same picture in RGB order: the same picture, channels reversed.
    bgr = common.read_image(path, 3, 'BGR')
    outs = [augment.ColorJitter(0.4, 0.4, 0.4, 0.1, 3, order)(
        Sample(x, np.zeros((0, 4)), np.zeros(0, bool), np.zeros(0)), np.random.default_rng(5)).img
        for order, x in (('BGR', bgr), ('RGB', bgr[:, :, ::-1].copy()))]
    assert np.allclose(outs[0], outs[1][:, :, ::-1], atol=1e-2)


@pytest.mark.parametrize('channels', [1, 4])
def test_geometric_augmentors_on_1_and_4_channels(channels):
    s = _scene(channels=channels)
    s = apply_augmentors([augment.LargeScaleJitter(64, 0.5, 2., [0] * channels),
                          augment.Rotate90(1.), augment.VerticalFlip(1.)],
                         s, np.random.default_rng(2))
    assert s.img.shape == (64, 64, channels)
    assert all(np.array_equal(s.img[:, :, 0], s.img[:, :, c]) for c in range(channels))


def test_preprocessor_copy_paste_masks_follow_the_pixels(fresh_cfg, tmp_path):
    """Through data.py: pasted and occluded gt_masks cover the pixels of their instance."""
    fresh_cfg.update_args(['PREPROC.TRAIN_SHORT_EDGE_SIZE=[90,120]', 'PREPROC.MAX_SIZE=200',
                           'MRCNN.GT_MASK_SIZE=28', 'PREPROC.AUGMENTATIONS=["ResizeShortestEdge",'
                           ' ["CopyPaste", {"prob": 1}], "HorizontalFlip"]'])
    roidbs = _scene_roidbs(tmp_path)
    value = {1: 40, 2: 80, 3: 200}  # per class: a's triangle, a's rectangle, b's square
    pre = data.TrainingDataPreprocessor(seed=0, paste_pool=roidbs[1:])
    for _ in range(3):
        dp = pre(roidbs[0])
        assert 3 in dp['gt_labels'].tolist()
        img, m = dp['image'][:, :, 0], 28
        for box, label, mask in zip(dp['gt_boxes'], dp['gt_labels'], dp['gt_masks']):
            xs = (box[0] + (np.arange(m) + 0.5) * (box[2] - box[0]) / m).astype(int)
            ys = (box[1] + (np.arange(m) + 0.5) * (box[3] - box[1]) / m).astype(int)
            # Within half its value: a border pixel blended half-way by the resize counts.
            v = value[int(label)]
            near = np.abs(img[ys[:, None], xs[None, :]] - v) < v / 2
            assert (near == mask.astype(bool)).mean() > 0.9, label


def _scene_roidbs(folder):
    """`_scene` and `_pasted_scene` written as PNGs in ``folder``: their two roidbs."""
    roidbs = []
    for name, s in (('a', _scene()), ('b', _pasted_scene())):
        path = str(folder / (name + '.png'))
        cv2.imwrite(path, s.img.astype(np.uint8))
        roidbs.append({'file_name': path, 'boxes': s.boxes, 'class': s.klass,
                       'is_crowd': s.is_crowd.astype(np.int8), 'segmentation': s.segms})
    return roidbs


def _pasted_scene():
    """One square of class 3 (value 200) over part of `_scene`'s rectangle."""
    p = np.float32([[50, 4], [78, 4], [78, 28], [50, 28]])
    img = np.zeros((H, W, 3), np.float32)
    img[full_mask([p], H, W).astype(bool)] = 200
    return Sample(img, np.float32([[50, 4, 78, 28]]), np.array([False]), np.int64([3]), [[p]])


@pytest.mark.parametrize('workers', [0, 2])
def test_train_dataflow_pastes_from_the_training_images(fresh_cfg, tmp_path, workers):
    """get_train_dataflow hands copy-paste its roidbs: images gain the other's instances,
    in this process or in worker processes (which copy the pool when they fork); taking
    20 datapoints from the endless worker flow stops, and its workers go when it does."""
    import itertools
    import psutil
    from dataset import DatasetRegistry
    from tests.tiny import ListSplit
    from utils.graph_inputs import input_names
    roidbs = _scene_roidbs(tmp_path)
    DatasetRegistry.register('test_augment_paste', lambda: ListSplit(roidbs))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    fresh_cfg.update_args(['DATA.TRAIN=test_augment_paste', 'DATA.NUM_WORKERS={}'.format(workers),
                           'PREPROC.MAX_SIZE=200', 'MRCNN.GT_MASK_SIZE=28',
                           'PREPROC.AUGMENTATIONS=[["LargeScaleJitter", {"size": 128, '
                           '"min_scale": 0.8, "max_scale": 1.2}], ["CopyPaste", {"prob": 1}]]'])
    df = data.get_train_dataflow()
    df.reset_state()
    names = input_names(fresh_cfg.MODE_FPN, fresh_cfg.MODE_MASK, fresh_cfg.FPN.ANCHOR_STRIDES)
    labels = set()
    epochs = (dp for _ in itertools.count() for dp in df)  # endless: 2 images an epoch
    for dp in itertools.islice(epochs, 20):
        dp = dict(zip(names, dp))
        assert dp['image'].shape == (128, 128, 3)
        assert len(dp['gt_masks']) == len(dp['gt_boxes']) == len(dp['gt_labels'])
        labels.add(tuple(sorted(set(dp['gt_labels'].tolist()))))
    # The pool is both images (an image may paste itself, p = 1/2): some datapoint of the
    # 20 has a's instances (classes 1, 2) and b's (3) together.
    assert any(1 in ls and 3 in ls for ls in labels), labels
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert len(started) == workers
    epochs.close()
    del df, epochs
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, alive


def test_the_list_survives_a_run_config_yaml(fresh_cfg, tmp_path):
    """A run's config.yaml keeps the list, parameters included (predict.py, resuming)."""
    value = ['HorizontalFlip', ['LargeScaleJitter', {'size': 512, 'max_scale': 1.5}]]
    fresh_cfg.set_value('PREPROC.AUGMENTATIONS', value)
    path = str(tmp_path / 'config.yaml')
    fresh_cfg.save_yaml(path)
    fresh_cfg.set_value('PREPROC.AUGMENTATIONS', ['VerticalFlip'])
    fresh_cfg.load_yaml(path)
    assert fresh_cfg.PREPROC.AUGMENTATIONS == value
    lsj = augment.build_augmentors(fresh_cfg)[1]
    assert (lsj.size, lsj.min_scale, lsj.max_scale) == (512, 0.1, 1.5)
