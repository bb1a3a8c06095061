#!/usr/bin/env python
"""Peak memory and step time of training on one dense synthetic scene, per instance count.

    python bench/dense.py                                # 100, 1000, 3000, 5000 instances
    python bench/dense.py --instances 3000 --config BACKBONE.DEPTH=50 PREPROC.MAX_SIZE=1333
    python bench/dense.py --instances 2000 --config TRAIN.IMAGES_PER_DEVICE=2  # 2 scenes/step

One *step* is what a training iteration costs: the data preprocessing of the image
(`data.TrainingDataPreprocessor`: read, resize, RPN anchor labels, box-frame masks) plus
one optimizer step of the graph. The scene is `dataset.shapes.generate_image(dense=True)`
with exactly N shapes on an H x W image (a few mostly hidden ones are dropped); with
TRAIN.IMAGES_PER_DEVICE = k, k such scenes (different seeds) padded into one batch
(`data_batch.pad_batch`). Every N runs in a fresh process, so its peak resident memory
(``ru_maxrss``) is its own.

Prints one JSON line per N:
    instances       N asked for;  gt_boxes: instances left after preprocessing (1st scene)
    images          scenes per step (TRAIN.IMAGES_PER_DEVICE)
    image_hw        the resized image fed to the graph
    peak_rss_mb     peak resident memory of the whole process (TF runtime, graph, data)
    rss_built_mb    peak resident memory after building the graph, before the first step
    step_s          median over --steps steps (after --warmup) of preprocess_s + graph_s
                    (wall clock); step_cpu_s: the same steps' CPU time, all threads
                    (steadier than wall time on a shared machine)
    losses          the last step's losses; finite: every loss finite in every step
    load_avg        1-minute load average when the measurement ended (shared machines)
Default config: ResNet-18 FPN Mask R-CNN, images of short edge and MAX_SIZE 1024, RPN and
Fast R-CNN defaults; ``--config KEY=VALUE ...`` applies on top.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import harness  # noqa: E402

DEFAULT_CONFIG = [
    'MODE_FPN=True', 'MODE_MASK=True', 'BACKBONE.DEPTH=18',
    'DATA.TRAIN=shapes_dense_train', 'DATA.VAL=shapes_dense_val', 'DATA.NUM_WORKERS=0',
    'PREPROC.TRAIN_SHORT_EDGE_SIZE=[1024,1024]', 'PREPROC.TEST_SHORT_EDGE_SIZE=1024',
    'PREPROC.MAX_SIZE=1024',
]


def run_isolated(job, timeout=3600):
    """`measure(**job)` in a fresh process (`harness.run_isolated`): its own peak RSS."""
    return harness.run_isolated(__file__, job, timeout)


def _write_scene(folder, instances, image_hw, seed):
    """A dense shapes image of H x W with about ``instances`` shapes, written as PNG.

    `generate_image` makes square images: a square of side max(H, W) with the same density
    is cropped to H x W, keeping the shapes that lie entirely inside.

    Returns:
        its roidb (dataset/dataset.py format).
    """
    import cv2

    from dataset.shapes import generate_image
    h, w = image_hw
    side = max(h, w)
    img, roidb = generate_image(seed, 0, side, side, dense=True,
                                num_dense=int(round(instances * side * side / (h * w))))
    boxes = roidb['boxes']
    keep = np.flatnonzero((boxes[:, 2] <= w) & (boxes[:, 3] <= h))
    path = os.path.join(folder, 'dense{}.png'.format(seed))
    cv2.imwrite(path, img[:h, :w])
    return {'file_name': path, 'image_id': 0, 'height': h, 'width': w,
            'boxes': boxes[keep], 'class': roidb['class'][keep],
            'is_crowd': roidb['is_crowd'][keep],
            'segmentation': [roidb['segmentation'][i] for i in keep]}


def measure(config, instances, image_hw, steps, warmup, seed=0):
    """In this process: build the graph, train ``warmup + steps`` steps on one scene.

    Args:
        config (list of str): KEY=VALUE overrides on top of DEFAULT_CONFIG.
        instances (int): shapes in the scene; image_hw: (H, W) of the generated image.
    Returns:
        dict: the JSON record of the module docstring.
    """
    import utils.compat  # noqa: F401  (before TensorFlow)

    import tensorflow.compat.v1 as tf

    from config import config as cfg, finalize_configs
    from data import TrainingDataPreprocessor
    from data_batch import pad_batch
    from dataset import DatasetRegistry, register_shapes
    from modeling.generalized_rcnn import model_input_names
    from modeling.training_graph import build_training_step
    from utils.precision import session_config

    register_shapes()
    cfg.update_args(DEFAULT_CONFIG + list(config))
    finalize_configs(is_training=True, num_gpus=0, registry=DatasetRegistry)
    with tempfile.TemporaryDirectory() as tmp:
        images = cfg.TRAIN.IMAGES_PER_DEVICE
        roidbs = [_write_scene(tmp, instances, image_hw, seed + i) for i in range(images)]
        preprocess = TrainingDataPreprocessor(seed=seed)
        names = model_input_names(True)
        rows, finite = [], True
        # train.py's session: its thread counts and TRAIN.PRECISION's rewrite
        sess_config = session_config(cfg.TRAIN.PRECISION)
        with tf.Graph().as_default(), tf.Session(config=sess_config) as sess:
            tf.set_random_seed(seed)
            placeholders, _, losses, train_op = build_training_step()
            sess.run(tf.global_variables_initializer())
            built = harness.peak_rss_mb()
            for _ in range(warmup + steps):
                start, cpu = time.perf_counter(), time.process_time()
                dps = [preprocess(roidb) for roidb in roidbs]
                mid = time.perf_counter()
                dp = dps[0]
                inputs = pad_batch(dps, names) if images > 1 else [dp[n] for n in names]
                feed = dict(zip(placeholders, inputs))
                values = sess.run([train_op, losses], feed)[1]
                rows.append((mid - start, time.perf_counter() - mid, time.process_time() - cpu))
                finite &= all(np.isfinite(v) for v in values.values())
    timed = rows[warmup:] or rows
    return {'instances': instances, 'gt_boxes': int(len(dp['gt_boxes'])), 'images': images,
            'image_hw': list(dp['image'].shape[:2]), 'peak_rss_mb': round(harness.peak_rss_mb(), 1),
            'rss_built_mb': round(built, 1),
            'step_s': round(statistics.median(a + b for a, b, _ in timed), 3),
            'preprocess_s': round(statistics.median(a for a, _, _ in timed), 3),
            'graph_s': round(statistics.median(b for _, b, _ in timed), 3),
            'step_cpu_s': round(statistics.median(c for _, _, c in timed), 3),
            'losses': {k: round(float(v), 4) for k, v in sorted(values.items())},
            'finite': bool(finite), 'load_avg': round(os.getloadavg()[0], 2),
            'config': list(config)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--instances', type=int, nargs='+', default=[100, 1000, 3000, 5000])
    p.add_argument('--image-size', type=int, nargs=2, default=[1024, 1024], metavar=('H', 'W'))
    p.add_argument('--steps', type=int, default=3, help='timed steps (median reported)')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps first')
    p.add_argument('--config', nargs='+', default=[], metavar='KEY=VALUE')
    p.add_argument('--job', help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = p.parse_args(argv)
    if args.job:
        return harness.run_job(measure, args.job)
    for n in args.instances:
        job = {'config': args.config, 'instances': n, 'image_hw': args.image_size,
               'steps': args.steps, 'warmup': args.warmup}
        print(json.dumps(run_isolated(job)), flush=True)


if __name__ == '__main__':
    harness.run_main(main)
