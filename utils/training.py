"""Training helpers behind train.py: LR schedule, resume, weight loading, the non-finite
loss guard, host memory, log and config files.

Nothing here builds the model; train.py wires these into one tensorpack trainer.
"""
import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

import collections
import filecmp
import glob
import logging
import math
import os
import re
import resource
import time

import numpy as np
import tensorflow as tf
from tensorpack.callbacks import Callback, HyperParamSetter
from tensorpack.tfutils.sessinit import SessionInit
from tensorpack.tfutils.varmanip import dump_session_params
from tensorpack.train.base import StopTraining
from tensorpack.utils import logger

from config import config as cfg

# Set to a path prefix to make every rank write <prefix>.rank<k>.npz after training (tests).
DUMP_WEIGHTS_ENV = 'RCNN_TEST_DUMP_WEIGHTS'
# Variables of the training run, not of the model: optimizer slots, the step, the LR and
# the moving averages of the logged losses. Never loaded as weights, never pruned.
TRAINING_STATE = re.compile(r'(Momentum|global_step|AccumGrad|learning_rate|^EMA/)')


class UserInputError(Exception):
    """A problem the user can fix (bad path, ...): train.py prints it without traceback."""


class TrainingDiverged(StopTraining):
    """A loss or a weight became NaN or Inf; the message says where and what to try.

    A `StopTraining`, so tensorpack ends the loop cleanly (after_train runs, nothing more is
    saved); `NonFiniteGuard.raise_if_diverged` re-raises it once training has returned.
    """


class DevicePlan(collections.namedtuple('DevicePlan', 'trainer num_devices shard')):
    """How a training run uses its devices: ``trainer`` 'simple', 'replicated' or 'horovod';
    ``num_devices`` images per iteration; ``shard`` (rank, size) of the training data this
    process reads, or None for all of it."""


def plan_devices(trainer, num_gpus, rank=0, size=1):
    """The trainer that runs and the data shard it reads (pure: no TensorFlow, no devices).

    Only Horovod shards: its ranks are separate processes, each with its own dataflow.
    A replicated trainer is ONE process whose towers each dequeue their own datapoints
    from one shared input queue, so that process must read every image.

    Args:
        trainer (str): cfg.TRAINER, 'replicated' or 'horovod'.
        num_gpus (int): GPUs visible to this process (0 on CPU).
        rank, size (int): this Horovod rank and the number of ranks (horovod only).
    """
    if trainer == 'horovod':
        return DevicePlan('horovod', size, (rank, size) if size > 1 else None)
    if num_gpus > 1:
        return DevicePlan('replicated', num_gpus, None)
    return DevicePlan('simple', 1, None)


class ScaledSchedule:
    """The recipe's schedule (defined at TRAIN.REFERENCE_BATCH images) in this run's steps.

    One *iteration* (a tensorpack step, one global_step) processes ``num_devices`` x
    TRAIN.IMAGES_PER_DEVICE images;
    an optimizer *update* happens every TRAIN.GRADIENT_ACCUMULATION iterations. With total
    batch B per update, the LR is scaled by B / REFERENCE_BATCH and every step count of
    the recipe by REFERENCE_BATCH / B (linear scaling rule), then converted to iterations.
    """

    def __init__(self, num_devices):
        self.accum = cfg.TRAIN.GRADIENT_ACCUMULATION
        self.images = cfg.TRAIN.IMAGES_PER_DEVICE
        self.total_batch = max(num_devices, 1) * self.images * self.accum
        self.factor = self.total_batch / cfg.TRAIN.REFERENCE_BATCH
        self.base_lr = cfg.TRAIN.BASE_LR * self.factor
        self.warmup_init_lr = cfg.TRAIN.WARMUP_INIT_LR * self.factor
        self.warmup_iters = self.to_iterations(cfg.TRAIN.WARMUP)
        self.decay_iters = [self.to_iterations(s) for s in cfg.TRAIN.LR_SCHEDULE[:-1]]
        self.total_iters = self.to_iterations(cfg.TRAIN.LR_SCHEDULE[-1])
        self.max_epoch = max(1, int(np.ceil(self.total_iters / cfg.TRAIN.STEPS_PER_EPOCH)))

    def to_iterations(self, reference_steps):
        return int(round(reference_steps / self.factor * self.accum))

    def lr_at(self, iteration):
        """Learning rate at a global step: linear warm-up, then x0.1 at each decay step."""
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            return self.warmup_init_lr * (1 - alpha) + self.base_lr * alpha
        return self.base_lr * 0.1 ** sum(iteration >= s for s in self.decay_iters)

    def describe(self):
        return ('total batch {} ({} device(s) x {} image(s) x {} accumulation): LR {:.5g}, '
                'warm-up {} iterations, decay at {}, {} iterations = {} epochs of {}'.format(
                    self.total_batch, self.total_batch // (self.accum * self.images),
                    self.images, self.accum, self.base_lr,
                    self.warmup_iters, self.decay_iters, self.total_iters, self.max_epoch,
                    cfg.TRAIN.STEPS_PER_EPOCH))


