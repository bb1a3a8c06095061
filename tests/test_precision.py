"""utils/precision.py: session settings, mixed precision, and the GPU trainers' graphs.

No GPU here: the fp16 rewrite and NCCL cannot run, so the GPU paths are checked by
building their graphs (NCHW, two replicated towers, fp16 loss scaling) on CPU. bf16 runs
for real, in a child process that turns TensorFlow's oneDNN ops on (they are off by
default on CPUs without AVX-512 VNNI/BF16 or AMX, and are decided at TensorFlow start).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tensorflow.core.protobuf import rewriter_config_pb2
from tensorpack.input_source import TensorInput
from tensorpack.train import SyncMultiGPUTrainerReplicated

from config import config as cfg
from modeling.generalized_rcnn import build_model
from tests.tiny import configured
from utils import precision
from utils.precision import session_config, session_creator, thread_counts, wrap_optimizer

ON = rewriter_config_pb2.RewriterConfig.ON
DEFAULT = rewriter_config_pb2.RewriterConfig.DEFAULT
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_thread_env(monkeypatch):
    monkeypatch.delenv(precision.INTRA_OP_THREADS_ENV, raising=False)
    monkeypatch.delenv(precision.INTER_OP_THREADS_ENV, raising=False)


def test_threads_default_to_every_usable_core(no_thread_env, monkeypatch):
    monkeypatch.setattr(precision, 'usable_cores', lambda: 8)
    assert thread_counts() == (8, 2)
    assert thread_counts(processes_per_machine=4) == (2, 2)
    assert thread_counts(processes_per_machine=16) == (1, 1)  # never 0 (= all cores)
    assert thread_counts(intra_op=3, inter_op=0) == (3, 0)


def test_threads_from_environment(no_thread_env, monkeypatch):
    monkeypatch.setenv(precision.INTRA_OP_THREADS_ENV, '5')
    monkeypatch.setenv(precision.INTER_OP_THREADS_ENV, '1')
    assert thread_counts() == (5, 1)
    assert thread_counts(intra_op=2) == (2, 1)  # an argument wins over the environment
    monkeypatch.setenv(precision.INTRA_OP_THREADS_ENV, 'two')
    with pytest.raises(ValueError, match=precision.INTRA_OP_THREADS_ENV):
        thread_counts()


@pytest.mark.parametrize('prec, amp, amp_bf16', [('fp32', DEFAULT, DEFAULT),
                                                 ('bf16', DEFAULT, ON),
                                                 ('fp16', ON, DEFAULT)])
def test_session_config_contents(no_thread_env, prec, amp, amp_bf16):
    conf = session_config(prec, intra_op=2, inter_op=1)
    assert (conf.intra_op_parallelism_threads, conf.inter_op_parallelism_threads) == (2, 1)
    assert conf.allow_soft_placement and conf.gpu_options.allow_growth  # tensorpack's
    rewrite = conf.graph_options.rewrite_options
    assert rewrite.auto_mixed_precision == amp
    assert rewrite.auto_mixed_precision_onednn_bfloat16 == amp_bf16
    assert rewrite.auto_mixed_precision_mkl == DEFAULT  # the deprecated alias stays unset
    # no GPU here: grappler's memory optimizer (GPU swapping; noisy cost model) is off
    assert rewrite.memory_optimization == rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
    with pytest.raises(ValueError, match='precision'):
        session_config('fp8')


def test_session_creator_carries_the_config(no_thread_env):
    creator = session_creator('bf16', intra_op=2, inter_op=1)
    # a default creator edited in place: tensorpack's Horovod trainer accepts it as is
    assert creator.user_provided_config is False
    assert creator.config.intra_op_parallelism_threads == 2
    assert creator.config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 == ON


def test_fp16_dynamic_loss_scaling_updates_and_skips():
    """Loss scaling is exact (a power of two) and skips non-finite steps, halving the scale."""
    with tf.Graph().as_default():
        x = tf.placeholder(tf.float32, [])
        w = tf.get_variable('w', initializer=1.0)
        base = tf.train.GradientDescentOptimizer(0.1)
        assert wrap_optimizer(base, 'fp32') is base and wrap_optimizer(base, 'bf16') is base
        opt = wrap_optimizer(base, 'fp16')
        step = opt.minimize(w * x)
        scale = opt._loss_scale()  # the current loss scale tensor
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            scale0 = sess.run(scale)
            sess.run(step, {x: 2.0})
            assert sess.run(w) == pytest.approx(1.0 - 0.1 * 2.0)
            sess.run(step, {x: np.inf})
            assert sess.run(w) == pytest.approx(0.8)  # skipped
            assert sess.run(scale) == scale0 / 2


def test_gpu_training_graph_builds():
    """The multi-GPU configuration builds with the trainer train.py uses for it:
    SyncMultiGPUTrainerReplicated over 2 devices with NCCL, NCHW, fp16 loss scaling. Two
    towers, each on its own GPU, the second with its own (local) variables."""
    with configured(['BACKBONE.DATA_FORMAT=NCHW']):
        cfg.freeze(False)
        cfg.TRAIN.PRECISION = 'fp16'  # finalize_configs refuses fp16 without a GPU
        with tf.Graph().as_default() as graph:
            model = build_model()
            # one set of input tensors per tower (a FeedfreeInput, as the trainer needs)
            source = TensorInput(lambda: [tf.placeholder(s.dtype, s.shape)
                                          for s in model.get_input_signature()])
            trainer = SyncMultiGPUTrainerReplicated(2, average=True, mode='nccl')
            trainer.setup_graph(model.get_input_signature(), source, model.build_graph,
                                model.get_optimizer)
            ops = graph.get_operations()
            convs = [op for op in ops if op.type == 'Conv2D']
            assert convs and all(op.get_attr('data_format') == b'NCHW' for op in convs)
            devices = {op.device.lower() for op in convs}
            assert devices >= {'/device:gpu:0', '/device:gpu:1'}, devices
            assert any(op.name.startswith('tower1/') for op in convs)
            assert any(v.op.name.startswith('tower1/') for v in tf.local_variables())
            assert any(op.type == 'NcclAllReduce' for op in ops)
            assert any('current_loss_scale' in v.op.name for v in tf.global_variables())
            assert trainer.train_op is not None


_BF16_CHILD = r'''
import json, sys
sys.path.insert(0, {root!r})
import utils.compat
import numpy as np
import tensorflow.compat.v1 as tf
from tensorpack.tfutils.tower import PredictTowerContext
from eval import get_inference_output_names
from modeling.generalized_rcnn import build_model
from tests.tiny import configured
from utils.precision import onednn_enabled, session_config

with configured(is_training=False):
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(0)
        image = tf.placeholder(tf.float32, [128, 160, 3], 'image')
        with PredictTowerContext(''):
            build_model().build_graph(image)
        names = ['rpn/class/output:0', 'rpn/box/output:0'] + [
            n + ':0' for n in get_inference_output_names()]
        fetches = [graph.get_tensor_by_name(n) for n in names]
        feed = {{image: np.random.RandomState(0).uniform(0, 255, (128, 160, 3))}}
        out, bf16_ops = {{}}, {{}}
        for prec in ('fp32', 'bf16'):
            with tf.Session(config=session_config(prec, 2, 1)) as sess:
                sess.run(tf.global_variables_initializer())  # seeded: same weights
                meta = tf.RunMetadata()
                out[prec] = sess.run(fetches, feed, run_metadata=meta,
                                     options=tf.RunOptions(output_partition_graphs=True))
                bf16_ops[prec] = sum(str(g).count('DT_BFLOAT16') for g in meta.partition_graphs)
rel = [float(np.abs(a - b).max() / (np.abs(a).max() + 1e-6))
       for a, b in zip(out['fp32'][:2], out['bf16'][:2])]
print(json.dumps({{'onednn': onednn_enabled(), 'bf16_ops': bf16_ops, 'rpn_rel_err': rel,
                  'finite': all(bool(np.isfinite(v).all()) for v in out['bf16']),
                  'detections': [len(out[p][2]) for p in ('fp32', 'bf16')],
                  'dtypes': [str(v.dtype) for v in out['bf16']]}}))
'''


def test_bf16_inference_runs_and_stays_close_to_fp32():
    """oneDNN's bf16 rewrite really runs (bfloat16 ops in the executed graph) and its RPN
    outputs stay within 2 % of fp32 (bfloat16 keeps 8 mantissa bits: ~0.4 % per op)."""
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS='1', PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, '-c', _BF16_CHILD.format(root=ROOT)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1])
    assert res['onednn']
    assert res['bf16_ops']['fp32'] == 0 and res['bf16_ops']['bf16'] > 0, res
    assert res['finite'], res
    assert res['dtypes'][2:] == ['float32', 'float32', 'int32', 'float32'], res  # API kept
    assert max(res['rpn_rel_err']) < 0.02, res


@pytest.mark.parametrize('flags,want', [('fpu sse avx2 fma', 'fp32'),
                                        ('avx2 avx512f avx512_bf16', 'bf16'),
                                        ('avx2 amx_tile amx_bf16', 'bf16')])
def test_auto_precision_from_cpu_flags(tmp_path, flags, want):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nflags\t\t: {}\n'.format(flags))
    assert precision.auto_precision(str(cpuinfo)) == want
    assert precision.cpu_bf16_flags(str(cpuinfo)) == sorted(
        set(flags.split()) & {'amx_bf16', 'avx512_bf16'})
    assert precision.cpu_bf16_flags(str(tmp_path / 'missing')) == []


def test_predict_precision_flag_sets_the_session_precision(fresh_cfg, monkeypatch, tmp_path):
    """predict.py --precision: TRAIN.PRECISION for the run; auto follows the CPU flags."""
    import predict
    seen = []
    monkeypatch.setattr(predict, 'run', lambda args, weights: seen.append(
        cfg.TRAIN.PRECISION) or 0)
    monkeypatch.setattr('utils.training.WeightsLoader.__init__', lambda self, path: None)
    monkeypatch.setattr(precision, 'cpu_bf16_flags', lambda *a: ['amx_bf16'])
    base = ['--load', str(tmp_path), '--predict', 'x.png', '--config', 'DATA.TRAIN=shapes_train',
            'DATA.VAL=shapes_val']
    for flag, want in (('bf16', 'bf16'), ('auto', 'bf16'), ('fp32', 'fp32')):
        cfg.freeze(False)  # predict.py's config is fresh in a new process
        assert predict.main(predict.parse_args(base + ['--precision', flag])) == 0
        assert seen[-1] == want
