"""Training helpers behind train.py: LR schedule, resume, weight loading, host memory.

Nothing here builds the model; train.py wires these into one tensorpack trainer.
"""
import glob
import os
import re
import resource

import numpy as np
import tensorflow as tf
from tensorpack.callbacks import Callback, HyperParamSetter
from tensorpack.tfutils.sessinit import SessionInit
from tensorpack.utils import logger

from config import config as cfg


class UserInputError(Exception):
    """A problem the user can fix (bad path, ...): train.py prints it without traceback."""


class ScaledSchedule:
    """The recipe's schedule (defined at TRAIN.REFERENCE_BATCH images) in this run's steps.

    One *iteration* (a tensorpack step, one global_step) processes ``num_devices`` images;
    an optimizer *update* happens every TRAIN.GRADIENT_ACCUMULATION iterations. With total
    batch B per update, the LR is scaled by B / REFERENCE_BATCH and every step count of
    the recipe by REFERENCE_BATCH / B (linear scaling rule), then converted to iterations.
    """

    def __init__(self, num_devices):
        self.accum = cfg.TRAIN.GRADIENT_ACCUMULATION
        self.total_batch = max(num_devices, 1) * self.accum
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
        return ('total batch {} ({} device(s) x 1 image x {} accumulation): LR {:.5g}, '
                'warm-up {} iterations, decay at {}, {} iterations = {} epochs of {}'.format(
                    self.total_batch, self.total_batch // self.accum, self.accum, self.base_lr,
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
    group is listed in the log. Optimizer slots and the global step are never loaded.
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
            if re.search(r'(Momentum|global_step|AccumGrad|learning_rate)', name):
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
