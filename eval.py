"""Prediction on images, mask pasting, COCO-style results and the evaluation callback.

Coordinates: boxes are x1y1x2y2 floats in the floating-point convention (pixel i covers
[i, i+1), so pixel (y, x) has its centre at (y + 0.5, x + 0.5)). The graph works in the
pixels of the resized image it is fed; everything returned from here is in the pixels of
the ORIGINAL image.

Memory: a full-image mask costs H * W bytes, so dense scenes (thousands of instances) must
never hold all of them at once. `paste_mask` computes only the box region of one instance;
`iter_paste_masks` yields one full mask at a time and `paste_masks_rle` turns each into a
COCO RLE right away, so evaluation holds one full-image mask at any time.
"""
import collections
import itertools
import os
import time

import numpy as np
from pycocotools import mask as mask_util
from tensorpack.callbacks import Callback
from tensorpack.utils import logger

from common import ImageReadError, clip_boxes, read_image, resize_shortest_edge, scale_boxes
from config import config as cfg
from dataset import DatasetRegistry
from eval_batch import BatchModel, batch_output_names
from utils.distributed import predict_on_devices, predict_on_ranks

__all__ = ['DetectionResult', 'get_inference_output_names', 'paste_mask', 'iter_paste_masks',
           'encode_mask', 'paste_masks_rle', 'predict_image', 'predict_images',
           'predict_image_with_proposals',
           'detection_to_dict', 'predict_dataflow', 'read_inference_images',
           'predict_roidbs', 'evaluate_on_dataset', 'EvalCallback', 'PHASES']

DetectionResult = collections.namedtuple('DetectionResult', ['box', 'score', 'class_id', 'mask'])
DetectionResult.__doc__ = """One detection in the original image.

    box: float32 [4] x1y1x2y2 in original-image pixels, clipped to the image.
    score: float. class_id: int in 1..C (contiguous; 0 is background).
    mask: uint8 [H, W] full-image 0/1 mask, a COCO RLE dict (``mask_format='rle'``), or
        None for Faster R-CNN.
"""

# The phases `predict_image` times (seconds are added to ``timings[phase]``).
PHASES = ('preprocess', 'graph', 'postprocess')


def get_inference_output_names(mode_mask=None):
    """Graph output names in the order `predict_image` expects them.

    Args:
        mode_mask (bool or None): with masks; None reads ``cfg.MODE_MASK``.
    Returns:
        list of str: ``output/boxes``, ``output/scores``, ``output/labels`` and, with masks,
        ``output/masks`` (see NOTES.md, "Graph outputs").
    """
    if mode_mask is None:
        mode_mask = cfg.MODE_MASK
    names = ['output/boxes', 'output/scores', 'output/labels']
    return names + ['output/masks'] if mode_mask else names


def _interpolation_weights(coords, size):
    """Bilinear weights of sample points along one axis of a ``size``-cell mask.

    Args:
        coords: float64 [n] sample positions in mask-cell units (cell c has its centre at
            c); positions beyond the outer cell centres take the edge cell's value.
    Returns:
        float32 [n, size]: row i holds the (at most two) weights of sample i, summing to 1.
    """
    coords = np.clip(coords, 0, size - 1)
    lo = np.minimum(np.floor(coords).astype(np.int64), max(size - 2, 0))
    hi = np.minimum(lo + 1, size - 1)
    frac = coords - lo
    weights = np.zeros((len(coords), size), dtype=np.float32)
    rows = np.arange(len(coords))
    weights[rows, lo] += 1. - frac
    weights[rows, hi] += frac  # a separate step: lo == hi when size == 1
    return weights


