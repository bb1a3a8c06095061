#!/usr/bin/env python
"""Latency per image of the end-to-end SavedModel (export.py) next to predict.py's
predictor, at batch 1 and 4.

    python bench/export_latency.py --profile demo --images 10 --repeat 3

Each measurement (a fresh process) builds predict.py's predictor with random weights (the
config of the profile plus TEST.RESULT_SCORE_THRESH=0, as bench/inference.py: K boxes
and masks come out), times ``eval.predict_image`` (full-image masks, as the export
returns them) on a synthetic shapes scene of TEST_SHORT_EDGE_SIZE x MAX_SIZE, exports the
SavedModel and loads it back with ``tf.saved_model.load`` (plain TensorFlow), then times
``serving_default`` on that image (uint8) alone and on a batch of 4 copies.

One JSON line per measurement: predict_ms, savedmodel_b1_ms, savedmodel_b4_ms_per_image
(medians over --images calls after --warmup), their [min, max] spreads, detections, and
what they were measured with (harness.record).
"""
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import harness  # noqa: E402

BENCH_OVERRIDES = ['TEST.RESULT_SCORE_THRESH=0.0']  # random weights: see bench/inference.py


def _times_ms(fn, warmup, n, per=1):
    """Median and [min, max] of ``n`` timed calls of ``fn`` (after ``warmup``), ms / ``per``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start) / per)
    return round(statistics.median(times), 1), [round(min(times), 1), round(max(times), 1)]


def measure(profile, config_file, config, intra, inter, onednn, images, warmup):
    """In this process: the predictor and the exported model on the same image."""
    import utils.compat  # noqa: F401  (before TensorFlow)

    import numpy as np
    import tensorflow as tf

    from common import read_image
    from config import config as cfg
    from eval import predict_image
    from export import export_savedmodel, serving_metadata
    from predict import build_predictor, class_category_ids
    job = dict(profile=profile, config_file=config_file, config=config, intra=intra,
               inter=inter)
    harness.setup_config(profile, config_file, BENCH_OVERRIDES + list(config), is_training=False)
    tf.compat.v1.set_random_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        img = read_image(harness.write_synthetic_scene(
            tmp, cfg.PREPROC.TEST_SHORT_EDGE_SIZE, cfg.PREPROC.MAX_SIZE)['file_name'])
        predictor = build_predictor(None)
        ret = {'image_hw': list(img.shape[:2])}
        ret['predict_ms'], ret['predict_spread_ms'] = _times_ms(
            lambda: predict_image(img, predictor), warmup, images)
        ret['detections'] = len(predict_image(img, predictor))
        export_savedmodel(predictor, os.path.join(tmp, 'savedmodel'),
                          serving_metadata(class_category_ids()))
        serve = tf.saved_model.load(os.path.join(tmp, 'savedmodel')).signatures['serving_default']
        one = tf.constant(np.uint8(img)[None])
        four = tf.constant(np.repeat(np.uint8(img)[None], 4, axis=0))
        ret['savedmodel_b1_ms'], ret['savedmodel_b1_spread_ms'] = _times_ms(
            lambda: serve(images=one), warmup, images)
        ret['savedmodel_b4_ms_per_image'], ret['savedmodel_b4_spread_ms'] = _times_ms(
            lambda: serve(images=four), warmup, max(1, images // 2), per=4)
    return harness.record(job, cfg, **ret)


def main(argv=None):
    p = harness.bench_parser(__doc__, warmup=2, unit='calls')
    p.add_argument('--images', type=int, default=10, help='timed calls per measurement')
    args = p.parse_args(argv)
    if args.job:
        harness.run_job(measure, args.job)
        return
    harness.main_loop(__file__, args, images=args.images, warmup=args.warmup)


if __name__ == '__main__':
    main()
