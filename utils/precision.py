"""Session settings for speed: CPU threads and mixed precision (bf16 on CPU, fp16 on GPU).

Every session of the project (the trainer's, the predictor's, the benchmarks') is built
from `session_config`, so the thread counts and the graph rewrite of
``cfg.TRAIN.PRECISION`` are the same everywhere:

- ``fp32``: no rewrite.
- ``bf16``: oneDNN's auto-mixed-precision rewrite (`RewriterConfig.
  auto_mixed_precision_onednn_bfloat16`) casts convolutions and matmuls to bfloat16 on
  CPU. TensorFlow runs it only when its oneDNN ops are on (`onednn_enabled`): by default
  only on CPUs with AVX512-VNNI / AVX512-BF16 / AMX, elsewhere set
  ``TF_ENABLE_ONEDNN_OPTS=1`` before TensorFlow is imported. Without AVX-512, oneDNN has
  no bfloat16 kernels and TensorFlow falls back to Eigen's (measured in BENCHMARKS.md).
  bfloat16 keeps float32's exponent range, so training needs no loss scaling.
- ``fp16``: TensorFlow's auto-mixed-precision rewrite for GPUs (`RewriterConfig.
  auto_mixed_precision`; it skips itself on a machine without a GPU) plus dynamic loss
  scaling of the optimizer (`wrap_optimizer`), since float16 gradients underflow.

Threads: tensorpack's default session config uses ONE intra-op thread (its GPU-oriented
choice), which leaves all but one core idle in every convolution on CPU. We use every
usable core (divided among the processes of one machine, e.g. Horovod ranks) unless
``RCNN_INTRA_OP_THREADS`` / ``RCNN_INTER_OP_THREADS`` say otherwise.
"""
import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

import logging
import os

import tensorflow as tf
from tensorflow.core.protobuf import rewriter_config_pb2

from config_defaults import PRECISIONS
from utils.compat import disable_cpu_memory_optimizer

__all__ = ['PRECISIONS', 'INTRA_OP_THREADS_ENV', 'INTER_OP_THREADS_ENV', 'usable_cores',
           'thread_counts', 'onednn_enabled', 'cpu_bf16_flags', 'auto_precision',
           'session_config', 'session_creator', 'wrap_optimizer']

INTRA_OP_THREADS_ENV = 'RCNN_INTRA_OP_THREADS'
INTER_OP_THREADS_ENV = 'RCNN_INTER_OP_THREADS'
# CPU flags (/proc/cpuinfo) of units that run bfloat16 matmuls natively: AMX tiles (Sapphire
# Rapids and later) or AVX512-BF16 (Cooper Lake, Zen 4 and later).
BF16_CPU_FLAGS = ('amx_bf16', 'avx512_bf16')
# Inter-op threads per process: two ops at a time keep the cores busy while one op is a
# small, poorly parallel one (NMS, gathers) without oversubscribing them (BENCHMARKS.md).
DEFAULT_INTER_OP_THREADS = 2

logger = logging.getLogger(__name__)


def usable_cores():
    """CPU cores this process may run on (its affinity mask, e.g. under taskset/cgroups)."""
    return len(os.sched_getaffinity(0))


def _env_int(name):
    text = os.environ.get(name, '').strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError('{}="{}" is not an integer.'.format(name, text)) from None
    if value < 0:
        raise ValueError('{}={} must be >= 0 (0 lets TensorFlow choose).'.format(name, value))
    return value


