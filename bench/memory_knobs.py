#!/usr/bin/env python
"""What each memory knob buys: peak memory and step time, one knob at a time.

    python bench/memory_knobs.py                       # every knob below
    python bench/memory_knobs.py --knobs depth accumulation --steps 2

The base is ResNet-50 FPN Mask R-CNN (FreezeBN, FREEZE_AT=2, RPN / Fast R-CNN defaults)
on images of short edge 512 and MAX_SIZE 853, trained on a synthetic 768 x 1280 scene with
``--instances`` shapes (resized to 512 x 853). Each row changes ONE key of the base and is
measured in a fresh process by `bench/dense.py` (same step definition: preprocessing +
one optimizer step; peak RSS of the process). Prints one JSON line per row: ``knob``,
``value``, ``overrides`` and the fields of bench/dense.py.

Images per step: the 'images_per_device' rows feed N such scenes (other seeds) per step
(TRAIN.IMAGES_PER_DEVICE, one padded batch); TRAIN.GRADIENT_ACCUMULATION k instead makes
the update average k one-image steps (a k times larger batch) at the cost of one
accumulator per trainable variable, measured by the 'accumulation' rows.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import harness  # noqa: E402
from bench.dense import run_isolated  # noqa: E402

BASE = ['BACKBONE.DEPTH=50', 'PREPROC.TRAIN_SHORT_EDGE_SIZE=[512,512]',
        'PREPROC.TEST_SHORT_EDGE_SIZE=512', 'PREPROC.MAX_SIZE=853']


def _size(short, max_size):
    return ['PREPROC.TRAIN_SHORT_EDGE_SIZE=[{0},{0}]'.format(short),
            'PREPROC.TEST_SHORT_EDGE_SIZE={}'.format(short),
            'PREPROC.MAX_SIZE={}'.format(max_size)]


def _topk(k):
    """FPN proposals kept per level and overall in training."""
    return ['RPN.TRAIN_PER_LEVEL_NMS_TOPK={}'.format(k), 'RPN.TRAIN_POST_NMS_TOPK={}'.format(k)]


# knob -> [(value label, overrides on top of BASE)]; the base itself is the row 'base'.
KNOBS = {
    'depth': [(d, ['BACKBONE.DEPTH={}'.format(d)]) for d in (18, 34, 101)],
    'trainable': [(t, ['BACKBONE.TRAINABLE=' + t]) for t in ('heads', '4+', '3+')],
    'image_size': [('384/640', _size(384, 640)), ('640/1066', _size(640, 1066)),
                   ('800/1333', _size(800, 1333))],
    'rois_per_image': [(n, ['FRCNN.BATCH_PER_IM={}'.format(n)]) for n in (128, 256)],
    'rpn_proposals': [(k, _topk(k)) for k in (500, 1000)],
    'max_gt_instances': [(n, ['DATA.MAX_GT_INSTANCES={}'.format(n)]) for n in (100,)],
    'crop': [(c, ['PREPROC.CROP_SIZE={}'.format(c)]) for c in (256, 384)],
    'accumulation': [(k, ['TRAIN.GRADIENT_ACCUMULATION={}'.format(k)]) for k in (2, 4)],
    'images_per_device': [(n, ['TRAIN.IMAGES_PER_DEVICE={}'.format(n)]) for n in (2, 4)],
}
BASE_VALUES = {'depth': 50, 'trainable': 'all', 'image_size': '512/853',
               'rois_per_image': 512, 'rpn_proposals': 2000, 'max_gt_instances': 0,
               'crop': 0, 'accumulation': 1, 'images_per_device': 1}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--knobs', nargs='+', choices=sorted(KNOBS), default=list(KNOBS))
    p.add_argument('--instances', type=int, default=500)
    p.add_argument('--image-size', type=int, nargs=2, default=[768, 1280], metavar=('H', 'W'))
    p.add_argument('--steps', type=int, default=2, help='timed steps (median reported)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--no-base', action='store_true', help='skip the base row')
    p.add_argument('--config', nargs='+', default=[], metavar='KEY=VALUE',
                   help='applied to the base (and so to every row)')
    args = p.parse_args(argv)
    rows = [] if args.no_base else [('base', 'base', [])]
    rows += [(k, v, o) for k in args.knobs for v, o in KNOBS[k]]
    for knob, value, overrides in rows:
        job = {'config': BASE + args.config + overrides, 'instances': args.instances,
               'image_hw': args.image_size, 'steps': args.steps, 'warmup': args.warmup}
        try:
            result = run_isolated(job)
        except RuntimeError as e:  # e.g. out of memory: report it as a row and go on
            result = {'error': str(e)[-500:]}
        record = {'knob': knob, 'value': value, 'base_value': BASE_VALUES.get(knob),
                  'overrides': overrides}
        record.update(result)
        print(json.dumps(record), flush=True)


if __name__ == '__main__':
    harness.run_main(main)
