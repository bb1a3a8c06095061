#!/usr/bin/env python
"""Start-up time and memory of the training data path on a COCO-sized annotation file.

    python bench/dataset_scale.py                                   # train2017-sized
    python bench/dataset_scale.py --images 11800 --instances 86000  # a tenth
    python bench/dataset_scale.py --plain-list --workers 4          # the old Python list

Writes (once, cached in --workdir) a synthetic COCO layout: ``annotations/
instances_train2017.json`` with --images images and --instances polygon instances (8-40
points each, like COCO's) plus --crowd of them as crowd RLEs, 80 COCO category ids, and
``train2017/pool/*.png``: 8 real 240 x 320 PNGs that every ``file_name`` points to. Then
measures, each in a fresh process (`harness.run_isolated`):

    load        json.load alone: load_s, peak_rss_mb
    roidbs      the steps of `data.get_train_dataflow` one by one: json_load_s,
                roidb_build_s (COCODetection.training_roidbs), filter_s, serialize_s
                (utils.serialized_list.SerializedList), the resident memory after each
                (rss_*_mb), serialized_mb and its ratio to the json's size on disk
    dataflow    per --workers W: `train.py`'s path to the first datapoint: imports_s
                (Python, TensorFlow, tensorpack, config), roidbs_s (get_train_dataflow),
                first_batch_s (workers forked, first datapoint), startup_s (all, from
                process start), peak_rss_startup_mb (main process) and peak_rss_loader_mb
                (the child that loads the roidbs, utils/forked.py); then main_rss_mb and workers_pss_mb (sum over the worker
                processes of Pss in /proc/PID/smaps_rollup: shared pages counted once) after
                the first batch, after each quarter of --batches more (quarters) and after
                them, and after a full garbage collection in the main process (a long run
                does one sooner or later)

One JSON line per measurement. Images are read by the real pipeline (240 x 320, short edge
240: preprocessing is cheap, the numbers are about the data path, not augmentation).
"""
import argparse
import gc
import json
import os
import resource
import sys
import time

_T0 = time.perf_counter()  # process start, as near as a script gets

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import harness  # noqa: E402

# COCO's 80 category ids (1..90 with gaps), in order.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
IMAGE_HW = (240, 320)
POOL = 8


