#!/usr/bin/env python
"""Seconds per training step and peak memory, N images per step (TRAIN.IMAGES_PER_DEVICE).

    python bench/train_step.py                             # R50-FPN Mask R-CNN, 800 x 1333
    python bench/train_step.py --profile demo r50-fpn --repeat 3
    python bench/train_step.py --profile demo --images-per-device 1 2 4 --repeat 3
    python bench/train_step.py --onednn 1 --config TRAIN.PRECISION=bf16
    python bench/train_step.py --intra 1 --inter 0         # tensorpack's default threads

The datapoint: N synthetic shapes scenes (seeds 0..N-1) of PREPROC.TRAIN_SHORT_EDGE_SIZE[1]
x PREPROC.MAX_SIZE (800 x 1333 for R50), each run once through
`data.TrainingDataPreprocessor` (resize, flip, RPN anchor labels, box-frame masks; its time
is reported apart), padded into one batch (`data_batch.pad_batch`) when N > 1. The graph
is the one train.py trains: tensorpack's `SimpleTrainer` builds the model's cost and its
optimizer (momentum, gradient accumulation, fp16 loss scaling by TRAIN.PRECISION) on
placeholders; the session comes from `utils.precision.session_config` (TRAIN.PRECISION,
--intra/--inter threads). Random initial weights: no pretrained weights here. Each timed
step is one ``sess.run(train_op)`` on that datapoint; the first --warmup steps are untimed.

One JSON line per measurement (each in a fresh process):
    image_hw, gt_boxes      the (first) preprocessed image fed and its instances
    images, images_per_s    N, and N / step_s
    preprocess_s            the preprocessing calls (all N)
    step_s, step_spread_s   median and [min, max] seconds per step over --steps
    cpu_s                   median CPU seconds (all threads) per step: on a loaded machine
                            it shows the work done where wall time shows the wait
    steps, finite           timed steps; whether every loss was finite
    build_s                 seconds to build the graph and create the session
    rss_built_mb            peak resident memory before the first step
plus the config, precision, data format, threads, oneDNN state, load average and peak RSS
(``peak_rss_mb``, the whole process).
"""
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import harness  # noqa: E402


def measure(profile, config_file, config, intra, inter, onednn, steps, warmup, images=1):
    """In this process: preprocess one scene, build the graph, time ``steps`` steps.

    ``onednn`` was applied by `harness.run_isolated` (TF_ENABLE_ONEDNN_OPTS); the record
    states what TensorFlow actually did.

    Returns:
        dict: the JSON record of the module docstring.
    """
    import utils.compat  # noqa: F401  (before TensorFlow)

    import numpy as np
    import tensorflow.compat.v1 as tf

    from config import config as cfg
    from data import TrainingDataPreprocessor
    from data_batch import pad_batch
    from modeling.generalized_rcnn import model_input_names
    from modeling.training_graph import build_training_step
    from utils.precision import session_config
    job = dict(profile=profile, config_file=config_file, config=config, intra=intra,
               inter=inter)
    harness.setup_config(profile, config_file,
                         list(config) + ['TRAIN.IMAGES_PER_DEVICE={}'.format(images)],
                         is_training=True)
    with tempfile.TemporaryDirectory() as tmp:
        roidbs = []
        for i in range(images):
            os.mkdir(os.path.join(tmp, str(i)))
            roidbs.append(harness.write_synthetic_scene(
                os.path.join(tmp, str(i)), cfg.PREPROC.TRAIN_SHORT_EDGE_SIZE[1],
                cfg.PREPROC.MAX_SIZE, seed=i))
        start = time.perf_counter()
        datapoints = [TrainingDataPreprocessor(seed=0)(roidb) for roidb in roidbs]
        preprocess_s = time.perf_counter() - start
    names = model_input_names(True)
    datapoint = datapoints[0]
    inputs = pad_batch(datapoints, names) if images > 1 else [datapoint[n] for n in names]
    start = time.perf_counter()
    with tf.Graph().as_default():
        tf.set_random_seed(0)
        placeholders, cost, _, train_op = build_training_step()
        feed = dict(zip(placeholders, inputs))
        with tf.Session(config=session_config(cfg.TRAIN.PRECISION, intra, inter)) as sess:
            sess.run(tf.global_variables_initializer())
            build_s = time.perf_counter() - start
            rss_built = harness.peak_rss_mb()
            times, cpu_times, finite = [], [], True
            for _ in range(warmup + steps):
                start, cpu = time.perf_counter(), time.process_time()
                loss = sess.run([train_op, cost], feed)[1]
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu)
                finite &= bool(np.isfinite(loss))
    timed = times[warmup:]
    return harness.record(
        job, cfg, image_hw=list(datapoint['image'].shape[:2]),
        gt_boxes=int(len(datapoint['gt_boxes'])), preprocess_s=round(preprocess_s, 3),
        images=images, images_per_s=round(images / statistics.median(timed), 3),
        step_s=round(statistics.median(timed), 3),
        step_spread_s=[round(min(timed), 3), round(max(timed), 3)],
        cpu_s=round(statistics.median(cpu_times[warmup:]), 3), steps=steps,
        finite=finite, build_s=round(build_s, 1), rss_built_mb=round(rss_built, 1))


def main(argv=None):
    p = harness.bench_parser(__doc__, warmup=1, unit='steps')
    p.add_argument('--steps', type=int, default=3, help='timed steps (median reported)')
    p.add_argument('--images-per-device', type=int, nargs='+', default=[1], metavar='N',
                   help='TRAIN.IMAGES_PER_DEVICE values, one measurement each (default 1)')
    args = p.parse_args(argv)
    if args.job:
        return harness.run_job(measure, args.job)
    # N interleaved within each repeat: a drifting load hits every N alike
    for job in harness.jobs_from_args(args, steps=args.steps, warmup=args.warmup):
        for n in args.images_per_device:
            print(json.dumps(harness.run_isolated(__file__, dict(job, images=n))), flush=True)


if __name__ == '__main__':
    harness.run_main(main)
