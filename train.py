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

from config import config as cfg, finalize_configs, legacy_values
from utils.training import USER_ERRORS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--logdir', default='train_log/maskrcnn',
                   help='log and checkpoint directory; an existing one is resumed, never deleted')
    p.add_argument('--load', help='initial weights: an .npz file or a TF checkpoint')
    p.add_argument('--load-skip', default='',
                   help='regex of variable names NOT to load from --load (e.g. "fastrcnn/")')
    p.add_argument('--config-file', help='a YAML config file, applied before --config')
    p.add_argument('--config', nargs='+', default=[], metavar='KEY=VALUE',
                   help='config overrides; values are Python literals, e.g. MODE_MASK=False')
    return p.parse_args(argv)


def setup_config(args, is_training, run_config=None):
    """Register datasets, apply --config-file then --config, finalise (ConfigError if bad).

    ``run_config``: the config.yaml of the run being resumed or predicted with (None or a
    missing file: a new run). Keys it lacks (it was written before they existed) first get
    the value that keeps the old behaviour (``config.LEGACY_VALUES``, e.g. the old anchor
    layout); --config-file and --config still override them.
    """
    from dataset import register_builtin_datasets
    if run_config and os.path.isfile(run_config):
        for key, value in legacy_values(run_config).items():
            cfg.set_value(key, value)
    if args.config_file:
        cfg.load_yaml(args.config_file)
    cfg.update_args(args.config)
    register_builtin_datasets(os.path.expanduser(cfg.DATA.BASEDIR), cfg.DATA.COCO_JSON_SPLITS,
                              cfg.DATA.TRAIN, cfg.DATA.DROP_UNUSED_CATEGORIES)
    finalize_configs(is_training=is_training)


def train(args):
    """Configure, then resume from --logdir's latest checkpoint or start (from --load, or
    from scratch), and train to the end of the scaled schedule.

    Raises:
        one of utils.training.USER_ERRORS on input the user can fix, or TrainingDiverged.
    """
    setup_config(args, is_training=True, run_config=os.path.join(args.logdir, 'config.yaml'))

    import tensorflow as tf
    from tensorpack import logger
    from tensorpack.callbacks import (EnableCallbackIf, EstimatedTimeLeft, ModelSaver,
                                      SessionRunTimeout, ThroughputTracker)
    from tensorpack.tfutils.sessinit import SaverRestore
    from tensorpack.train import (HorovodTrainer, SimpleTrainer, SyncMultiGPUTrainerReplicated,
                                  TrainConfig, launch_train_with_config)

    from data import get_train_dataflow
    from modeling.generalized_rcnn import ResNetC4Model, ResNetFPNModel
    from utils.training import (DUMP_WEIGHTS_ENV, DumpWeights, HostMemoryTracker, LRSetter,
                                NonFiniteGuard, ScaledSchedule, WeightsLoader, add_log_file,
                                find_resume_checkpoint, plan_devices, write_config)
    from utils.precision import session_creator

    if cfg.TRAINER == 'horovod':
        import horovod.tensorflow as hvd
        hvd.init()
        rank, local_ranks = hvd.rank(), hvd.local_size()
        plan = plan_devices(cfg.TRAINER, cfg.TRAIN.NUM_GPUS, rank, hvd.size())
    else:
        rank, local_ranks = 0, 1
        plan = plan_devices(cfg.TRAINER, cfg.TRAIN.NUM_GPUS)
    num_devices = plan.num_devices
    is_chief = rank == 0
    tf.compat.v1.set_random_seed(cfg.TRAIN.SEED + rank)
    schedule = ScaledSchedule(num_devices)

    # Everything that can fail on a bad path is checked before the log directory is made.
    resume_ckpt, resume_step = find_resume_checkpoint(args.logdir)
    if resume_ckpt:
        session_init = SaverRestore(resume_ckpt)  # everything, optimizer state too
    elif args.load or cfg.BACKBONE.WEIGHTS:
        session_init = WeightsLoader(args.load or os.path.expanduser(cfg.BACKBONE.WEIGHTS),
                                     skip_regex=args.load_skip)
    else:
        session_init = None

    if is_chief:
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
    starting_epoch = resume_step // cfg.TRAIN.STEPS_PER_EPOCH + 1

    def at_checkpoint(cb):
        return cb.epoch_num % cfg.TRAIN.CHECKPOINT_PERIOD == 0 or \
            cb.epoch_num == cb.trainer.max_epoch

    guard = NonFiniteGuard(schedule, checkpoint_dir=args.logdir)
    callbacks = [
        guard,  # first: its end-of-epoch weight check must precede the ModelSaver
        EnableCallbackIf(ModelSaver(max_to_keep=10, keep_checkpoint_every_n_hours=1,
                                    checkpoint_dir=args.logdir), at_checkpoint),
        LRSetter(schedule),
        ThroughputTracker(samples_per_step=num_devices),
        EstimatedTimeLeft(median=True),
        HostMemoryTracker(),
        SessionRunTimeout(60000),
    ]
    if cfg.TRAIN.EVAL_PERIOD > 0:
        from eval import EvalCallback
        callbacks.append(EvalCallback())
    if os.environ.get(DUMP_WEIGHTS_ENV):  # tests: compare the ranks' final weights
        callbacks.append(DumpWeights(os.environ[DUMP_WEIGHTS_ENV], rank))

    model = ResNetFPNModel() if cfg.MODE_FPN else ResNetC4Model()
    dataflow = get_train_dataflow(shard=plan.shard)
    traincfg = TrainConfig(
        model=model, data=None, dataflow=dataflow, callbacks=callbacks,
        steps_per_epoch=cfg.TRAIN.STEPS_PER_EPOCH, starting_epoch=starting_epoch,
        max_epoch=schedule.max_epoch, session_init=session_init,
        # threads shared fairly by the ranks on this machine; TRAIN.PRECISION's graph rewrite
        session_creator=session_creator(cfg.TRAIN.PRECISION, processes_per_machine=local_ranks))
    if plan.trainer == 'horovod':
        trainer = HorovodTrainer(average=True)
    elif plan.trainer == 'replicated':
        trainer = SyncMultiGPUTrainerReplicated(num_devices, average=True, mode='nccl')
    else:
        trainer = SimpleTrainer()
    launch_train_with_config(traincfg, trainer)
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
