#!/usr/bin/env python
"""Per-image time of each training augmentor (augment.py), in the data worker's terms.

    python bench/augment.py                       # 1024 x 1024 scene, 20 instances
    python bench/augment.py --side 512 --instances 100 --repeat 20

The scene is a square `dataset.shapes.generate_image` of ``--side`` pixels (1024: about
the pixels of an 800 x 1333 training image), as float32 like `common.read_image` returns. Each augmentor runs alone
``--repeat`` times on fresh copies, after one warm-up; `CopyPaste` pastes a second scene
(its time includes rasterising both images' full-image masks, which it needs).

Prints one JSON line per augmentor:
    augmentor       name and parameters as in PREPROC.AUGMENTATIONS
    image_hw        input size; instances: input instance count
    median_ms       median wall-clock time per image; cpu_ms: the same runs' median CPU time
    load_avg        1-minute load average when it ended (shared machines)
Compare with a training step (bench/train_step.py): a data worker has the whole step to
prepare one image.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import harness  # noqa: E402

# name, parameters: the defaults of config_defaults.AUGMENTORS unless set here.
CASES = [('ResizeShortestEdge', {'sizes': [640, 800], 'max_size': 1333}),
         ('HorizontalFlip', {'prob': 1.}), ('VerticalFlip', {'prob': 1.}),
         ('Rotate90', {'prob': 1.}), ('RandomCrop', {'size': 512}),
         ('LargeScaleJitter', {'size': 1024}), ('ColorJitter', {}),
         ('CopyPaste', {'prob': 1.})]


def _scene(seed, side, instances):
    from augment import Sample
    from dataset.shapes import generate_image
    img, roidb = generate_image(seed, 0, min_size=side, max_size=side, dense=True,
                                num_dense=instances)
    return Sample(img.astype(np.float32), np.asarray(roidb['boxes'], np.float32),
                  np.asarray(roidb['is_crowd'], bool), np.asarray(roidb['class'], np.int64),
                  [list(p) for p in roidb['segmentation']])


def _measure(name, params, scene, other, repeat):
    import augment
    from config_defaults import AUGMENTORS
    from config import config as cfg
    kw = dict(AUGMENTORS[name], **params)
    if name == 'LargeScaleJitter':
        kw['pad_value'] = cfg.PREPROC.PIXEL_MEAN
    elif name == 'ColorJitter':
        kw.update(channels=3, order='BGR')
    aug = getattr(augment, name)(**kw)
    rng = np.random.default_rng(0)
    walls, cpus = [], []
    for i in range(repeat + 1):
        s = copy.deepcopy(scene)
        t, c = time.perf_counter(), time.process_time()
        if name == 'CopyPaste':
            aug.paste(s, copy.deepcopy(other))
        else:
            aug(s, rng)
        if i:  # the first run warms caches up
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    return {'augmentor': [name, params], 'image_hw': list(scene.img.shape[:2]),
            'instances': len(scene.boxes), 'median_ms': round(1e3 * statistics.median(walls), 2),
            'cpu_ms': round(1e3 * statistics.median(cpus), 2),
            'load_avg': harness.load_average()[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--side', type=int, default=1024)
    parser.add_argument('--instances', type=int, default=20)
    parser.add_argument('--repeat', type=int, default=10)
    args = parser.parse_args()
    if args.side < 64 or args.instances < 1 or args.repeat < 1:
        raise harness.UserError('--side must be >= 64 pixels, --instances and --repeat >= 1.')
    scene, other = (_scene(seed, args.side, args.instances) for seed in (0, 1))
    for name, params in CASES:
        print(json.dumps(_measure(name, params, scene, other, args.repeat)), flush=True)


if __name__ == '__main__':
    harness.run_main(main)
