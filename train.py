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

from config import ConfigError, config as cfg, finalize_configs


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


def setup_config(args, is_training):
    """Register datasets, apply --config-file then --config, finalise. Exits on bad input."""
    from dataset import register_builtin_datasets
    try:
        if args.config_file:
            cfg.load_yaml(args.config_file)
        cfg.update_args(args.config)
        register_builtin_datasets(os.path.expanduser(cfg.DATA.BASEDIR))
        finalize_configs(is_training=is_training)
    except ConfigError as e:
        sys.exit('Config error: {}'.format(e))


def main(args):
    # our modules log through `logging` (tensorpack's logger does not propagate)
    logging.basicConfig(level=logging.INFO, format='[%(asctime)s %(name)s] %(message)s',
                        datefmt='%m%d %H:%M:%S')
    setup_config(args, is_training=True)

    import tensorflow as tf
    from tensorpack import logger
    from tensorpack.callbacks import (EnableCallbackIf, EstimatedTimeLeft, ModelSaver,
                                      SessionRunTimeout, ThroughputTracker)
    from tensorpack.tfutils.sessinit import SaverRestore
    from tensorpack.train import (HorovodTrainer, SimpleTrainer, SyncMultiGPUTrainerReplicated,
                                  TrainConfig, launch_train_with_config)

    from data import get_train_dataflow
    from modeling.generalized_rcnn import ResNetC4Model, ResNetFPNModel
    from utils.training import (HostMemoryTracker, LRSetter, ScaledSchedule, UserInputError,
                                WeightsLoader, find_resume_checkpoint)

    if cfg.TRAINER == 'horovod':
        import horovod.tensorflow as hvd
        hvd.init()
        rank, num_devices = hvd.rank(), hvd.size()
    else:
        rank, num_devices = 0, max(cfg.TRAIN.NUM_GPUS, 1)
    is_chief = rank == 0
    tf.compat.v1.set_random_seed(cfg.TRAIN.SEED + rank)

    if is_chief:
        logger.set_logger_dir(args.logdir, action='k')  # keep: resuming must lose nothing
        cfg.save_yaml(os.path.join(args.logdir, 'config.yaml'))
        logger.info('Config:\n' + str(cfg))

    schedule = ScaledSchedule(num_devices)
    logger.info('Schedule: ' + schedule.describe())

    resume_ckpt, resume_step = find_resume_checkpoint(args.logdir)
    try:
        if resume_ckpt:
            logger.info('Resuming from {} (global step {}).'.format(resume_ckpt, resume_step))
            session_init = SaverRestore(resume_ckpt)  # everything, optimizer state too
        elif args.load:
            session_init = WeightsLoader(args.load, skip_regex=args.load_skip)
        else:
            session_init = None
    except UserInputError as e:
        sys.exit(str(e))
    starting_epoch = resume_step // cfg.TRAIN.STEPS_PER_EPOCH + 1

    def at_checkpoint(cb):
        return cb.epoch_num % cfg.TRAIN.CHECKPOINT_PERIOD == 0 or \
            cb.epoch_num == cb.trainer.max_epoch

    callbacks = [
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

    model = ResNetFPNModel() if cfg.MODE_FPN else ResNetC4Model()
    dataflow = get_train_dataflow(shard=(rank, num_devices) if num_devices > 1 else None)
    traincfg = TrainConfig(
        model=model, data=None, dataflow=dataflow, callbacks=callbacks,
        steps_per_epoch=cfg.TRAIN.STEPS_PER_EPOCH, starting_epoch=starting_epoch,
        max_epoch=schedule.max_epoch, session_init=session_init)
    if cfg.TRAINER == 'horovod':
        trainer = HorovodTrainer(average=True)
    elif num_devices > 1:
        trainer = SyncMultiGPUTrainerReplicated(num_devices, average=True, mode='nccl')
    else:
        trainer = SimpleTrainer()
    launch_train_with_config(traincfg, trainer)


if __name__ == '__main__':
    main(parse_args())
