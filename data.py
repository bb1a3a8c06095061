"""Training and evaluation dataflows: roidbs -> augmented images, RPN and mask targets.

Everything per image is NumPy (`TrainingDataPreprocessor`), run in worker processes.
TensorFlow / tensorpack are imported only inside the two dataflow factories, so the
preprocessor stays light in the workers.

Coordinates are x1y1x2y2 in pixels of the resized image fed to the graph, floating-point
convention (pixel i covers [i, i+1)). Output names, dtypes and shapes follow NOTES.md
("Graph inputs"); `utils.graph_inputs.input_names` gives their order in each datapoint.

The functions below take the config tree ``c`` they read (default: the global one); the
preprocessor passes its own copy, so data workers never read or write the global config.
"""
import copy
import itertools
import logging
import math
import os

import numpy as np

from augment import Sample, apply_augmentors, build_augmentors, full_mask_to_box_frame
from common import (ImageReadError, clip_boxes, filter_boxes_inside_shape,
                    polygons_to_box_frame_mask, read_image)
from config import config as cfg
from data_batch import AspectRatioGroups, pad_batch
from dataset import DatasetError, DatasetRegistry
from utils.anchors import get_all_anchors, get_all_anchors_fpn, padded_size
from utils.forked import release_freed_memory, run_in_forked_process
from utils.graph_inputs import fpn_levels, image_pad_multiple, input_names
from utils.np_box_ops import max_coverage, max_iou_over_gt
from utils.serialized_list import SerializedList

logger = logging.getLogger(__name__)

__all__ = ['get_anchor_labels', 'get_rpn_anchor_input', 'get_multilevel_rpn_anchor_input',
           'TrainingDataPreprocessor', 'get_train_dataflow']

# Anchor x ground-truth pairs per IoU block: ~16 MB per float32 temporary, whatever G.
_IOU_CHUNK_PAIRS = 1 << 22
# Preprocessed images buffered per worker: dense scenes carry N x M^2 mask bytes each.
_BUFFER_PER_WORKER = 4


