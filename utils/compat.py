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


def frozen_variable_getter(getter, *args, **kwargs):
    """Shim 7 -- frozen weights stay in MODEL_VARIABLES (a ``custom_getter``).

    Creates/gets a variable outside TRAINABLE_VARIABLES but keeps a would-be-trainable one
    in MODEL_VARIABLES, where tensorpack's savers and exporters look for weights.
    tensorpack 0.11's ``freeze_variables`` does the same, but its ``isinstance(v,
    tf.Variable)`` check misses TF 2's resource variables, so frozen weights would drop out
    of MODEL_VARIABLES. Remove when ``freeze_variables(skip_collection=True)`` keeps a
    frozen conv's ``W`` in MODEL_VARIABLES (tests/test_compat.py checks it still drops it).
    """
    import tensorflow.compat.v1 as tf1
    trainable = kwargs.get('trainable', True)
    kwargs['trainable'] = False
    var = getter(*args, **kwargs)
    model_vars = tf1.get_collection_ref(tf1.GraphKeys.MODEL_VARIABLES)
    if trainable and not any(v is var for v in model_vars):
        model_vars.append(var)
    return var


def disable_cpu_memory_optimizer(rewrite_options):
    """Shim 8 -- no grappler memory optimizer on CPU-only sessions.

    It only swaps tensors to host memory on GPUs, so on a CPU it gains nothing
    (BENCHMARKS.md), while its cost model logs a screenful of "Error in PredictCost() for
    the op: op: CropAndResize" warnings (tensorflow#56904). ``rewrite_options``: a
    session config's ``graph_options.rewrite_options``, changed in place.
    Remove when a CPU session on a Mask R-CNN graph logs no PredictCost errors.
    """
    from tensorflow.core.protobuf import rewriter_config_pb2
    rewrite_options.memory_optimization = rewriter_config_pb2.RewriterConfig.NO_MEM_OPT


def freeze_graph_def(sess, graph_def, output_names):
    """Shim 9 -- a frozen GraphDef without tensorpack's ``export_compact``.

    tensorpack 0.11's ``ModelExporter.export_compact`` calls
    ``convert_variables_to_constants`` from ``tensorflow.python.framework.graph_util``,
    which TF 2.18 no longer has; the public ``tf.compat.v1.graph_util`` one still exists.
    Returns the GraphDef with every variable read replaced by a constant.
    Remove when ``tensorflow.python.framework.graph_util`` has it again (or tensorpack
    stops using it): tests/test_compat.py checks that it is still missing.
    """
    import tensorflow.compat.v1 as tf1
    return tf1.graph_util.convert_variables_to_constants(sess, graph_def, output_names)


def accum_grad_optimizer(opt, niter):
    """Shim 10 -- tensorpack's ``AccumGradOptimizer`` with its apply step ordered.

    tensorpack 0.11 computes ``counter % niter == 0`` from a read of the counter that
    nothing orders after the counter's increment; with resource variables (TF 2) that read
    may run first, and then step 1 of every k applies a partial sum (seen once on CI).
    This subclass takes the predicate from the value the increment itself returns.
    Remove when tensorpack's ``apply_gradients`` builds ``pred`` from ``update_counter``
    (tests/test_compat.py checks the original still does not).
    ``opt``: the wrapped tf.train.Optimizer; returns an Optimizer summing ``niter`` steps.
    """
    import tensorflow.compat.v1 as tf1
    from tensorpack.tfutils.optimizer import AccumGradOptimizer
    from tensorpack.tfutils.gradproc import FilterNoneGrad

    class OrderedAccumGradOptimizer(AccumGradOptimizer):
        def apply_gradients(self, grads_and_vars, global_step=None, name=None):
            grads_and_vars = FilterNoneGrad().process(grads_and_vars)
            variables = [v for _, v in grads_and_vars]
            with tf1.control_dependencies(None):
                slots = self._create_accum_slots(variables)
                with tf1.variable_scope(self._name), tf1.device('/cpu:0'):
                    counter = tf1.Variable(0, name='counter', trainable=False, dtype=tf1.int32)
            with tf1.name_scope('AccumGradOptimizer'):
                sums = [s.assign_add(g) for s, (g, _) in zip(slots, grads_and_vars)]
                count = tf1.assign_add(counter, 1, name='update_counter')  # value after +1

                def apply_and_clear():
                    applied = self._opt.apply_gradients(list(zip(slots, variables)))
                    with tf1.control_dependencies([applied]):
                        return tf1.group(*[s.assign(tf1.zeros_like(s)) for s in slots])

                with tf1.control_dependencies(sums):
                    op = tf1.cond(tf1.equal(count % self._niter, 0), apply_and_clear, tf1.no_op)
                steps = [] if global_step is None else [tf1.assign_add(global_step, 1)]
                return tf1.group(op, *steps, name=name or 'cond_update_grad')

    return OrderedAccumGradOptimizer(opt, niter)


def optimize_graph(config, meta_graph):
    """Shim 11 -- grappler run once on a MetaGraphDef, outside a session.

    TensorFlow has no public API for this: ``tensorflow.python.grappler.tf_optimizer`` is
    what sessions and tf.function call inside (used by ``export.bf16_graph_def``). Remove
    when a public offline entry exists; if the private module moves, this import fails
    and tests/test_export_ap.py's bf16 test says so.
    ``config``: a ConfigProto whose rewrite_options name the passes; returns a GraphDef.
    """
    from tensorflow.python.grappler import tf_optimizer
    return tf_optimizer.OptimizeGraph(config, meta_graph)


def warn_unless_msgpack(logger):
    """Shim 1's serializer note, checked: data workers should talk msgpack-numpy.

    tensorpack reads TENSORPACK_SERIALIZE once, at its first import; if something imported
    tensorpack before this module set it, the workers use another serializer (slower for
    our dicts of arrays). Called by ``data.get_train_dataflow``. Not a version shim.
    """
    from tensorpack.dataflow import parallel_map
    from tensorpack.utils.serialize import MsgpackSerializer
    if parallel_map.dumps is not MsgpackSerializer.dumps:
        logger.warning('Data workers do not use msgpack-numpy: set TENSORPACK_SERIALIZE=msgpack '
                       'before tensorpack is first imported.')


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
