"""Every TF-version / tensorpack / NumPy workaround of this project, in one place.

Import this module before anything imports TensorFlow: every entry point and
``tests/conftest.py`` does ``import utils.compat  # noqa`` first. ``apply()`` is idempotent.
Each shim says what it fixes and how to tell when it can be deleted.
"""
import os
import sys

# Shim 1 -- Keras 2 for tf.layers.
# tensorpack's layers (Conv2D, FullyConnected, BatchNorm, ...) wrap `tf.compat.v1.layers`,
# which only exists with Keras 2. TF >= 2.16 ships Keras 3 unless TF_USE_LEGACY_KERAS=1 is
# set BEFORE TensorFlow is first imported (tf-keras provides Keras 2).
# Remove when tensorpack no longer uses tf.layers (i.e. never for tensorpack 0.11).
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
# Not a version shim but also import-order sensitive: tensorpack reads its serializer
# choice once, at first import. msgpack(-numpy) is faster than pyarrow for our dicts of
# arrays and needs no extra package.
os.environ.setdefault('TENSORPACK_SERIALIZE', 'msgpack')
# Silence TF's C++ INFO lines (CPU feature notices, oneDNN banners); warnings stay.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')


def _legacy_keras_active():
    return os.environ.get('TF_USE_LEGACY_KERAS') == '1'


def _patch_tf_global_variables(tf):
    """Shim 2 -- `tf.global_variables` for tensorpack's HorovodTrainer.

    tensorpack 0.11 `HorovodTrainer._setup_graph` calls the TF1 name `tf.global_variables()`
    on the TF2 module, which lacks it (AttributeError at trainer setup). We alias the v1 op.
    Remove when `grep -n "tf.global_variables" tensorpack/train/trainers.py` finds nothing.
    """
    if not hasattr(tf, 'global_variables'):
        tf.global_variables = tf.compat.v1.global_variables


# Shim 3 -- NumPy 2 / SciPy removals. NumPy 2 removed the `np.int`, `np.bool`, `np.float`,
# `np.object` aliases and SciPy removed `interp2d`. There is no patch here on purpose: our
# code never uses them, and the tensorpack code paths that still do (dataflow.imgaug,
# dataflow.serialize.NumpySerializer, utils.viz) are not used by this project.
# tests/test_compat.py greps our sources so that nobody reintroduces them.
REMOVED_NUMPY_ALIASES = ('np.int', 'np.bool', 'np.float', 'np.object', 'np.str', 'interp2d')


def _patch_tensorpack_logger_error():
    """Shim 4 -- tensorpack 0.11's "Training failed" log line.

    `Trainer.main_loop` logs `logger.error("Training failed at global_step=", step)`: an
    argument without a `%s`, so `logging` prints "--- Logging error ---" and a traceback of
    its own on top of the real error. We join such arguments instead of %-formatting.
    Remove when tensorpack/train/base.py's call has a "%s" (or uses .format).
    """
    from tensorpack.utils import logger
    if getattr(logger.error, '_rcnn_patched', False):
        return
    original = logger.error

    def error(msg, *args, **kwargs):
        if args and '%' not in str(msg):
            msg, args = ' '.join(str(a) for a in (msg,) + args), ()
        return original(msg, *args, **kwargs)
    error._rcnn_patched = True
    logger.error = error


def die_with_parent(_warn=True):
    """Shim 5 -- data workers die with their parent, whatever way it dies (SIGKILL too).

    tensorpack 0.11's worker processes call `enable_death_signal` right after fork, which
    needs the `python-prctl` package and, without it, only logs a warning: a trainer killed
    by SIGKILL (the OOM killer's signal) left its workers running, re-parented to init.
    This replacement calls prctl(PR_SET_PDEATHSIG, SIGKILL) through libc, then exits if the
    parent already died between fork and prctl (nobody would send the signal then).
    Remove when tensorpack's `enable_death_signal` works without python-prctl.
    """
    if not sys.platform.startswith('linux'):
        return
    import ctypes
    import multiprocessing
    import signal
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL),
                                               0, 0, 0) != 0:
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def _patch_tensorpack_death_signal():
    """Install `die_with_parent` wherever tensorpack's workers look `enable_death_signal` up."""
    from tensorpack.dataflow import parallel, parallel_map
    from tensorpack.utils import concurrency
    for module in (concurrency, parallel, parallel_map):
        module.enable_death_signal = die_with_parent


def _patch_tensorpack_multitower(tf):
    """Shim 6 -- tensorpack 0.11's `MultiTowerOfflinePredictor` (one predictor per GPU).

    Its module calls `tf.variable_scope` / `tf.get_variable_scope` on the TF2 module, which
    lacks them (AttributeError when it builds). Its `tf` becomes `tf.compat.v1`, which has
    every name it uses. Remove when tensorpack/predict/multigpu.py imports `tfv1`.
    """
    from tensorpack.predict import multigpu
    if not hasattr(multigpu.tf, 'variable_scope'):
        multigpu.tf = tf.compat.v1


def apply():
    """Apply every shim that needs TensorFlow imported; returns the `tensorflow` module."""
    import tensorflow as tf
    _patch_tf_global_variables(tf)
    _patch_tensorpack_logger_error()
    _patch_tensorpack_death_signal()
    _patch_tensorpack_multitower(tf)
    return tf


if not _legacy_keras_active():  # someone set it to 0 explicitly: tensorpack layers break
    raise RuntimeError('TF_USE_LEGACY_KERAS must be 1 for tensorpack layers (it is "{}").'
                       .format(os.environ.get('TF_USE_LEGACY_KERAS')))
apply()