class LRSetter(HyperParamSetter):
    """Sets `learning_rate` from the global step every iteration, so a resumed run gets
    exactly the LR it would have had."""

    def __init__(self, schedule):
        super().__init__('learning_rate')
        self._schedule = schedule

    def _get_value_to_set(self):
        return self._schedule.lr_at(self.global_step)

    def _trigger_step(self):
        self.trigger()


class HostMemoryTracker(Callback):
    """Logs the peak resident memory of this process and of its finished children (MB)."""

    _chief_only = False

    def _trigger_epoch(self):
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.
        self.trainer.monitors.put_scalar('peak_host_memory_mb', own)
        if children:
            self.trainer.monitors.put_scalar('peak_child_memory_mb', children)


def find_resume_checkpoint(logdir):
    """The latest checkpoint in ``logdir`` and its global step, or (None, 0)."""
    ckpt = tf.train.latest_checkpoint(logdir) if os.path.isdir(logdir) else None
    if not ckpt:
        return None, 0
    return ckpt, int(re.search(r'-(\d+)$', ckpt).group(1))


def read_weights(path):
    """All arrays of a weights file: ``.npz`` or a TF checkpoint (prefix, index or dir).

    Returns:
        dict: variable name (without ``:0``) -> ndarray.
    """
    if path.endswith('.npz'):
        if not os.path.isfile(path):
            raise UserInputError('--load: weights file "{}" does not exist.'.format(path))
        with np.load(path) as f:
            return {k[:-2] if k.endswith(':0') else k: f[k] for k in f.files}
    if os.path.isdir(path):
        ckpt = tf.train.latest_checkpoint(path)
        if ckpt is None:
            raise UserInputError('--load: no checkpoint found in directory "{}".'.format(path))
        path = ckpt
    path = re.sub(r'\.(index|data-\d+-of-\d+)$', '', path)
    if not glob.glob(path + '.index'):
        if not glob.glob(path + '*'):
            raise UserInputError('--load: "{}" does not exist.'.format(path))
        raise UserInputError('--load: "{}" is neither an .npz file nor a TF checkpoint.'
                             .format(path))
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


class WeightsLoader(SessionInit):
    """Load weights by variable name, skipping what does not fit, and saying so.

    Variables matching ``skip_regex``, absent from the file, or whose shape differs (a new
    class count, a first conv with another channel count) keep their initial values; each
    group is listed in the log. Optimizer slots, the global step, the learning rate and the
    moving averages of the logged losses (``EMA/...``) are never loaded: they belong to the
    run that wrote the file, not to the weights.
    """

    def __init__(self, path, skip_regex=''):
        self.path = path
        self.skip_regex = re.compile(skip_regex) if skip_regex else None
        self.values = read_weights(path)  # read now: a bad path fails before graph building
        self.loaded, self.skipped = [], {}

    def _run_init(self, sess):
        skipped = {'matched --load-skip': [], 'not in file': [], 'shape differs': []}
        self.loaded = []
        for var in tf.compat.v1.global_variables():
            name = var.op.name
            if TRAINING_STATE.search(name):
                continue
            if self.skip_regex is not None and self.skip_regex.search(name):
                skipped['matched --load-skip'].append(name)
            elif name not in self.values:
                skipped['not in file'].append(name)
            elif tuple(self.values[name].shape) != tuple(var.shape.as_list()):
                skipped['shape differs'].append('{} {} vs file {}'.format(
                    name, var.shape.as_list(), list(self.values[name].shape)))
            else:
                var.load(self.values[name].astype(var.dtype.as_numpy_dtype), sess)
                self.loaded.append(name)
        logger.info('Loaded {} variables from {}.'.format(len(self.loaded), self.path))
        for reason, names in skipped.items():
            if names:
                logger.warn('Not loaded ({}, {}): {}'.format(reason, len(names), ', '.join(names)))
        self.skipped = skipped


