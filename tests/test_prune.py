"""prune.py on whole models: residual / FPN groups, exact slicing, dropped residual
branches, the pruned models of every architecture building and loading, the pruned R-18 GN
model through train.py, predict.py and the export, and the user errors (the selection
itself: tests/test_pruning.py).

Models here are tiny (tests/tiny.py) with freshly initialised weights, saved as a run
would be (a checkpoint and its config.yaml)."""
import concurrent.futures
import contextlib
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tensorpack.tfutils.tower import PredictTowerContext

import predict
import prune
import pruning
from config import config as cfg, finalize_configs
from dataset import DatasetRegistry, register_shapes
from modeling.backbone import dropped_block_shift, residual_blocks
from modeling.generalized_rcnn import build_model
from tiny import configured, matching_order, spread_class_scores
from utils.training import WeightsLoader, read_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_NORM = ['BACKBONE.NORM=None']  # convs with biases: a zeroed channel is exactly dead
GN_DEMO = ['FPN.NORM=GN', 'FPN.FRCNN_HEAD_FUNC=fastrcnn_4conv1fc_gn_head',
           'FPN.MRCNN_HEAD_FUNC=maskrcnn_up4conv_gn_head']  # R-18 GN everywhere, as the demo
# Two iterations at a reference batch of 1, no evaluation (tests/test_predict.py).
SHORT_TRAINING = ['TRAIN.REFERENCE_BATCH=1', 'TRAIN.LR_SCHEDULE=(1,1,2)', 'TRAIN.WARMUP=1',
                  'TRAIN.STEPS_PER_EPOCH=1', 'TRAIN.EVAL_PERIOD=0', 'TRAIN.WEIGHT_DECAY=0.']


def make_model(folder, overrides, edit=None):
    """A freshly initialised tiny model saved as train.py would: ``folder``/model-1 and
    config.yaml. ``edit(weights dict)`` may change the weights before they are saved."""
    with configured(overrides, is_training=False):
        with tf.Graph().as_default():
            tf.set_random_seed(0)
            image = tf.placeholder(tf.float32, [None, None, 3], 'image')
            with PredictTowerContext(''):
                build_model().build_graph(image)
            variables = tf.global_variables()
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                spread_class_scores(sess, 10.)  # scores ~10x further apart
                if edit is not None:
                    values = dict(zip([v.op.name for v in variables], sess.run(variables)))
                    edit(values)
                    for v in variables:
                        v.load(values[v.op.name], sess)
                os.makedirs(folder, exist_ok=True)
                tf.train.Saver().save(sess, os.path.join(folder, 'model-1'))
        cfg.save_yaml(os.path.join(folder, 'config.yaml'))
    return folder


@contextlib.contextmanager
def model_config(folder):
    """The global config of the model saved in ``folder`` (its config.yaml), finalised."""
    register_shapes(num_train=40, num_val=8)
    with cfg.override():
        cfg.load_yaml(os.path.join(folder, 'config.yaml'))
        finalize_configs(is_training=False, num_gpus=0, registry=DatasetRegistry)
        yield cfg


def run_prune(*args):
    """prune.py's main in this process (the global config is restored after)."""
    with cfg.override():
        return prune.main(prune.parse_args([str(a) for a in args]))


def detections(folder, image):
    """The raw graph outputs (boxes, scores, labels, masks) of the model in ``folder``,
    loaded as predict.py loads it; every variable must load."""
    with model_config(folder):
        weights = WeightsLoader(folder)
        with tf.Graph().as_default():
            predictor = predict.build_predictor(weights)
            outputs = predictor(image)
    assert weights.loaded and not any(weights.skipped.values()), weights.skipped
    return outputs


def _image():
    return np.random.RandomState(3).uniform(0, 255, (120, 150, 3)).astype(np.float32)


def _assert_same_detections(got, want):
    """Graph outputs (boxes, scores, labels, masks): the same within 1e-4, in the same
    order up to tied scores."""
    assert len(want[0]) > 0, 'random weights should still detect something'
    assert len(got) == len(want) == 4
    order = matching_order(list(zip(got[2], got[0], got[1])), list(zip(want[2], want[0], want[1])),
                           1e-4, 1e-4)
    np.testing.assert_allclose(got[3][order], want[3], atol=1e-4)


# ---------------------------------------------------------------------------- one model
@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp('model')), NO_NORM)