def _paste_region(mask, box, shape, threshold, border):
    """The box region of one pasted mask (see `paste_mask`).

    Returns:
        (y0, x0, region): region is bool [h, w] for the image pixels rows y0..y0+h-1 and
        columns x0..x0+w-1; every pixel outside it is 0 in the pasted mask.
    """
    mask = np.asarray(mask, dtype=np.float32)
    res_y, res_x = mask.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    if border == 'zeros':
        # A ring of zero cells around the grid (and the box grown by one cell to cover it):
        # the mask fades to 0 beyond its outer cell centres.
        cw, ch = (x2 - x1) / res_x, (y2 - y1) / res_y
        mask = np.pad(mask, 1)
        res_y, res_x = res_y + 2, res_x + 2
        x1, y1, x2, y2 = x1 - cw, y1 - ch, x2 + cw, y2 + ch
    # Pixel x has its centre inside [x1, x2) iff ceil(x1 - 0.5) <= x < ceil(x2 - 0.5).
    x0, xe = (int(np.clip(np.ceil(v - 0.5), 0, shape[1])) for v in (x1, x2))
    y0, ye = (int(np.clip(np.ceil(v - 0.5), 0, shape[0])) for v in (y1, y2))
    if xe <= x0 or ye <= y0:  # no pixel centre in the box (or the box is off the image)
        return 0, 0, np.zeros((0, 0), dtype=bool)
    # Pixel centre x + 0.5 in mask-cell units, where cell c's centre is at c.
    u = (np.arange(x0, xe) + 0.5 - x1) * (res_x / (x2 - x1)) - 0.5
    v = (np.arange(y0, ye) + 0.5 - y1) * (res_y / (y2 - y1)) - 0.5
    # Separable bilinear sampling of the grid: [h, R] @ [R, R] @ [R, w].
    region = _interpolation_weights(v, res_y) @ mask @ _interpolation_weights(u, res_x).T
    # tensorpack's and detectron2's pastes keep values equal to the threshold
    return y0, x0, (region >= threshold) if border == 'zeros' else (region > threshold)


def paste_mask(mask, box, shape, threshold=0.5, border='zeros'):
    """Paste one instance's mask into the full image.

    The R x R mask covers exactly the box: cell (r, c) spans x in x1 + [c, c+1) *
    (x2 - x1) / R (y likewise), its value is at the cell centre. Each pixel takes the
    bilinear interpolation of the mask at its centre, thresholded. Beyond the outer cell
    centres, ``border`` 'zeros' interpolates towards 0 half a cell outside the grid (cfg
    TEST.MASK_PASTE; tensorpack's accurate paste, detectron2), 'edge' extends the edge
    cells' values to the box edges (the pixels outside the box are 0). Only the box region
    is computed.

    Args:
        mask: float [R, R] foreground probabilities.
        box: 4 floats x1y1x2y2 in image pixels.
        shape: (H, W) of the image.
        threshold (float): a pixel is foreground where the interpolated value is at least
            ('zeros') / above ('edge') it.
        border (str): 'zeros' or 'edge'.
    Returns:
        uint8 [H, W] of 0/1.
    """
    out = np.zeros(tuple(shape[:2]), dtype=np.uint8)
    y0, x0, region = _paste_region(mask, box, shape, threshold, border)
    out[y0:y0 + region.shape[0], x0:x0 + region.shape[1]] = region
    return out


def iter_paste_masks(masks, boxes, shape, threshold=0.5, border='zeros'):
    """Yield `paste_mask` of each instance in turn: one full-image mask exists at a time
    unless the caller keeps them.

    Args:
        masks: float [N, R, R]; boxes: float [N, 4] x1y1x2y2 image pixels; shape: (H, W).
    Yields:
        N uint8 [H, W] arrays.
    """
    for mask, box in zip(masks, boxes):
        yield paste_mask(mask, box, shape, threshold, border)


def encode_mask(mask):
    """uint8 [H, W] 0/1 mask -> COCO RLE dict {'size': [H, W], 'counts': str} (json-ready)."""
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle['counts'] = rle['counts'].decode('ascii')
    return rle


def paste_masks_rle(masks, boxes, shape, threshold=0.5, border='zeros'):
    """Paste every instance (as `paste_mask`) and encode it as RLE, holding one full-image
    buffer in all.

    Args:
        masks: float [N, R, R]; boxes: float [N, 4] x1y1x2y2 image pixels; shape: (H, W).
    Returns:
        list of N COCO RLE dicts (counts as str).
    """
    # One Fortran-ordered buffer reused for all instances: only the box region is written
    # and cleared again, so the cost per instance is the region plus one RLE encoding.
    buf = np.zeros(tuple(shape[:2]), dtype=np.uint8, order='F')
    rles = []
    for mask, box in zip(masks, boxes):
        y0, x0, region = _paste_region(mask, box, shape, threshold, border)
        window = buf[y0:y0 + region.shape[0], x0:x0 + region.shape[1]]
        window[...] = region
        rles.append(encode_mask(buf))
        window[...] = 0
    return rles