def thread_counts(intra_op=None, inter_op=None, processes_per_machine=1):
    """(intra-op, inter-op) thread counts of a session.

    Each value is the argument if given, else its environment variable
    (``RCNN_INTRA_OP_THREADS`` / ``RCNN_INTER_OP_THREADS``), else the default: intra-op =
    usable cores / processes_per_machine (at least 1), inter-op = min(2, intra-op).
    0 means "TensorFlow chooses" (all cores).
    """
    if intra_op is None:
        intra_op = _env_int(INTRA_OP_THREADS_ENV)
    if intra_op is None:
        intra_op = max(1, usable_cores() // max(1, processes_per_machine))
    if inter_op is None:
        inter_op = _env_int(INTER_OP_THREADS_ENV)
    if inter_op is None:
        inter_op = min(DEFAULT_INTER_OP_THREADS, intra_op or DEFAULT_INTER_OP_THREADS)
    return intra_op, inter_op


def onednn_enabled():
    """Whether TensorFlow's oneDNN ops (and so its bfloat16 rewrite) are on in this process.

    Decided once, when TensorFlow starts: ``TF_ENABLE_ONEDNN_OPTS`` if set, else on only for
    CPUs with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX.
    """
    # The only query TensorFlow offers is this private binding (it reads the same decision).
    from tensorflow.python.util import _pywrap_util_port
    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_bf16_flags(cpuinfo='/proc/cpuinfo'):
    """The `BF16_CPU_FLAGS` this CPU has (sorted list; empty where cpuinfo is unreadable)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return sorted(flags.intersection(BF16_CPU_FLAGS))
    except OSError:
        pass
    return []


def auto_precision(cpuinfo='/proc/cpuinfo'):
    """'bf16' on a CPU with bfloat16 units (`cpu_bf16_flags`), else 'fp32'; logs both."""
    flags = cpu_bf16_flags(cpuinfo)
    chosen = 'bf16' if flags else 'fp32'
    logger.warning('precision auto: CPU bfloat16 units %s -> %s', ', '.join(flags) or 'none',
                   chosen)
    return chosen


def session_config(precision='fp32', intra_op=None, inter_op=None, processes_per_machine=1):
    """A ``tf.compat.v1.ConfigProto`` for the trainer, the predictor and the benchmarks.

    Starts from tensorpack's default (soft placement, GPU memory growth), sets the thread
    counts of `thread_counts` and the graph rewrite of ``precision`` (module docstring).

    Args:
        precision (str): one of `PRECISIONS` (``cfg.TRAIN.PRECISION``).
        intra_op, inter_op (int or None): thread counts; None: env variable or default.
        processes_per_machine (int): processes sharing this machine's cores (Horovod ranks
            per machine), for the default intra-op count.
    """
    from tensorpack.tfutils.common import get_default_sess_config
    if precision not in PRECISIONS:
        raise ValueError('precision must be one of {}, got "{}".'.format(PRECISIONS, precision))
    config = get_default_sess_config()
    config.intra_op_parallelism_threads, config.inter_op_parallelism_threads = thread_counts(
        intra_op, inter_op, processes_per_machine)
    rewrite = config.graph_options.rewrite_options
    from tensorpack.utils.gpu import get_num_gpu
    if not get_num_gpu():
        disable_cpu_memory_optimizer(rewrite)
    if precision == 'bf16':
        rewrite.auto_mixed_precision_onednn_bfloat16 = rewriter_config_pb2.RewriterConfig.ON
        if not onednn_enabled():
            logger.warning('TRAIN.PRECISION=bf16: TensorFlow\'s oneDNN ops are off in this '
                           'process, so the bfloat16 rewrite will not run (everything stays '
                           'float32). Set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is '
                           'imported to enable it.')
    elif precision == 'fp16':
        rewrite.auto_mixed_precision = rewriter_config_pb2.RewriterConfig.ON
    return config


def session_creator(precision='fp32', intra_op=None, inter_op=None, processes_per_machine=1):
    """A tensorpack ``NewSessionCreator`` with `session_config` (arguments as there).

    For ``TrainConfig(session_creator=...)`` and ``PredictConfig(session_creator=...)``.
    The config is written into a default creator rather than passed to its constructor:
    tensorpack then logs no "custom session config may not work" warnings (meant for GPU
    options set after GPU initialisation; ours are safe) and its Horovod trainer, which
    edits ``creator.config`` in place, keeps working.
    """
    from tensorpack.tfutils.sesscreate import NewSessionCreator
    creator = NewSessionCreator()
    creator.config.CopyFrom(session_config(precision, intra_op, inter_op,
                                           processes_per_machine))
    return creator


def wrap_optimizer(opt, precision):
    """The optimizer to train with at ``precision``.

    fp16: wrapped in dynamic loss scaling (``tf.compat.v1.mixed_precision.
    MixedPrecisionLossScaleOptimizer(opt, 'dynamic')``): the loss is multiplied by a scale
    before the gradients are taken and the gradients divided by it afterwards; a step whose
    gradients are not finite is skipped and the scale halved, and the scale doubles after
    2000 finite steps. fp32 / bf16: ``opt`` itself.

    Args:
        opt (tf.compat.v1.train.Optimizer): e.g. momentum, possibly wrapped for gradient
            accumulation.
        precision (str): one of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError('precision must be one of {}, got "{}".'.format(PRECISIONS, precision))
    if precision != 'fp16':
        return opt
    return tf.compat.v1.mixed_precision.MixedPrecisionLossScaleOptimizer(opt, 'dynamic')