def test_threshold_zero_changes_no_output(tiny_model, tmp_path):
    out = tmp_path / 'pruned'
    assert run_prune('--load', tiny_model, '--threshold', 0, '--output', out) == 0
    with model_config(str(out)):
        assert cfg.PRUNE.CHANNELS == {} and cfg.PRUNE.GN_GROUPS == {}
    _assert_same_detections(detections(str(out), _image()), detections(tiny_model, _image()))


# Dead channels (kernel and bias 0, so 0 after ReLU): channel 5 of the res3 residual group
# (every member), channel 7 of a block's inner conv, channels 3 and 10 of the FPN outputs
# (read by the RPN, the box head's FC over 7 x 7 RoIs and the mask head).
DEAD = {('group1/block0/conv2', 'group1/block0/convshortcut', 'group1/block1/conv2'): [5],
        ('group2/block1/conv1',): [7],
        tuple('fpn/posthoc_3x3_p{}'.format(i) for i in range(2, 6)): [3, 10]}


def _kill_channels(weights):
    for layers, channels in DEAD.items():
        for layer in layers:
            weights[layer + '/W'][..., channels] = 0.
            weights[layer + '/b'][channels] = 0.


def test_dead_channels_are_removed_from_every_member_and_change_no_output(tmp_path):
    model = make_model(str(tmp_path / 'model'), NO_NORM, edit=_kill_channels)
    out = str(tmp_path / 'pruned')
    assert run_prune('--load', model, '--threshold', 1e-6, '--output', out,
                     '--granularity', 1, '--min-channels', 1) == 0
    before, after = read_weights(model), read_weights(out)
    expected = {layer: before[layer + '/W'].shape[-1] - len(channels)
                for layers, channels in DEAD.items() for layer in layers}
    with model_config(out):
        assert cfg.PRUNE.CHANNELS == expected
    for layer in expected:
        assert after[layer + '/W'].shape[-1] == expected[layer]
    # every reader of the residual group lost exactly input channel 5
    for reader in ('group1/block1/conv1', 'group2/block0/conv1', 'group2/block0/convshortcut',
                   'fpn/lateral_1x1_c3'):
        np.testing.assert_array_equal(after[reader + '/W'],
                                      np.delete(before[reader + '/W'], 5, axis=2))
    # the box head's FC reads 7 x 7 cells per channel, channel-major
    fc6 = before['fastrcnn/fc6/W']
    rows = [c * 49 + j for c in (3, 10) for j in range(49)]
    np.testing.assert_array_equal(after['fastrcnn/fc6/W'], np.delete(fc6, rows, axis=0))
    _assert_same_detections(detections(out, _image()), detections(model, _image()))


# GroupNorm layers with a dead group (gamma, beta 0: output 0 after ReLU) and one with a
# single dead channel, which must stay: its group lives on.
DEAD_GN_GROUPS = {'group2/block1/conv1/gn': 'group2/block1/conv1', 'fastrcnn/gn1':
                  'fastrcnn/conv1', 'maskrcnn/gn0': 'maskrcnn/fcn0'}  # norm: its conv
DEAD_GN_CHANNEL = 'group1/block1/conv1/gn'


def _kill_gn(weights):
    for gn in list(DEAD_GN_GROUPS) + [DEAD_GN_CHANNEL]:
        size = len(weights[gn + '/gamma']) // pruning.DEFAULT_GN_GROUPS
        dead = slice(size, 2 * size) if gn != DEAD_GN_CHANNEL else slice(size, size + 1)
        weights[gn + '/gamma'][dead] = weights[gn + '/beta'][dead] = 0.


def test_dead_gn_groups_go_whole_by_gamma_and_change_no_output(tmp_path):
    """--criterion gamma on a GN model: each dead group is removed and the group count drops
    by one; the remaining groups keep their statistics, so the detections stay the same.
    (Regrouping the single dead channel's partner would change them.)"""
    model = make_model(str(tmp_path / 'model'), ['BACKBONE.NORM=GN'] + GN_DEMO, edit=_kill_gn)
    out = str(tmp_path / 'pruned')
    assert run_prune('--load', model, '--threshold', 1e-6, '--output', out, '--criterion',
                     'gamma', '--granularity', 1, '--min-channels', 1) == 0
    before = read_weights(model)
    with model_config(out):
        widths, groups = dict(cfg.PRUNE.CHANNELS), dict(cfg.PRUNE.GN_GROUPS)
    assert widths == {conv: len(before[gn + '/gamma']) * 31 // 32
                      for gn, conv in DEAD_GN_GROUPS.items()}, widths
    assert groups == {gn: 31 for gn in DEAD_GN_GROUPS}
    _assert_same_detections(detections(out, _image()), detections(model, _image()))


