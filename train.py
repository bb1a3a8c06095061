#!/usr/bin/env python
"""Train Faster / Mask / Cascade R-CNN.

    python train.py --config DATA.BASEDIR=~/data/coco MODE_FPN=True
    python train.py --config-file configs/shapes_demo.yaml --logdir train_log/demo
    horovodrun -np 2 -H localhost:2 python train.py --config TRAINER=horovod ...
"""
import utils.compat  # noqa: F401  (must come before TensorFlow)

import argparse
import logging
import os
import sys

from cli import USER_ERRORS, add_config_arguments, pruned_model_config, setup_config
from config import config as cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--logdir', default='train_log/maskrcnn',
                   help='log and checkpoint directory; an existing one is resumed, never deleted')
    p.add_argument('--load', help='initial weights: an .npz file or a TF checkpoint; a pruned '
                                  'model (prune.py\'s output folder) brings its config along')
    p.add_argument('--load-skip', default='',
                   help='regex of variable names NOT to load from --load (e.g. "fastrcnn/")')
    add_config_arguments(p)
    return p.parse_args(argv)


def _devices():
    """(rank, DevicePlan, ranks on this machine): Horovod's, else one process."""
    from utils.training import plan_devices
    if cfg.TRAINER == 'horovod':
        import horovod.tensorflow as hvd
        hvd.init()
        plan = plan_devices(cfg.TRAINER, cfg.TRAIN.NUM_GPUS, hvd.rank(), hvd.size())
        return hvd.rank(), plan, hvd.local_size()
    return 0, plan_devices(cfg.TRAINER, cfg.TRAIN.NUM_GPUS), 1


def _session_init(args, resume_ckpt):
    """What the variables start from: the checkpoint resumed, else --load / weights."""
    from tensorpack.tfutils.sessinit import SaverRestore

    from utils.training import WeightsLoader
    if resume_ckpt:
        return SaverRestore(resume_ckpt)  # everything, optimizer state too
    if args.load or cfg.BACKBONE.WEIGHTS:
        return WeightsLoader(args.load or os.path.expanduser(cfg.BACKBONE.WEIGHTS),
                             skip_regex=args.load_skip)
    return None


def _callbacks(logdir, schedule, guard, num_devices, rank):
    """The trainer's callbacks; ``guard`` (the NonFiniteGuard) first."""
    from tensorpack.callbacks import (EnableCallbackIf, EstimatedTimeLeft, ModelSaver,
                                      SessionRunTimeout, ThroughputTracker)

    from utils.training import DUMP_WEIGHTS_ENV, DumpWeights, HostMemoryTracker, LRSetter

    def at_checkpoint(cb):
        return cb.epoch_num % cfg.TRAIN.CHECKPOINT_PERIOD == 0 or \
            cb.epoch_num == cb.trainer.max_epoch

    callbacks = [
        guard,  # first: its end-of-epoch weight check must precede the ModelSaver
        EnableCallbackIf(ModelSaver(max_to_keep=10, keep_checkpoint_every_n_hours=1,
                                    checkpoint_dir=logdir), at_checkpoint),
        LRSetter(schedule),
        ThroughputTracker(samples_per_step=num_devices * cfg.TRAIN.IMAGES_PER_DEVICE),
        EstimatedTimeLeft(median=True),
        HostMemoryTracker(),
        SessionRunTimeout(60000),
    ]
    if cfg.TRAIN.EVAL_PERIOD > 0:
        from eval import EvalCallback
        callbacks.append(EvalCallback())
    if os.environ.get(DUMP_WEIGHTS_ENV):  # tests: compare the ranks' final weights
        callbacks.append(DumpWeights(os.environ[DUMP_WEIGHTS_ENV], rank))
    return callbacks


