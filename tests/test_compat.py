"""Each shim of utils/compat.py, with a check that fails without it."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUILD_CONV = textwrap.dedent("""
    import tensorflow as tf
    from tensorpack.models import Conv2D
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 3])
        y = Conv2D('conv', x, 4, 3)
        assert y.shape.as_list() == [1, 8, 8, 4], y.shape
    print('BUILT')
""")


def _run(code, env_update=None, use_compat=True):
    env = {k: v for k, v in os.environ.items() if k != 'TF_USE_LEGACY_KERAS'}
    env.update(env_update or {})
    env['PYTHONPATH'] = ROOT
    prefix = 'import utils.compat\n' if use_compat else ''
    return subprocess.run([sys.executable, '-c', prefix + code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_legacy_keras_shim_makes_tensorpack_layers_build():
    with_shim = _run(BUILD_CONV)
    assert 'BUILT' in with_shim.stdout, with_shim.stderr[-2000:]
    without = _run(BUILD_CONV, use_compat=False)
    assert without.returncode != 0 and 'BUILT' not in without.stdout


def test_compat_refuses_explicitly_disabled_legacy_keras():
    p = _run('pass', env_update={'TF_USE_LEGACY_KERAS': '0'})
    assert p.returncode != 0 and 'TF_USE_LEGACY_KERAS must be 1' in p.stderr


HOROVOD_TRAIN = textwrap.dedent("""
    import tensorflow as tf
    from tensorpack import ModelDesc, TrainConfig, HorovodTrainer, launch_train_with_config
    from tensorpack.dataflow import DataFromList
    from tensorpack.utils import logger
    class Tiny(ModelDesc):
        def inputs(self):
            return [tf.TensorSpec([2], tf.float32, 'x')]
        def build_graph(self, x):
            w = tf.compat.v1.get_variable('w', [2])
            return tf.reduce_sum(tf.square(w - x), name='cost')
        def optimizer(self):
            return tf.compat.v1.train.GradientDescentOptimizer(0.1)
    logger.set_logger_dir(LOGDIR, action='d')
    df = DataFromList([[[1., 2.]]] * 4, shuffle=False)
    cfg = TrainConfig(model=Tiny(), dataflow=df, steps_per_epoch=3, max_epoch=1, callbacks=[])
    launch_train_with_config(cfg, HorovodTrainer())
    print('TRAINED')
""")


def test_horovod_trainer_shim(tmp_path):
    pytest.importorskip('horovod.tensorflow')
    code = 'LOGDIR = {!r}\n'.format(str(tmp_path / 'log')) + HOROVOD_TRAIN
    with_shim = _run(code)
    assert 'TRAINED' in with_shim.stdout, with_shim.stderr[-3000:]
    # Without the shim (simulated by removing the alias it adds) the trainer cannot start.
    undo = 'import tensorflow as tf\ndel tf.global_variables\n'
    without = _run(undo + code)
    assert without.returncode != 0 and 'global_variables' in without.stderr


def test_tensorpack_training_failed_log_line_formats():
    code = ('from tensorpack.utils import logger\n'
            'logger.error("Training failed at global_step=", 7)\n')
    with_shim = _run(code)
    assert 'Training failed at global_step= 7' in with_shim.stdout + with_shim.stderr
    assert 'Logging error' not in with_shim.stderr
    without = _run(code, use_compat=False)
    assert 'Logging error' in without.stderr


WORKERS_THEN_SIGKILL = textwrap.dedent("""
    import os, signal, time
    from tensorpack.dataflow import DataFromList, MultiProcessMapData
    ds = MultiProcessMapData(DataFromList(list(range(10 ** 6)), shuffle=False), num_proc=2,
                             map_func=lambda x: time.sleep(0.01) or x, buffer_size=4)
    ds.reset_state()
    next(iter(ds))
    print('WORKERS', *[p.pid for p in ds._procs], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _alive(pid):
    try:
        with open('/proc/{}/stat'.format(pid)) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='prctl is Linux only')
def test_data_workers_die_with_a_sigkilled_parent():
    """tensorpack's workers with the shim die with their parent; without it they stay."""
    import time
    for use_compat in (True, False):
        code = ('import utils.compat\n' if use_compat else '') + WORKERS_THEN_SIGKILL
        # Popen, not _run: surviving workers would hold the output pipe open forever
        proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = next(ln for ln in proc.stdout if ln.startswith('WORKERS'))
        proc.wait(timeout=60)
        proc.stdout.close()
        pids = [int(p) for p in line.split()[1:]]
        time.sleep(1)
        alive = [p for p in pids if _alive(p)]
        for pid in alive:  # this test's own workers (the run without the shim)
            os.kill(pid, 9)
        assert len(pids) == 2 and alive == ([] if use_compat else pids), (use_compat, alive)