def _short_name(tensor):
    """'tower0/fastrcnn_losses/box_loss:0' -> 'fastrcnn_losses/box_loss'."""
    return re.sub(r'^tower\d+/', '', tensor.op.name)


class NonFiniteGuard(Callback):
    """Stops training at the first NaN/Inf loss, before anything non-finite is saved.

    Every iteration it fetches ``total_cost`` and the terms summed into it (the RPN, box,
    mask and weight-decay losses) along with the training op: a few scalars, no extra
    session run. Once per epoch, before the checkpoint callbacks (put this callback before
    them), it checks that every trainable variable is finite: an iteration's loss may be
    computed from the weights before its own update (the variable reads and the update are
    not ordered), so an epoch's last update that blew up would otherwise be saved.

    On a non-finite value it raises `TrainingDiverged` (a `StopTraining`) naming the global
    step, the offending losses and the usual fixes. The ModelSaver never runs afterwards:
    the raise happens before this iteration's ``trigger_step`` / ``trigger_epoch``, so the
    last checkpoint on disk keeps finite weights. tensorpack returns normally from a
    `StopTraining`; call `raise_if_diverged` after training to turn it into an error.
    """

    _chief_only = False  # every Horovod rank stops, none hangs in an all-reduce

    def __init__(self, schedule=None, checkpoint_dir=None):
        """
        Args:
            schedule (ScaledSchedule or None): to quote the LR of the failing step.
            checkpoint_dir (str or None): to name the last (kept) checkpoint.
        """
        self._schedule = schedule
        self._checkpoint_dir = checkpoint_dir
        self.error = None

    def _setup_graph(self):
        total = self.get_tensors_maybe_in_tower(['total_cost:0'])[0]
        terms = list(total.op.inputs) if total.op.type in ('AddN', 'AddV2', 'Add') else []
        self._losses = [total] + terms
        self._loss_names = [_short_name(t) for t in self._losses]
        self._weights = tf.compat.v1.trainable_variables()
        with tf.name_scope('nonfinite_guard'):
            self._weights_finite = tf.stack(
                [tf.reduce_all(tf.math.is_finite(v)) for v in self._weights])
        self._fetches = tf.compat.v1.train.SessionRunArgs(fetches=self._losses)

    def _before_run(self, _):
        # The Python-side global step: how many iterations ran before this one (the value
        # the LR schedule uses). Read now: MaintainStepCounter increments it in after_run.
        self._step = self.global_step
        return self._fetches

    def _after_run(self, _, run_values):
        values = run_values.results
        bad = ['{}={}'.format(n, v) for n, v in zip(self._loss_names, values)
               if not math.isfinite(float(v))]
        if bad:
            self._fail('non-finite loss at global step {} (epoch {}, iteration {} of {}): {}'
                       .format(self._step, self.epoch_num, self.local_step + 1,
                               self.trainer.steps_per_epoch, ', '.join(bad)), self._step)

    def _trigger_epoch(self):
        finite = self.trainer.sess.run(self._weights_finite)
        if not finite.all():
            names = [_short_name(v) for v, ok in zip(self._weights, finite) if not ok]
            self._fail('weights became non-finite in the last update of epoch {} (global step '
                       '{}), though its loss was finite: {}{}'.format(
                           self.epoch_num, self.global_step - 1, ', '.join(names[:5]),
                           ' and {} more'.format(len(names) - 5) if len(names) > 5 else ''),
                       self.global_step - 1)

    def _fail(self, what, step):
        """Raise `TrainingDiverged` with a message that says what to try."""
        msg = ['Training diverged: {}.'.format(what)]
        if self._checkpoint_dir is not None:
            latest = tf.train.latest_checkpoint(self._checkpoint_dir)
            msg.append('Nothing was saved after it: {}.'.format(
                'the last checkpoint {} is kept (run again with the same --logdir to resume '
                'from it)'.format(latest) if latest else 'no checkpoint was written'))
        lr = ''
        if self._schedule is not None:
            lr = ' (here LR {:.4g} at this step for a total batch of {}; TRAIN.BASE_LR={:g} is ' \
                 'for TRAIN.REFERENCE_BATCH={})'.format(
                     self._schedule.lr_at(step), self._schedule.total_batch,
                     cfg.TRAIN.BASE_LR, cfg.TRAIN.REFERENCE_BATCH)
        msg.append('Usual causes: a learning rate too high for the batch size{}, no or too '
                   'short warm-up (TRAIN.WARMUP={}), or bad boxes in the training annotations '
                   '(check them with `python -m dataset.check`). Try a lower TRAIN.BASE_LR or '
                   'a longer TRAIN.WARMUP.'.format(lr, cfg.TRAIN.WARMUP))
        self.error = TrainingDiverged(' '.join(msg))
        raise self.error

    def raise_if_diverged(self):
        """Re-raise the `TrainingDiverged` that stopped training, if any."""
        if self.error is not None:
            raise self.error