# Residual blocks of the R-18 GN model kept alive (random last gamma); every other block's
# branch ends in gamma 0 (its zero init) and a random beta, so it adds exactly its beta.
LIVE_BLOCKS = ('group0/block1', 'group2/block0')


def _live_blocks(weights):
    rs = np.random.RandomState(1)
    for block in residual_blocks():
        norm = dropped_block_shift(block)
        size = weights[norm + '/gamma'].shape
        weights[norm + '/beta'] = rs.uniform(-.2, .2, size).astype(np.float32)
        if block in LIVE_BLOCKS:
            weights[norm + '/gamma'] = rs.uniform(.5, 1., size).astype(np.float32)


def test_dropped_blocks_add_their_beta_and_change_no_output(tmp_path, capsys):
    """--drop-blocks 0 removes exactly the branches whose last gamma is 0 (strided blocks
    keep their shortcut conv); the model computes relu(shortcut + beta) there, which is
    what those branches computed, so the detections stay the same."""
    model = make_model(str(tmp_path / 'model'), ['BACKBONE.NORM=GN'] + GN_DEMO,
                       edit=_live_blocks)
    out = str(tmp_path / 'pruned')
    assert run_prune('--load', model, '--threshold', 0, '--drop-blocks', 0,
                     '--output', out) == 0
    with model_config(out):
        dropped = list(cfg.PRUNE.DROPPED_BLOCKS)
    assert dropped == [b for b in ('group{}/block{}'.format(g, i) for g in range(4)
                                   for i in range(2)) if b not in LIVE_BLOCKS]
    before, after = read_weights(model), read_weights(out)
    assert 'group1/block0/conv1/W' not in after and 'group1/block0/conv2/gn/gamma' not in after
    np.testing.assert_array_equal(after['group1/block0/conv2/gn/beta'],
                                  before['group1/block0/conv2/gn/beta'])
    assert 'group1/block0/convshortcut/W' in after and 'group2/block0/conv1/W' in after
    _assert_same_detections(detections(out, _image()), detections(model, _image()))
    again = str(tmp_path / 'again')  # pruning the pruned model adds the live blocks
    assert run_prune('--load', out, '--threshold', 0, '--drop-blocks', 1, '--output',
                     again) == 0
    with model_config(again):
        assert cfg.PRUNE.DROPPED_BLOCKS == dropped + list(LIVE_BLOCKS)
    assert not any(re.match(r'group\d/block\d/conv\d/W', k) for k in read_weights(again))
    assert detections(again, _image())[0].shape[1] == 4
    capsys.readouterr()
    assert run_prune('--load', model, '--threshold', 0, '--drop-blocks', 0, '--keep-blocks',
                     'grop1', '--output', tmp_path / 'typo') == 1
    assert "Error: --keep-blocks 'grop1' matches no residual block: group0/block0, " \
        "group0/block1, group1/block0" in capsys.readouterr().err
    assert not (tmp_path / 'typo').exists()


def test_norm_l1_penalises_every_trained_gamma():
    """TRAIN.NORM_L1: the training cost holds lambda * sum |gamma| over every trained norm
    layer's gamma (the zero-initialised ones of the residual ends included)."""
    from modeling.training_graph import build_training_step

    def l1_cost(l1):
        with configured(GN_DEMO + ['TRAIN.NORM_L1={}'.format(l1)]), tf.Graph().as_default():
            losses = build_training_step().losses
            gammas = [v for v in tf.trainable_variables() if v.op.name.endswith('/gamma')]
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                sess.run([g.assign(tf.random.normal(tf.shape(g))) for g in gammas])
                costs = [t for name, t in losses.items() if name.endswith('norm_l1_cost')]
                return sess.run([costs, gammas])
    (cost,), gammas = l1_cost(0.01)
    assert len(gammas) > 30
    assert cost == pytest.approx(0.01 * sum(np.abs(g).sum() for g in gammas), rel=1e-5)
    assert l1_cost(0.)[0] == []  # off: no such cost