def _add_time(timings, phase, start):
    """Add the seconds since ``start`` to ``timings[phase]`` (if timings is a dict)."""
    now = time.perf_counter()
    if timings is not None:
        timings[phase] = timings.get(phase, 0.) + now - start
    return now


def _resize_for_test(img):
    """(resized image, (sy, sx)): the exact per-axis factors from resized to original
    pixels (rounding the resized size makes them differ slightly); with
    TEST.ISOTROPIC_SCALE_BACK their geometric mean on both axes (tensorpack)."""
    resized, _ = resize_shortest_edge(img, cfg.PREPROC.TEST_SHORT_EDGE_SIZE,
                                      cfg.PREPROC.MAX_SIZE, uint8=cfg.PREPROC.RESIZE_UINT8)
    back = (img.shape[0] / resized.shape[0], img.shape[1] / resized.shape[1])
    if cfg.TEST.ISOTROPIC_SCALE_BACK:
        back = (float(np.sqrt(back[0] * back[1])),) * 2
    return resized, back


def _run_model(img, model_func, timings):
    """Resize ``img`` for testing and run the graph.

    Returns:
        (outputs, (sy, sx)): the graph's outputs (list of arrays, in resized pixels) and
        the factors back to original pixels (`_resize_for_test`).
    """
    start = time.perf_counter()
    resized, back = _resize_for_test(img)
    start = _add_time(timings, 'preprocess', start)
    outputs = model_func([resized])[0] if isinstance(model_func, BatchModel) else \
        model_func(resized)
    _add_time(timings, 'graph', start)
    return outputs, back


def _postprocess(outputs, scale, shape, mask_format):
    """Graph outputs (boxes, scores, labels[, masks]) and the (sy, sx) back to the original
    image -> list of DetectionResult."""
    boxes = scale_boxes(np.reshape(outputs[0], (-1, 4)), *scale)
    boxes = clip_boxes(boxes, shape)
    scores, labels = outputs[1], outputs[2]
    if len(outputs) < 4:
        masks = itertools.repeat(None)
    elif mask_format == 'rle':
        masks = paste_masks_rle(outputs[3], boxes, shape, border=cfg.TEST.MASK_PASTE)
    else:
        masks = iter_paste_masks(outputs[3], boxes, shape, border=cfg.TEST.MASK_PASTE)
    return [DetectionResult(box, float(score), int(label), mask)
            for box, score, label, mask in zip(boxes, scores, labels, masks)]


def predict_image(img, model_func, mask_format='full', timings=None):
    """Detect objects in one image.

    Args:
        img: float32 [H, W, C] original image as returned by ``common.read_image`` with the
            config's channels and order (the array training sees, before resizing).
        model_func: callable(float32 [h, w, C] resized image) -> [boxes [N, 4] (resized
            pixels), scores [N], labels [N] (1..C), and with masks: masks [N, R, R]], e.g. a
            tensorpack predictor with output names `get_inference_output_names()`.
        mask_format (str): 'full' for uint8 [H, W] masks, 'rle' for COCO RLE dicts (bounded
            memory for dense scenes).
        timings (dict or None): if given, seconds spent in each of `PHASES` are added to it.
    Returns:
        list of DetectionResult, boxes in original-image pixels.
    """
    assert mask_format in ('full', 'rle'), mask_format
    outputs, scale = _run_model(img, model_func, timings)
    start = time.perf_counter()
    results = _postprocess(outputs, scale, img.shape, mask_format)
    _add_time(timings, 'postprocess', start)
    return results