def _trainer(plan):
    from tensorpack.train import HorovodTrainer, SimpleTrainer, SyncMultiGPUTrainerReplicated
    if plan.trainer == 'horovod':
        return HorovodTrainer(average=True)
    if plan.trainer == 'replicated':
        return SyncMultiGPUTrainerReplicated(plan.num_devices, average=True, mode='nccl')
    return SimpleTrainer()


def train(args):
    """Configure, then resume from --logdir's latest checkpoint or start (from --load, or
    from scratch), and train to the end of the scaled schedule.

    Raises:
        one of cli.USER_ERRORS on input the user can fix, or TrainingDiverged.
    """
    run_config = os.path.join(args.logdir, 'config.yaml')
    pruned = None if os.path.isfile(run_config) else pruned_model_config(args.load)
    if pruned:  # a new run from a pruned model: its layer widths (and config) come with it
        run_config = pruned
        if args.config_file is None:
            args.config_file = pruned
            print('train.py: using the pruned model\'s config {}'.format(pruned))
    setup_config(args, is_training=True, run_config=run_config)

    import tensorflow as tf
    from tensorpack import logger
    from tensorpack.train import TrainConfig, launch_train_with_config

    from data import get_train_dataflow
    from modeling.generalized_rcnn import build_model
    from utils.precision import session_creator
    from utils.training import (NonFiniteGuard, ScaledSchedule, add_log_file,
                                find_resume_checkpoint, write_config)

    rank, plan, local_ranks = _devices()
    num_devices = plan.num_devices
    tf.compat.v1.set_random_seed(cfg.TRAIN.SEED + rank)
    schedule = ScaledSchedule(num_devices)

    # Everything that can fail on a bad path is checked before the log directory is made.
    resume_ckpt, resume_step = find_resume_checkpoint(args.logdir)
    session_init = _session_init(args, resume_ckpt)
    if rank == 0:
        logger.set_logger_dir(args.logdir, action='k')  # keep: resuming must lose nothing
        add_log_file(args.logdir)
        write_config(args.logdir)
        logger.info('Config:\n' + str(cfg))
    logger.info('Schedule: ' + schedule.describe())
    if resume_ckpt:
        logger.info('Resuming from {} (global step {}).'.format(resume_ckpt, resume_step))
        if args.load:
            logger.warn('--load {} is ignored: resuming from {}.'.format(args.load, resume_ckpt))
        if resume_step >= schedule.total_iters:
            logger.info('Nothing to do: the schedule ends at global step {} '
                        '(raise TRAIN.LR_SCHEDULE to train longer).'.format(schedule.total_iters))
            return

    guard = NonFiniteGuard(schedule, checkpoint_dir=args.logdir)
    dataflow = get_train_dataflow(shard=plan.shard)
    traincfg = TrainConfig(
        model=build_model(), data=None, dataflow=dataflow,
        callbacks=_callbacks(args.logdir, schedule, guard, num_devices, rank),
        steps_per_epoch=cfg.TRAIN.STEPS_PER_EPOCH,
        starting_epoch=resume_step // cfg.TRAIN.STEPS_PER_EPOCH + 1,
        max_epoch=schedule.max_epoch, session_init=session_init,
        # threads shared fairly by the ranks on this machine; TRAIN.PRECISION's graph rewrite
        session_creator=session_creator(cfg.TRAIN.PRECISION, processes_per_machine=local_ranks))
    launch_train_with_config(traincfg, _trainer(plan))
    guard.raise_if_diverged()


def main(args):
    """Train; a user error ends with one "Error: ..." line on stderr and exit status 1."""
    # our modules log through `logging` (tensorpack's logger does not propagate)
    logging.basicConfig(level=logging.INFO, format='[%(asctime)s %(name)s] %(message)s',
                        datefmt='%m%d %H:%M:%S')
    try:
        train(args)
    except USER_ERRORS as e:  # the user can fix these: one line, no traceback
        sys.exit('Error: {}'.format(e))


if __name__ == '__main__':
    main(parse_args())