C4_R50 = ['MODE_FPN=False', 'BACKBONE.DEPTH=50', 'BACKBONE.NORM=FreezeBN']
VARIANTS = [  # every backbone family, norm, head and the cascade, pruned and rebuilt
    (C4_R50, 'c4-r50-freezebn', []),
    (['CASCADE.ENABLED=True', 'BACKBONE.NORM=GN'] + GN_DEMO, 'cascade-gn-4conv', []),
    (['BACKBONE.NORM=SyncBN', 'FPN.FRCNN_HEAD_FUNC=fastrcnn_4conv1fc_head'], 'fpn-syncbn-4conv',
     []),
    # fresh weights: every branch ends in gamma 0; res4 and res5 (on the RoIs) go
    (C4_R50, 'c4-r50-dropped', ['--drop-blocks', 0, '--keep-blocks', '^group[01]/',
                                '--exclude', '^rpn/']),
]


@pytest.mark.parametrize('overrides, args', [pytest.param(o, a, id=i) for o, i, a in VARIANTS])
def test_pruned_variant_builds_and_loads(overrides, args, tmp_path):
    model = make_model(str(tmp_path / 'model'), overrides)
    out = str(tmp_path / 'pruned')
    # random weights: 0.9 of the largest norm prunes part of most layers
    assert run_prune('--load', model, '--threshold', 0.9, '--output', out,
                     '--equalization', 'arithmetic_mean', *(args or ['--exclude', '^rpn/'])) == 0
    before, after = read_weights(model), read_weights(out)
    with model_config(out):
        widths, groups = dict(cfg.PRUNE.CHANNELS), dict(cfg.PRUNE.GN_GROUPS)
        dropped = list(cfg.PRUNE.DROPPED_BLOCKS)
    assert widths and not any(k.startswith('rpn/') for k in widths)
    if args:
        assert dropped == ['group2/block{}'.format(i) for i in range(6)] + \
            ['group3/block{}'.format(i) for i in range(3)]
        assert 'group3/block1/conv2/W' not in after and 'group3/block1/conv3/bn/beta' in after
    assert all(w % 8 == 0 and w >= 16 for w in widths.values())
    assert sum(v.size for v in after.values()) < sum(v.size for v in before.values())
    for gn, g in groups.items():  # recorded counts divide the pruned widths
        assert after[gn + '/gamma'].shape[0] % g == 0
    for name in ('fastrcnn/class/W', 'cascade_rcnn_stage3/outputs/class/W', 'maskrcnn/conv/W'):
        if name in before:  # outputs never pruned
            assert after[name].shape[-1] == before[name].shape[-1]
    boxes = detections(out, _image())[0]
    assert boxes.ndim == 2 and boxes.shape[1] == 4