def test_no_removed_numpy_or_scipy_names_in_our_code():
    from utils.compat import REMOVED_NUMPY_ALIASES
    pattern = re.compile(r'(?<![\w.])(' + '|'.join(re.escape(a) for a in REMOVED_NUMPY_ALIASES)
                         + r')\b(?![\w.])')
    offenders = []
    for d, _, files in os.walk(ROOT):
        if any(part.startswith('.') for part in os.path.relpath(d, ROOT).split(os.sep)):
            continue
        for f in files:
            if f.endswith('.py') and f != 'compat.py':
                path = os.path.join(d, f)
                with open(path) as fh:
                    for i, line in enumerate(fh, 1):
                        if pattern.search(line.split('#')[0]):
                            offenders.append('{}:{}: {}'.format(path, i, line.strip()))
    assert not offenders, offenders


FROZEN_CONV = textwrap.dedent("""
    import tensorflow.compat.v1 as tf
    from tensorpack.models import Conv2D
    from tensorpack.tfutils.varreplace import custom_getter_scope, freeze_variables
    from utils.compat import frozen_variable_getter
    getter = {}
    with tf.Graph().as_default():
        x = tf.placeholder(tf.float32, [1, 8, 8, 3])
        with custom_getter_scope(getter):
            Conv2D('conv', x, 4, 3)
        model = [v.op.name for v in tf.get_collection(tf.GraphKeys.MODEL_VARIABLES)]
        trainable = [v.op.name for v in tf.trainable_variables()]
    print('MODEL', 'conv/W' in model, 'TRAINABLE', 'conv/W' in trainable)
""")


def test_frozen_getter_keeps_frozen_weights_in_model_variables():
    ours = _run(FROZEN_CONV.replace('getter = {}', 'getter = frozen_variable_getter'))
    assert 'MODEL True TRAINABLE False' in ours.stdout, ours.stderr[-2000:]
    # tensorpack's own freeze_variables still drops them: the shim is still needed.
    theirs = _run(FROZEN_CONV.replace(
        'getter = {}', 'getter = freeze_variables(stop_gradient=False, skip_collection=True)'
    ).replace('custom_getter_scope(getter)', 'getter'))
    assert 'MODEL False TRAINABLE False' in theirs.stdout, theirs.stderr[-2000:]


def test_cpu_session_config_disables_memory_optimizer():
    from tensorflow.core.protobuf import rewriter_config_pb2

    from utils.compat import disable_cpu_memory_optimizer
    from utils.precision import session_config
    config = session_config('fp32')
    no_mem_opt = rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
    assert config.graph_options.rewrite_options.memory_optimization == no_mem_opt
    fresh = rewriter_config_pb2.RewriterConfig()
    disable_cpu_memory_optimizer(fresh)
    assert fresh.memory_optimization == no_mem_opt


def test_frozen_graph_shim_still_needed_and_works():
    from tensorflow.python.framework import graph_util
    assert not hasattr(graph_util, 'convert_variables_to_constants')  # else drop shim 7
    import tensorflow.compat.v1 as tf1

    from utils.compat import freeze_graph_def
    with tf1.Graph().as_default() as g, tf1.Session() as sess:
        v = tf1.get_variable('v', initializer=3.)
        tf1.identity(v * 2., name='out')
        sess.run(tf1.global_variables_initializer())
        frozen = freeze_graph_def(sess, g.as_graph_def(), ['out'])
    assert not any(n.op in ('VariableV2', 'VarHandleOp') for n in frozen.node)
    with tf1.Graph().as_default(), tf1.Session() as sess:
        tf1.import_graph_def(frozen, name='')
        assert sess.run('out:0') == 6.


def _accum_predicate_follows_increment(make_optimizer):
    """Builds one accumulating minimize() and says whether the apply-or-not predicate
    (the Equal op) has the counter's increment among its ancestors (data or control)."""
    import tensorflow.compat.v1 as tf1
    with tf1.Graph().as_default() as g:
        w = tf1.get_variable('w', initializer=[1., 2.])
        make_optimizer(tf1.train.GradientDescentOptimizer(0.1)).minimize(tf1.reduce_sum(w * w))
        increments = [op for op in g.get_operations() if op.type == 'AssignAddVariableOp'
                      and op.inputs[0].op.name.endswith('/counter')]
        equals = [op for op in g.get_operations()
                  if op.type == 'Equal' and op.name.startswith('AccumGradOptimizer')]
        assert len(increments) == 1 and len(equals) == 1
        seen, todo = set(), [equals[0]]
        while todo:
            op = todo.pop()
            if op.name not in seen:
                seen.add(op.name)
                todo += [t.op for t in op.inputs] + list(op.control_inputs)
        return increments[0].name in seen


def test_accum_grad_shim_still_needed_and_orders_the_predicate():
    """tensorpack's AccumGradOptimizer may read its counter before incrementing it (a race
    that applied the update at step 1 of 2 once on CI); shim 10 reads the incremented value.
    tests/test_training_utils.py checks the update steps over many iterations."""
    from tensorpack.tfutils.optimizer import AccumGradOptimizer

    from utils.compat import accum_grad_optimizer
    assert not _accum_predicate_follows_increment(lambda opt: AccumGradOptimizer(opt, 2))
    assert _accum_predicate_follows_increment(lambda opt: accum_grad_optimizer(opt, 2))