def _annotation(rng, ann_id, image_id, crowd):
    """One COCO annotation dict: a box in the image, an ellipse-like polygon or a crowd RLE."""
    h, w = IMAGE_HW
    bw, bh = rng.uniform(8, 120, 2)
    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    ann = {'id': ann_id, 'image_id': image_id, 'category_id': COCO_IDS[rng.integers(80)],
           'iscrowd': int(crowd), 'bbox': [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
           'area': round(bw * bh * 0.78, 2)}
    if crowd:  # uncompressed column-major RLE of the box's pixels, as in COCO's json
        x0, y0, x1, y1 = int(x), int(y), int(x + bw), int(y + bh)
        counts = [x0 * h + y0]
        for _ in range(x0, x1):
            counts += [y1 - y0, h - (y1 - y0)]
        counts[-1] += h * w - sum(counts)
        ann['segmentation'] = {'size': [h, w], 'counts': counts}
    else:
        k = int(rng.integers(8, 41))
        angle = np.sort(rng.uniform(0, 2 * np.pi, k))
        radius = rng.uniform(0.7, 1.0, k)
        px = x + bw / 2 * (1 + radius * np.cos(angle))
        py = y + bh / 2 * (1 + radius * np.sin(angle))
        ann['segmentation'] = [np.round(np.stack([px, py], 1).reshape(-1), 2).tolist()]
    return ann


def write_dataset(basedir, num_images, num_instances, crowd_fraction, seed=0):
    """The synthetic COCO layout under ``basedir`` (module docstring); returns the json path."""
    import cv2
    path = os.path.join(basedir, 'annotations', 'instances_train2017.json')
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pool = os.path.join(basedir, 'train2017', 'pool')
    os.makedirs(pool, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(POOL):
        cv2.imwrite(os.path.join(pool, '{}.png'.format(k)),
                    rng.integers(0, 256, IMAGE_HW + (3,), dtype=np.uint8))
    owners = np.sort(rng.integers(1, num_images + 1, num_instances))
    crowd = rng.random(num_instances) < crowd_fraction
    with open(path + '.tmp', 'w') as f:
        f.write('{"info": {"description": "synthetic, bench/dataset_scale.py"}, "licenses": [],'
                ' "images": ')
        json.dump([{'id': i, 'file_name': 'pool/{}.png'.format(i % POOL), 'height': IMAGE_HW[0],
                    'width': IMAGE_HW[1]} for i in range(1, num_images + 1)], f)
        f.write(', "annotations": [')
        for start in range(0, num_instances, 20000):
            chunk = [_annotation(rng, i + 1, int(owners[i]), crowd[i])
                     for i in range(start, min(start + 20000, num_instances))]
            f.write((', ' if start else '') + json.dumps(chunk)[1:-1])
        f.write('], "categories": ')
        json.dump([{'id': c, 'name': 'class{}'.format(c), 'supercategory': 'none'}
                   for c in COCO_IDS], f)
        f.write('}')
    os.replace(path + '.tmp', path)
    return path


def rss_mb(pid='self'):
    """Current resident memory of a process (VmRSS), MB."""
    with open('/proc/{}/status'.format(pid)) as f:
        return int(next(ln for ln in f if ln.startswith('VmRSS')).split()[1]) / 1024.


def pss_mb(pid):
    """Proportional set size (shared pages divided among their sharers), MB."""
    with open('/proc/{}/smaps_rollup'.format(pid)) as f:
        return int(next(ln for ln in f if ln.startswith('Pss:')).split()[1]) / 1024.


def child_pids():
    """Processes whose parent is this one (the data workers)."""
    me, out = str(os.getpid()), []
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                with open('/proc/{}/stat'.format(name)) as f:
                    if f.read().rsplit(')', 1)[1].split()[1] == me:
                        out.append(int(name))
            except (OSError, IndexError):
                continue
    return sorted(out)


def memory_sample():
    workers = child_pids()
    return {'main_rss_mb': round(rss_mb(), 1), 'workers': len(workers),
            'workers_pss_mb': round(sum(pss_mb(p) for p in workers), 1)}


def measure_load(json_file):
    start = time.perf_counter()
    with open(json_file) as f:
        json.load(f)
    return {'load_s': round(time.perf_counter() - start, 2)}


def measure_roidbs(json_file, basedir):
    from data import _has_usable_box
    from dataset.coco import COCODetection
    from utils.serialized_list import SerializedList
    out, start = {}, time.perf_counter()

    def lap(name):
        nonlocal start
        now = time.perf_counter()
        out[name + '_s'] = round(now - start, 2)
        out['rss_after_' + name + '_mb'] = round(rss_mb(), 1)
        start = now
    split = COCODetection(json_file, os.path.join(basedir, 'train2017'))
    lap('json_load')
    roidbs = split.training_roidbs()
    lap('roidb_build')
    roidbs = [r for r in roidbs if _has_usable_box(r)]
    lap('filter')
    serialized = SerializedList(roidbs)
    lap('serialize')
    del split, roidbs
    gc.collect()
    out['rss_serialized_only_mb'] = round(rss_mb(), 1)
    out['serialized_mb'] = round(serialized.nbytes / 2**20, 1)
    out['serialized_over_json'] = round(serialized.nbytes / os.path.getsize(json_file), 2)
    out['images_kept'] = len(serialized)
    return out


def measure_dataflow(basedir, workers, batches, plain_list):
    import data
    from config import config as cfg
    harness.setup_config('r50-fpn', None, [
        'DATA.BASEDIR=' + basedir, "DATA.TRAIN=('coco_train2017',)",
        "DATA.VAL=('coco_train2017',)", 'DATA.NUM_WORKERS={}'.format(workers),
        'PREPROC.TRAIN_SHORT_EDGE_SIZE=[240,240]', 'PREPROC.TEST_SHORT_EDGE_SIZE=240',
        'PREPROC.MAX_SIZE=320'], is_training=True)
    if plain_list:  # what data.py did before: the roidbs as a Python list
        data.SerializedList = list
    out = {'imports_s': round(time.perf_counter() - _T0, 2)}
    start = time.perf_counter()
    df = data.get_train_dataflow()
    out['roidbs_s'] = round(time.perf_counter() - start, 2)
    # the roidbs are built in a child process (utils/forked.py), joined by now
    out['peak_rss_loader_mb'] = round(
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024., 1)
    start = time.perf_counter()
    df.reset_state()
    it = iter(df)
    next(it)
    out['first_batch_s'] = round(time.perf_counter() - start, 2)
    out['startup_s'] = round(time.perf_counter() - _T0, 2)
    out['peak_rss_startup_mb'] = round(harness.peak_rss_mb(), 1)
    out['after_first_batch'] = memory_sample()
    start, quarters = time.perf_counter(), []
    for k in range(1, batches + 1):
        next(it)
        if k % max(batches // 4, 1) == 0:  # growth or a plateau?
            quarters.append(memory_sample()['workers_pss_mb'])
    out['batches_per_s'] = round(batches / (time.perf_counter() - start), 1)
    out['workers_pss_quarters_mb'] = quarters
    out['after_batches'] = memory_sample()
    gc.collect()
    out['after_main_gc'] = memory_sample()
    out['mode_mask'] = cfg.MODE_MASK
    return out


def measure(phase, json_file, basedir, workers=None, batches=0, plain_list=False, **_):
    """One measurement (module docstring), in this fresh process."""
    if phase == 'load':
        out = measure_load(json_file)
    elif phase == 'roidbs':
        out = measure_roidbs(json_file, basedir)
    else:
        out = measure_dataflow(basedir, workers, batches, plain_list)
    cpu = harness.cpu_facts()
    return dict(out, phase=phase, workers=workers, plain_list=plain_list,
                json_mb=round(os.path.getsize(json_file) / 2**20, 1),
                peak_rss_mb=round(harness.peak_rss_mb(), 1), cpu=cpu['cpu'],
                cores=cpu['cores'], load_avg=harness.load_average())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=118287, help='default: COCO train2017')
    p.add_argument('--instances', type=int, default=860001, help='default: COCO train2017')
    p.add_argument('--crowd', type=float, default=0.01, help='fraction of crowd RLEs')
    p.add_argument('--workdir', default=os.path.expanduser('~/.cache/rcnn_bench_scale'),
                   help='the synthetic dataset is written (once per size) under this folder')
    p.add_argument('--phases', nargs='+', choices=['load', 'roidbs', 'dataflow'],
                   default=['load', 'roidbs', 'dataflow'])
    p.add_argument('--workers', type=int, nargs='+', default=[1, 4],
                   help='DATA.NUM_WORKERS of the dataflow measurements')
    p.add_argument('--batches', type=int, default=1000, help='datapoints after the first')
    p.add_argument('--plain-list', action='store_true',
                   help='dataflow with the roidbs as a Python list (the old way), to compare')
    p.add_argument('--job', help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = p.parse_args(argv)
    if args.job:
        return harness.run_job(measure, args.job)
    basedir = os.path.join(args.workdir, '{}img-{}inst-{}crowd'.format(
        args.images, args.instances, args.crowd))
    start = time.perf_counter()
    json_file = write_dataset(basedir, args.images, args.instances, args.crowd)
    print(json.dumps({'phase': 'write', 'json_file': json_file, 'write_s': round(
        time.perf_counter() - start, 1), 'json_mb': round(os.path.getsize(json_file) / 2**20, 1)}),
        flush=True)
    jobs = [{'phase': ph, 'json_file': json_file, 'basedir': basedir, 'profile': 'r50-fpn'}
            for ph in args.phases if ph != 'dataflow']
    if 'dataflow' in args.phases:
        jobs += [{'phase': 'dataflow', 'json_file': json_file, 'basedir': basedir,
                  'workers': w, 'batches': args.batches, 'plain_list': args.plain_list,
                  'profile': 'r50-fpn'} for w in args.workers]
    for job in jobs:
        print(json.dumps(harness.run_isolated(__file__, job)), flush=True)


if __name__ == '__main__':
    harness.run_main(main)