def get_anchor_labels(anchors, gt_boxes, crowd_boxes, rng=None, c=None):
    """RPN targets of the anchors that lie inside the image.

    Foreground: IoU >= RPN.POSITIVE_ANCHOR_THRESH with some gt, or the best anchor(s) of
    some gt (ties included; a gt that overlaps no anchor forces none). Background: IoU
    < RPN.NEGATIVE_ANCHOR_THRESH with every gt. Anchors covered by a crowd box by more than
    RPN.CROWD_OVERLAP_THRESH of their area are ignored. Then at most RPN.BATCH_PER_IM
    labels stay, a fraction RPN.FG_RATIO of them foreground; the rest become -1.
    Anchor x gt IoUs are computed only for pairs that can overlap, in bounded blocks
    (`utils.np_box_ops`): time grows with the overlapping pairs and memory stays bounded.

    Args:
        anchors: float32 [A, 4]; gt_boxes: float32 [G, 4] (non-crowd);
        crowd_boxes: float32 [Gc, 4]; rng: np.random.Generator for the subsampling;
        c: the config tree (default the global one).
    Returns:
        labels: int32 [A], 1 foreground, 0 background, -1 ignored.
        boxes: float32 [A, 4], the gt matched to each foreground anchor (best IoU), 0 elsewhere.
    """
    rng = np.random.default_rng() if rng is None else rng
    rpn = (cfg if c is None else c).RPN
    anchors = np.asarray(anchors, dtype=np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    crowd_boxes = np.asarray(crowd_boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.zeros(len(anchors), dtype=np.int32)  # without gt, everything is background
    matched = np.zeros((len(anchors), 4), dtype=np.float32)
    if len(anchors) == 0:
        return labels, matched
    argmax = None
    if len(gt_boxes):
        max_iou, argmax, _, forced = max_iou_over_gt(
            anchors, gt_boxes, max_pairs=_IOU_CHUNK_PAIRS, best_anchors=True)
        labels[max_iou >= rpn.NEGATIVE_ANCHOR_THRESH] = -1
        labels[max_iou >= rpn.POSITIVE_ANCHOR_THRESH] = 1
        labels[forced] = 1
    if len(crowd_boxes):
        cand = np.flatnonzero(labels >= 0)
        covered = max_coverage(anchors[cand], crowd_boxes, max_pairs=_IOU_CHUNK_PAIRS)
        labels[cand[covered > rpn.CROWD_OVERLAP_THRESH]] = -1

    fg = np.flatnonzero(labels == 1)
    max_fg = int(rpn.BATCH_PER_IM * rpn.FG_RATIO)
    if len(fg) > max_fg:
        labels[rng.choice(fg, len(fg) - max_fg, replace=False)] = -1
    bg = np.flatnonzero(labels == 0)
    max_bg = rpn.BATCH_PER_IM - np.count_nonzero(labels == 1)
    if len(bg) > max_bg:
        labels[rng.choice(bg, len(bg) - max_bg, replace=False)] = -1
    if argmax is not None:
        fg = labels == 1
        matched[fg] = gt_boxes[argmax[fg]]
    return labels, matched


def _anchor_field_size(image_shape, mult, c):
    """The side the cached anchor grids cover: padded MAX_SIZE / CROP_SIZE (or the image)."""
    side = max(c.PREPROC.MAX_SIZE, c.PREPROC.CROP_SIZE, *image_shape[:2])
    return padded_size(side, mult)


def _anchor_targets(image_shape, boxes, is_crowd, grids, rng, c):
    """Label the anchors of several grids jointly.

    Args:
        grids: list of float32 [h_l, w_l, A, 4] anchors. boxes: [N, 4]; is_crowd: [N].
    Returns:
        list of (int32 [h_l, w_l, A] labels, float32 [h_l, w_l, A, 4] matched gt boxes).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    is_crowd = np.asarray(is_crowd).reshape(-1).astype(bool)
    flat = np.concatenate([g.reshape(-1, 4) for g in grids])
    # Anchors crossing the (unpadded) image border are never trained on.
    inside, inside_anchors = filter_boxes_inside_shape(flat, image_shape)
    labels_in, boxes_in = get_anchor_labels(inside_anchors, boxes[~is_crowd], boxes[is_crowd],
                                            rng, c)
    labels = np.full(len(flat), -1, dtype=np.int32)
    labels[inside] = labels_in
    matched = np.zeros((len(flat), 4), dtype=np.float32)
    matched[inside] = boxes_in
    out, start = [], 0
    for g in grids:
        end = start + g.shape[0] * g.shape[1] * g.shape[2]
        out.append((labels[start:end].reshape(g.shape[:3]), matched[start:end].reshape(g.shape)))
        start = end
    return out


def _feature_shape(image_shape, mult, stride):
    """(h, w) = ceil(padded / stride) of a feature map of ``stride`` (NOTES.md); floor(H /
    stride) for an unpadded C4 input (mult 1), whose stride-2 layers drop an odd last row."""
    if mult == 1:
        return tuple(int(s) // stride for s in image_shape[:2])
    return tuple(int(math.ceil(padded_size(s, mult) / stride)) for s in image_shape[:2])


def get_rpn_anchor_input(image_shape, boxes, is_crowd, rng=None, c=None):
    """C4 RPN targets.

    Args:
        image_shape: (H, W, ...) of the resized, unpadded image.
        boxes: float32 [N, 4] all instances; is_crowd: [N] 0/1.
        rng: np.random.Generator; c: the config tree (default the global one).
    Returns:
        anchor_labels int32 [h, w, A], anchor_boxes float32 [h, w, A, 4], with
        h = ceil(Hp / RPN.ANCHOR_STRIDE), Hp = padded_size(H, 16), A = sizes x ratios.
    """
    c = cfg if c is None else c
    mult, stride = image_pad_multiple(False, c.BACKBONE.C4_PAD_INPUT), c.RPN.ANCHOR_STRIDE
    grid = get_all_anchors(stride, c.RPN.ANCHOR_SIZES, c.RPN.ANCHOR_RATIOS,
                           _anchor_field_size(image_shape, mult, c), c.RPN.ANCHOR_OFFSET)
    h, w = _feature_shape(image_shape, mult, stride)
    return _anchor_targets(image_shape, boxes, is_crowd, [grid[:h, :w]], rng, c)[0]


def get_multilevel_rpn_anchor_input(image_shape, boxes, is_crowd, rng=None, c=None):
    """FPN RPN targets, all levels labelled jointly (one foreground/background budget).

    Args: as `get_rpn_anchor_input`.
    Returns:
        list over cfg.FPN.ANCHOR_STRIDES of (anchor_labels int32 [h_l, w_l, A],
        anchor_boxes float32 [h_l, w_l, A, 4]), h_l = ceil(Hp / stride_l),
        Hp = padded_size(H, 32), A = len(RPN.ANCHOR_RATIOS).
    """
    c = cfg if c is None else c
    mult = image_pad_multiple(True, c.BACKBONE.C4_PAD_INPUT)
    grids = get_all_anchors_fpn(c.FPN.ANCHOR_STRIDES, c.RPN.ANCHOR_SIZES,
                                c.RPN.ANCHOR_RATIOS, _anchor_field_size(image_shape, mult, c),
                                c.RPN.ANCHOR_OFFSET)
    sliced = []
    for stride, grid in zip(c.FPN.ANCHOR_STRIDES, grids):
        h, w = _feature_shape(image_shape, mult, stride)
        sliced.append(grid[:h, :w])
    return _anchor_targets(image_shape, boxes, is_crowd, sliced, rng, c)


def _parse_annotations(roidb):
    """boxes float32 [N, 4], classes int64 [N], is_crowd bool [N] of a roidb (new arrays)."""
    boxes = np.array(roidb['boxes'], dtype=np.float32).reshape(-1, 4)
    klass = np.array(roidb['class'], dtype=np.int64).reshape(-1)
    is_crowd = np.asarray(roidb.get('is_crowd', np.zeros(len(boxes)))).reshape(-1).astype(bool)
    return boxes, klass, is_crowd


def _instance_polygons(roidb, num):
    """Per instance a list of [K, 2] polygons; crowd RLEs and missing masks give []."""
    segms = roidb.get('segmentation')
    if segms is None:
        return [[] for _ in range(num)]
    return [[] if isinstance(s, dict) else list(s) for s in segms]


class TrainingDataPreprocessor:
    """roidb -> dict of the graph's training inputs (NOTES.md), or None to skip the image.

    Picklable. It reads only its own copy of the config, taken at construction, so a
    worker started with 'spawn' (fresh default config) behaves the same and no worker ever
    touches the global config. Each process draws its own random stream (forked workers
    must not repeat each other).
    """

    def __init__(self, seed=None, config=None, paste_pool=None):
        """seed (int or None): augmentation seed; None draws one from the OS.
        config: the (finalised) config tree to follow; default a copy of the global one.
        paste_pool: roidbs that copy-paste (PREPROC.AUGMENTATIONS) takes instances from;
        None: copy-paste is skipped."""
        self.cfg = copy.deepcopy(cfg if config is None else config)
        self._augs = build_augmentors(self.cfg)
        self._pool = paste_pool
        self._seed = seed
        self._owner_pid = os.getpid()
        self._rng, self._rng_pid = None, None
        self._num_no_gt = 0
        self._warned_no_masks = False

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_rng'], state['_rng_pid'] = None, None
        return state

    def _get_rng(self):
        pid = os.getpid()
        if self._rng_pid != pid:
            entropy = None
            if self._seed is not None:
                entropy = [self._seed] if pid == self._owner_pid else [self._seed, pid]
            self._rng, self._rng_pid = np.random.default_rng(entropy), pid
        return self._rng

    def __call__(self, roidb):
        try:
            return self._process(roidb)
        except ImageReadError as e:
            logger.warning('Skipping training image: %s', e)
        except Exception:  # a bad annotation must not kill a long run; say which image
            logger.exception('Skipping training image "%s": preprocessing failed.',
                             roidb.get('file_name'))
        return None

    def _read_sample(self, roidb):
        """The roidb's image and instances, not augmented (an augment.Sample)."""
        c = self.cfg
        img = read_image(roidb['file_name'], c.PREPROC.IMAGE_CHANNELS, c.PREPROC.CHANNEL_ORDER)
        boxes, klass, is_crowd = _parse_annotations(roidb)
        segms = _instance_polygons(roidb, len(boxes)) if c.MODE_MASK else None
        return Sample(img, boxes, is_crowd, klass, segms)

    def _load_other(self, rng):
        """A random pool image for copy-paste; None (no paste) if it cannot be read."""
        roidb = self._pool[int(rng.integers(len(self._pool)))]
        try:
            return self._read_sample(roidb)
        except ImageReadError as e:
            logger.warning('No copy-paste from this image: %s', e)
            return None

    def _process(self, roidb):
        rng, c = self._get_rng(), self.cfg
        sample = self._read_sample(roidb)
        if c.MODE_MASK and roidb.get('segmentation') is None and not self._warned_no_masks:
            self._warned_no_masks = True
            logger.warning('"%s" has no segmentation: its gt_masks are full boxes (MODE_MASK '
                           'on detection-only data).', roidb['file_name'])
        sample = apply_augmentors(self._augs, sample, rng,
                                  self._load_other if self._pool else None)
        sample.boxes = clip_boxes(sample.boxes, sample.img.shape)
        boxes = sample.boxes
        sample.keep(np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])))
        img, boxes, klass, is_crowd = sample.img, sample.boxes, sample.klass, sample.is_crowd

        gt = np.flatnonzero(~is_crowd)
        if len(gt) == 0:
            self._num_no_gt += 1
            logger.warning('Skipping training image "%s": no non-crowd box left after '
                           'augmentation (%d such images so far in this process).',
                           roidb['file_name'], self._num_no_gt)
            return None
        ret = {'image': np.ascontiguousarray(img, dtype=np.float32)}
        # RPN targets use every instance (memory is chunked anyway), so instances dropped
        # by MAX_GT_INSTANCES below do not turn their anchors into background.
        if c.MODE_FPN:
            targets = get_multilevel_rpn_anchor_input(img.shape, boxes, is_crowd, rng, c)
            for lv, (labels, matched) in zip(fpn_levels(c.FPN.ANCHOR_STRIDES), targets):
                ret['anchor_labels_lvl{}'.format(lv)] = labels
                ret['anchor_boxes_lvl{}'.format(lv)] = matched
        else:
            ret['anchor_labels'], ret['anchor_boxes'] = get_rpn_anchor_input(
                img.shape, boxes, is_crowd, rng, c)

        limit = c.DATA.MAX_GT_INSTANCES
        if 0 < limit < len(gt):
            logger.info('"%s": training on a random %d of its %d instances '
                        '(DATA.MAX_GT_INSTANCES).', roidb['file_name'], limit, len(gt))
            gt = np.sort(rng.choice(gt, limit, replace=False))
        ret['gt_boxes'] = boxes[gt]
        ret['gt_labels'] = klass[gt]
        if c.MODE_MASK:
            # Each mask in its own box frame: N x M^2 bytes (full-image masks only after
            # copy-paste, which needs pixels).
            size = c.MRCNN.GT_MASK_SIZE
            masks = np.zeros((len(gt), size, size), dtype=np.uint8)
            for k, i in enumerate(gt):
                if sample.masks is not None:  # after copy-paste: full-image masks
                    masks[k] = full_mask_to_box_frame(sample.masks[i], boxes[i], size)
                else:
                    masks[k] = polygons_to_box_frame_mask(sample.segms[i], boxes[i], size)
            ret['gt_masks'] = masks
        return ret