# ---------------------------------------------------------------------------- entry points
def run_script(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable] + [str(a) for a in args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


E2E = [pytest.param(['BACKBONE.NORM=GN'] + GN_DEMO, id='r18-gn-demo'),
       # the R-50 FPN Mask R-CNN takes minutes on 2 cores: `pytest --run-slow` only; the
       # R-18 one above and tests/test_prune.py's C4 R-50 variant cover it by default
       pytest.param(['BACKBONE.DEPTH=50', 'BACKBONE.NORM=FreezeBN'], id='r50-fpn-mask',
                    marks=pytest.mark.slow)]


@pytest.mark.parametrize('overrides', E2E)
def test_pruned_model_trains_predicts_and_exports(overrides, tmp_path):
    """Channels pruned at 0.9 except res2's (--exclude), and every residual branch left at
    gamma 0 removed, res2's too: --exclude keeps channels, not blocks."""
    model = make_model(str(tmp_path / 'model'), overrides, edit=_live_blocks)
    pruned = str(tmp_path / 'pruned')
    p = run_script(['prune.py', '--load', model, '--threshold', 0.9, '--output', pruned,
                    '--drop-blocks', 0., '--exclude', '^group0/'])
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r'^total .*->', p.stdout, re.M), p.stdout[-2000:]
    assert re.search(r'prune.py: \d+ residual branches removed', p.stdout), p.stdout[-2000:]
    logdir = str(tmp_path / 'retrain')
    p = run_script(['train.py', '--load', pruned, '--logdir', logdir, '--config'] +
                   SHORT_TRAINING)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'Not loaded' not in p.stdout + p.stderr
    with model_config(pruned):
        widths, dropped = dict(cfg.PRUNE.CHANNELS), list(cfg.PRUNE.DROPPED_BLOCKS)
    assert dropped and not set(dropped) & set(LIVE_BLOCKS) and 'group0/block0' in dropped
    assert widths and not any(layer.startswith('group0/') for layer in widths)
    with model_config(logdir):  # the retrained run keeps the pruned widths and blocks
        assert cfg.PRUNE.CHANNELS == widths and cfg.TRAIN.WEIGHT_DECAY == 0.
        assert cfg.PRUNE.DROPPED_BLOCKS == dropped
    image = os.path.join(str(tmp_path), 'image.png')
    cv2.imwrite(image, _image().astype(np.uint8))
    frozen = str(tmp_path / 'frozen.pb')
    p = run_script(['predict.py', '--load', logdir, '--predict', image, '--output',
                    str(tmp_path / 'out'), '--export-pb', frozen])
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'Not loaded' not in p.stdout + p.stderr
    assert re.search(r'image.png: \d+ detections', p.stdout), p.stdout[-2000:]
    graph_def = tf.GraphDef()
    with open(frozen, 'rb') as f:
        graph_def.ParseFromString(f.read())
    # the model's nodes sit in the graph's function library, under 'model/'
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    kernels = {re.sub('^model/', '', n.name[:-len('/W')]):
               [d.size for d in n.attr['value'].tensor.tensor_shape.dim]
               for n in nodes if n.op == 'Const' and n.name.endswith('/W')}
    exported = [layer for layer in widths if layer in kernels and 'deconv' not in layer]
    assert exported, sorted(kernels)[:5]  # the narrower layers, as narrow in the export
    assert all(kernels[layer][-1] == widths[layer] for layer in exported)


BAD = [  # (arguments after --load MODEL, pattern of the one Error: line)
    (['--threshold', '1.5', '--output', '{tmp}/a'], r'--threshold must be in \[0, 1\]'),
    (['--threshold', '0.5', '--output', '{tmp}/c', '--equalization', 'median'],
     r"invalid choice: 'median'"),
    (['--threshold', '0.5', '--output', '{tmp}/d', '--exclude', '.'],
     r'--exclude .* matches a layer of every channel group'),
    (['--threshold', '0.5', '--output', '{tmp}/e', '--exclude', '('], r'not a valid regular'),
    (['--threshold', '0.5', '--output', '{model}'], r'exists and is not empty'),
    (['--threshold', '0', '--output', '{tmp}/i', '--drop-blocks', '-1'],
     r'--drop-blocks must be >= 0'),
    (['--threshold', '0', '--output', '{tmp}/j', '--drop-blocks', '0.1'],  # BACKBONE.NORM=None
     r'--drop-blocks needs a backbone with norm layers'),
    (['--threshold', '0', '--output', '{tmp}/k', '--keep-blocks', 'group3'],
     r'--keep-blocks .* give --drop-blocks too'),
    (['--threshold', '0', '--output', '{tmp}/l', '--drop-blocks', '0', '--keep-blocks', '[a'],
     r'--keep-blocks .* not a valid regular'),
]


def test_bad_arguments_are_one_line_errors(tiny_model, tmp_path):
    cases = [(['--load', tiny_model] + [a.format(tmp=tmp_path, model=tiny_model) for a in args],
              pattern) for args, pattern in BAD]
    cases += [(['--threshold', '0.5', '--output', str(tmp_path / 'g')], r'missing --load'),
              (['--load', str(tmp_path / 'nothere'), '--threshold', '0.5', '--output',
                str(tmp_path / 'h')], r'--load: .*nothere.* does not exist')]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda c: run_script(['prune.py'] + c[0], timeout=300), cases))
    for (args, pattern), p in zip(cases, runs):
        info = '{}: exit {}\n{}'.format(args, p.returncode, p.stderr[-2000:])
        errors = [line for line in p.stderr.splitlines() if line.startswith('Error: ')]
        assert p.returncode == 1 and 'Traceback' not in p.stderr, info
        assert len(errors) == 1 and re.search(pattern, errors[0]), info
    assert not any(os.path.exists(tmp_path / d) for d in 'acdeghijkl')