def predict_images(imgs, model_func, mask_format='full', timings=None):
    """Detect objects in several images, one graph run for all with a `BatchModel` of at
    least ``len(imgs)`` images (else one run each, `predict_image`).

    Returns:
        list (per image) of lists of DetectionResult, as `predict_image` gives each.
    """
    if not isinstance(model_func, BatchModel) or len(imgs) == 1:
        return [predict_image(img, model_func, mask_format, timings) for img in imgs]
    start = time.perf_counter()
    resized, backs = zip(*[_resize_for_test(img) for img in imgs])
    start = _add_time(timings, 'preprocess', start)
    outputs = model_func(list(resized))
    start = _add_time(timings, 'graph', start)
    results = [_postprocess(out, back, img.shape, mask_format)
               for out, back, img in zip(outputs, backs, imgs)]
    _add_time(timings, 'postprocess', start)
    return results


def predict_image_with_proposals(img, model_func, mask_format='rle'):
    """Like `predict_image`, for a ``model_func`` that also returns the RPN proposals
    (``output/proposal_boxes``, float32 [K, 4] resized pixels) as its LAST output.

    Returns:
        (list of DetectionResult, float32 [K, 4] proposals in original-image pixels).
    """
    outputs, scale = _run_model(img, model_func, None)
    proposals = scale_boxes(np.reshape(outputs[-1], (-1, 4)), *scale)
    return _postprocess(outputs[:-1], scale, img.shape, mask_format), proposals


def detection_to_dict(result, image_id):
    """DetectionResult -> result dict of `DatasetSplit.eval_inference_results`:
    image_id, category_id (contiguous 1..C), bbox [x1, y1, x2, y2] floats, score and,
    with a mask, segmentation (COCO RLE with counts as str)."""
    ret = {'image_id': image_id, 'category_id': int(result.class_id),
           'bbox': [float(v) for v in result.box], 'score': float(result.score)}
    if result.mask is not None:
        ret['segmentation'] = (result.mask if isinstance(result.mask, dict)
                               else encode_mask(result.mask))
    return ret


def predict_dataflow(df, model_func, tqdm_bar=None):
    """Run `predict_images` on every image of ``df``, a batch at a time.

    Args:
        df: an iterable (e.g. a tensorpack DataFlow) of (img float32 [H, W, C], image_id).
        model_func: as in `predict_image`, or a `BatchModel`.
        tqdm_bar: a tqdm bar updated once per image, or None.
    Returns:
        list of result dicts (`detection_to_dict`), masks as RLE.
    """
    if hasattr(df, 'reset_state'):
        df.reset_state()
    all_results = []
    batch_size = getattr(model_func, 'batch_size', 1)
    it = iter(df)
    while True:
        batch = list(itertools.islice(it, batch_size))
        if not batch:
            return all_results
        imgs, ids = zip(*batch)
        for results, image_id in zip(predict_images(imgs, model_func, 'rle'), ids):
            all_results.extend(detection_to_dict(r, image_id) for r in results)
        if tqdm_bar is not None:
            tqdm_bar.update(len(batch))


def read_inference_images(roidbs, failures, tqdm_bar=None):
    """Yield (img, image_id) for each roidb, read with the config's channels and order.

    Unreadable images are logged, appended to ``failures`` as (file_name, reason) and
    skipped (the tqdm bar still advances).
    """
    for roidb in roidbs:
        try:
            img = read_image(roidb['file_name'], channels=cfg.PREPROC.IMAGE_CHANNELS,
                             order=cfg.PREPROC.CHANNEL_ORDER)
        except ImageReadError as e:
            logger.warn('Skipping image {}: {}'.format(roidb['file_name'], e))
            failures.append((roidb['file_name'], str(e)))
            if tqdm_bar is not None:
                tqdm_bar.update(1)
            continue
        yield img, roidb['image_id']


def predict_roidbs(roidbs, model_funcs, tqdm_bar=None):
    """Predict ``roidbs``' images split over ``model_funcs``, one per device of this process.

    Returns:
        (results, failures): result dicts (`detection_to_dict`) in image order, as one
        function would give them; unreadable images as (file_name, reason).
    """
    def run(part, model_func):
        failures = []
        return predict_dataflow(read_inference_images(part, failures, tqdm_bar), model_func,
                                tqdm_bar), failures
    return predict_on_devices(roidbs, model_funcs, run)