def _has_usable_box(roidb):
    """True if the roidb has a non-crowd box of positive width and height."""
    boxes, _, crowd = _parse_annotations(roidb)
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & ~crowd
    return bool(ok.any())


def _training_roidbs(shard):
    """Roidbs of DATA.TRAIN, filtered and sharded (see `get_train_dataflow`), in one
    `SerializedList`. Raises DatasetError when no image is left."""
    roidbs = list(itertools.chain.from_iterable(
        DatasetRegistry.get(name).training_roidbs() for name in cfg.DATA.TRAIN))
    total = len(roidbs)
    if cfg.DATA.FILTER_EMPTY_ANNOTATIONS:
        roidbs = [r for r in roidbs if _has_usable_box(r)]
        logger.info('Filtered %d images with no annotations out of %d.',
                    total - len(roidbs), total)
    if shard is not None:
        rank, size = shard
        order = np.random.default_rng(cfg.TRAIN.SEED).permutation(len(roidbs))
        roidbs = [roidbs[i] for i in order[rank::size]]
        logger.info('Rank %d of %d trains on %d images.', rank, size, len(roidbs))
    if not roidbs:
        # A user error (train.py prints it in one line): every image was filtered or skipped.
        raise DatasetError('No training images left in DATA.TRAIN={} (shard {}): every image '
                           'was filtered (see the counts above).'.format(list(cfg.DATA.TRAIN),
                                                                        shard))
    return SerializedList(roidbs)  # one buffer, not millions of objects: no copy-on-read


