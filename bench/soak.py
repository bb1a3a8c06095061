#!/usr/bin/env python
"""Soak test: resident memory stays flat over a long prediction and a long training run.

    python bench/soak.py                              # 500 images, then 500 steps
    python bench/soak.py --images 100 --steps 100 --every 25

A tiny model (ResNet-18 FPN Mask R-CNN, 128-160 px synthetic shapes images, narrow heads)
so that the run takes minutes on a CPU. Phase "predict": predict.py's predictor (random
weights) on --images shapes_val images, one at a time, as `predict.py --predict` does.
Phase "train": tensorpack's SimpleTrainer, as train.py uses on one device, on the training
dataflow (`data.get_train_dataflow`, preprocessing in this process so that its memory
counts), for --steps steps. Both run in this one process, one after the other.

The resident set size of this process (/proc/self/statm) is sampled every --every images
or steps. Prints one JSON line per phase: the samples, ``growth`` = (last sample - sample
at the end of warm-up) / that sample, with warm-up = the first --warmup images / steps,
and ``ok``: growth below --max-growth (5 %). Exit status 1 if a phase is not ok.
"""
import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import harness  # noqa: E402

TINY = [  # tests/tiny.py's model
    'DATA.TRAIN=shapes_train', 'DATA.VAL=shapes_val', 'DATA.NUM_WORKERS=0',
    'BACKBONE.DEPTH=18', 'BACKBONE.NORM=GN', 'BACKBONE.FREEZE_AT=0',
    'PREPROC.TRAIN_SHORT_EDGE_SIZE=[128,160]', 'PREPROC.TEST_SHORT_EDGE_SIZE=128',
    'PREPROC.MAX_SIZE=192', 'RPN.ANCHOR_SIZES=(16,32,64,128,256)', 'RPN.HEAD_DIM=64',
    'RPN.BATCH_PER_IM=64', 'RPN.TRAIN_PRE_NMS_TOPK=300', 'RPN.TRAIN_POST_NMS_TOPK=100',
    'RPN.TEST_PRE_NMS_TOPK=300', 'RPN.TEST_POST_NMS_TOPK=100',
    'RPN.TRAIN_PER_LEVEL_NMS_TOPK=100', 'RPN.TEST_PER_LEVEL_NMS_TOPK=100',
    'FRCNN.BATCH_PER_IM=64', 'FPN.NUM_CHANNEL=32', 'FPN.FRCNN_CONV_HEAD_DIM=32',
    'FPN.FRCNN_FC_HEAD_DIM=64', 'MRCNN.HEAD_DIM=32', 'MRCNN.GT_MASK_SIZE=56',
    'TEST.RESULTS_PER_IM=20',
]


def rss_mb():
    """Current resident set size of this process, MB."""
    with open('/proc/self/statm') as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def summary(phase, samples, warmup, max_growth):
    """The JSON record of one phase; ``samples``: [(images or steps done, RSS MB)]."""
    base = next(rss for done, rss in samples if done >= warmup)
    growth = (samples[-1][1] - base) / base
    return {'phase': phase, 'samples': [[n, round(r, 1)] for n, r in samples],
            'rss_after_warmup_mb': round(base, 1), 'rss_end_mb': round(samples[-1][1], 1),
            'growth': round(growth, 4), 'ok': growth < max_growth}


def soak_predict(num_images, every):
    """Predict ``num_images`` shapes_val images (cycling); RSS samples every ``every``."""
    import itertools

    from common import read_image
    from dataset import DatasetRegistry
    from eval import predict_image
    from predict import build_predictor
    from config import config as cfg
    roidbs = DatasetRegistry.get(cfg.DATA.VAL[0]).inference_roidbs()
    predictor = build_predictor(None)
    samples = [(0, rss_mb())]
    for done, roidb in enumerate(itertools.islice(itertools.cycle(roidbs), num_images), 1):
        predict_image(read_image(roidb['file_name']), predictor, mask_format='rle')
        if done % every == 0:
            samples.append((done, rss_mb()))
    return samples


def soak_train(steps, every):
    """Train ``steps`` steps with tensorpack's SimpleTrainer; RSS samples every ``every``."""
    from tensorpack.callbacks import Callback
    from tensorpack.train import SimpleTrainer, TrainConfig, launch_train_with_config

    from data import get_train_dataflow
    from modeling.generalized_rcnn import build_model
    samples = [(0, rss_mb())]

    class SampleRSS(Callback):
        def _trigger_step(self):
            if self.global_step % every == 0:
                samples.append((self.global_step, rss_mb()))

        def _after_train(self):
            if samples[-1][0] != self.global_step:
                samples.append((self.global_step, rss_mb()))

    launch_train_with_config(TrainConfig(
        model=build_model(), dataflow=get_train_dataflow(), callbacks=[SampleRSS()],
        steps_per_epoch=every, max_epoch=steps // every, monitors=[]), SimpleTrainer())
    return samples


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=500)
    p.add_argument('--steps', type=int, default=500)
    p.add_argument('--every', type=int, default=50, help='RSS sample period')
    p.add_argument('--warmup', type=int, default=100, help='images / steps before the baseline')
    p.add_argument('--max-growth', type=float, default=0.05)
    p.add_argument('--config', nargs='+', default=[], metavar='KEY=VALUE',
                   help='applied on top of the tiny model')
    args = p.parse_args(argv)
    import utils.compat  # noqa: F401  (before TensorFlow)
    from tensorpack.utils import logger

    from cli import USER_ERRORS
    try:
        harness.setup_config('r50-fpn', None, TINY + args.config, is_training=True)
    except USER_ERRORS as e:
        sys.exit('Error: {}'.format(e))
    with tempfile.TemporaryDirectory() as logdir:  # tensorpack's log, thrown away
        logger.set_logger_dir(logdir, action='k')
        records = [summary('predict', soak_predict(args.images, args.every), args.warmup,
                           args.max_growth),
                   summary('train', soak_train(args.steps, args.every), args.warmup,
                           args.max_growth)]
    for record in records:
        record.update(cpu=harness.cpu_facts()['cpu'], load_avg=harness.load_average())
        print(json.dumps(record), flush=True)
    return 0 if all(r['ok'] for r in records) else 1


if __name__ == '__main__':
    sys.exit(main())