def evaluate_on_dataset(name, model_func, output_file=None, horovod=False):
    """Predict every image of a registered split and evaluate with its evaluator.

    Args:
        name (str): a registered dataset name (e.g. one of ``cfg.DATA.VAL``).
        model_func: as in `predict_image`, or a list of them (`predict_roidbs`).
        output_file (str or None): where the split writes the COCO-format results json
            (original category ids).
        horovod (bool): call on every rank: each predicts its share, rank 0 evaluates all
            once; the metrics equal one process's (`utils.distributed.predict_on_ranks`).
    Returns:
        dict[str, float]: the split's metrics (``mAP(bbox)/IoU=0.5:0.95``, per-class AP, ...),
        None on other Horovod ranks. Unreadable images are skipped (their gt counts as missed).
    """
    split = DatasetRegistry.get(name)
    roidbs = split.inference_roidbs()
    funcs = list(model_func) if isinstance(model_func, (list, tuple)) else [model_func]
    merged = predict_on_ranks(roidbs, lambda part, bar: predict_roidbs(part, funcs, bar),
                              horovod, 'Evaluating ' + name)
    if merged is None:  # not rank 0
        return None
    results, failures = merged
    if failures:
        logger.warn('{}: skipped {} of {} images that could not be read.'.format(
            name, len(failures), len(roidbs)))
    return split.eval_inference_results(results, output_file)


class EvalCallback(Callback):
    """Evaluate on every set of ``cfg.DATA.VAL`` every ``cfg.TRAIN.EVAL_PERIOD`` epochs
    and after the last epoch; every metric goes to the trainer's monitors as
    ``<dataset>/<metric>`` and the results json to the log directory.

    Every Horovod rank (or GPU of this process) predicts a share of the images and rank 0
    evaluates them all. The final evaluation runs in the last epoch's ``_trigger_epoch``
    rather than ``_after_train``, which also runs after a failure.
    """
    _chief_only = False  # every rank predicts; only rank 0 reports

    def __init__(self, dataset_names=None, eval_period=None):
        """
        Args:
            dataset_names (list of str or None): default ``cfg.DATA.VAL``.
            eval_period (int or None): epochs between evaluations; default
                ``cfg.TRAIN.EVAL_PERIOD``.
        """
        self._names = list(cfg.DATA.VAL if dataset_names is None else dataset_names)
        self._period = cfg.TRAIN.EVAL_PERIOD if eval_period is None else eval_period
        assert self._period > 0, self._period

    def _setup_graph(self):
        self._horovod = cfg.TRAINER == 'horovod'  # a Horovod rank sees its own GPU as 0
        num_gpus = cfg.TRAIN.NUM_GPUS if not self._horovod else min(cfg.TRAIN.NUM_GPUS, 1)
        devices = range(num_gpus) if num_gpus > 0 else [-1]  # -1: tensorpack's '/cpu:0' tower
        names, images = get_inference_output_names(), cfg.TRAIN.IMAGES_PER_DEVICE
        if images == 1:
            self._predictors = [self.trainer.get_predictor(['image'], names, device=d)
                                for d in devices]
        else:  # the training model's inference tower takes as many images as it trains on
            self._predictors = [BatchModel(self.trainer.get_predictor(
                ['image', 'image_sizes'], batch_output_names(names, images), device=d),
                images, len(names)) for d in devices]

    def _before_train(self):
        last = self.trainer.max_epoch
        self._epochs_to_eval = set(range(self._period, last + 1, self._period)) | {last}

    def _trigger_epoch(self):
        if self.epoch_num in self._epochs_to_eval:
            self._evaluate()

    def _evaluate(self):
        logdir = logger.get_logger_dir()
        for name in self._names:
            output = (os.path.join(logdir, 'outputs{}-{}.json'.format(self.global_step, name))
                      if logdir else None)
            metrics = evaluate_on_dataset(name, self._predictors, output, self._horovod)
            for key, value in (metrics or {}).items():  # None on ranks other than 0
                self.trainer.monitors.put_scalar('{}/{}'.format(name, key), value)