def get_train_dataflow(shard=None):
    """The training dataflow: lists ordered as `utils.graph_inputs.input_names`; with
    TRAIN.IMAGES_PER_DEVICE = N > 1, batches of N images of one orientation (`data_batch`).

    Roidbs of every dataset in DATA.TRAIN are concatenated, images without a usable
    non-crowd box dropped (DATA.FILTER_EMPTY_ANNOTATIONS), shuffled each epoch and
    preprocessed by DATA.NUM_WORKERS processes (0: in this process). Skipped images
    (unreadable, nothing left after augmentation) are logged and never yielded.

    Args:
        shard ((rank, size) or None): with Horovod, rank r takes every size-th image of one
            fixed permutation (the same on every rank, so the shards are disjoint).
    """
    from utils.compat import warn_unless_msgpack  # sets TENSORPACK_SERIALIZE if still unset
    from tensorpack.dataflow import DataFromList, MapData, MultiProcessMapData

    workers = cfg.DATA.NUM_WORKERS
    # With workers, the json and the roidb objects exist only in a short-lived child: the
    # workers fork from a process that holds just the compact roidb buffer (utils/forked.py).
    roidbs = (run_in_forked_process(_training_roidbs, shard) if workers > 0
              else _training_roidbs(shard))
    release_freed_memory()  # what the main process freed, before the workers fork
    rank = shard[0] if shard is not None else 0
    # Copy-paste takes its instances from this rank's images.
    pastes = any((a if isinstance(a, str) else a[0]) == 'CopyPaste'
                 for a in cfg.PREPROC.AUGMENTATIONS)
    preprocess = TrainingDataPreprocessor(seed=cfg.TRAIN.SEED + rank,
                                          paste_pool=roidbs if pastes else None)
    ds = DataFromList(roidbs, shuffle=True)
    if workers > 0:
        warn_unless_msgpack(logger)
        ds = MultiProcessMapData(ds, num_proc=workers, map_func=preprocess,
                                 buffer_size=_BUFFER_PER_WORKER * workers)
    else:
        ds = MapData(ds, preprocess)
    images = cfg.TRAIN.IMAGES_PER_DEVICE
    names = input_names(cfg.MODE_FPN, cfg.MODE_MASK, cfg.FPN.ANCHOR_STRIDES, images > 1)
    if images == 1:
        return MapData(ds, lambda dp: [dp[n] for n in names])
    # Workers prepare single images; grouping and padding them is cheap, done here.
    groups = AspectRatioGroups(images)

    def group(dp):
        full = groups.add(dp)
        return None if full is None else pad_batch(full, names)
    return MapData(ds, group)  # MapData drops the None of a group not yet full