class DumpWeights(Callback):
    """After training, write this process's trainable and model variables to
    ``<prefix>.rank<rank>.npz`` (loadable with `read_weights` / ``--load``). Tests use it
    to compare Horovod ranks; train.py adds it when ``RCNN_TEST_DUMP_WEIGHTS`` is set."""

    _chief_only = False

    def __init__(self, prefix, rank):
        self.path = '{}.rank{}.npz'.format(prefix, rank)

    def _after_train(self):
        dump_session_params(self.path)  # the trainer's session is the default one here


def add_log_file(logdir):
    """Also write stdlib `logging` records (data pipeline, datasets) to tensorpack's log
    file ``<logdir>/log.log``; tensorpack's own logger does not propagate to the root.

    The root logger gets tensorpack's own file handler, so both write through one file
    offset: a second handle on the same file would overwrite lines (tensorpack opens it
    with mode 'w', not append). Call after ``logger.set_logger_dir(logdir)``.
    """
    path = os.path.abspath(os.path.join(logdir, 'log.log'))
    handler = next(h for h in logging.getLogger('tensorpack').handlers
                   if isinstance(h, logging.FileHandler) and h.baseFilename == path)
    logging.getLogger().addHandler(handler)
    return handler


def write_config(logdir):
    """Write the config to ``<logdir>/config.yaml``. A different one left by an earlier run
    (resumed with other settings) is kept as ``config-<its mtime>.yaml``, never lost.

    Returns:
        str or None: the path the previous config was moved to, if any.
    """
    path = os.path.join(logdir, 'config.yaml')
    new = path + '.tmp'
    cfg.save_yaml(new)
    backup = None
    if os.path.isfile(path):
        if filecmp.cmp(path, new, shallow=False):
            os.remove(new)  # the same config: leave the file (and its mtime) alone
            return None
        stamp = time.strftime('%m%d-%H%M%S', time.localtime(os.path.getmtime(path)))
        backup = os.path.join(logdir, 'config-{}.yaml'.format(stamp))
        while os.path.exists(backup):  # two resumes within a second
            backup = backup[:-len('.yaml')] + '+.yaml'
        os.replace(path, backup)
        logger.info('The config differs from the previous run\'s; that one is kept as {}.'
                    .format(backup))
    os.replace(new, path)
    return backup
