"""Same weights, same answers as tensorpack (issue 13).

The tensorpack reference fixture (``../shared/fixtures/tensorpack_reference``, its README
says how it was made) holds tensorpack's outputs, stage by stage, for five R50 Mask R-CNN
variants with synthetic weights from its ``weights.py``. Each variant is built here with
its ``project_overrides`` on the DEFAULT config (the defaults are tensorpack's layout),
fed the fixture's resized image, and compared with the fixture's own comparator and
tolerances (``check_project.compare`` / ``TOLERANCES``): features, RPN proposals,
detections, masks, in that order; a failure names the first stage that differs. One
variant also goes through the frozen graph the exports wrap and through the batched
predictor (``predict.py --batch-size 2``, beside a smaller image). Also here: the pre/post-processing
conventions (uint8 resize, isotropic scale-back) against the fixture's image_resize.json,
and old runs' config.yaml files keeping the anchor layout they were trained with.
"""
import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import yaml

from common import read_image, resize_shortest_edge
from config import config as cfg, finalize_configs, legacy_values
from dataset import DatasetRegistry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, '..', 'shared', 'fixtures', 'tensorpack_reference')
VARIANTS = ('r50_fpn_mask', 'r50_c4_mask', 'r50_c4_mask_w336', 'r50_fpn_cascade_mask',
            'r50_fpn_gn_mask')
STAGES = ('features', 'proposals', 'detections', 'masks')
tf1 = tf.compat.v1

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FIXTURE),
    reason='tensorpack reference fixture not found at {} (only in the shared workspace)'
    .format(os.path.abspath(FIXTURE)))


def _fixture_module(name):
    """weights.py / check_project.py of the fixture, imported by path."""
    spec = importlib.util.spec_from_file_location('tp_fixture_' + name,
                                                  os.path.join(FIXTURE, name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configure(variant):
    """The variant's project_overrides on the current config, finalised for CPU inference.
    Returns the variant's config.yaml as a dict."""
    with open(os.path.join(FIXTURE, variant, 'config.yaml')) as f:
        vc = yaml.safe_load(f)
    if 'tp_fixture' not in DatasetRegistry.names():
        DatasetRegistry.register('tp_fixture', lambda: None)
        DatasetRegistry.register_metadata('tp_fixture', 'class_names', vc['class_names'][1:])
    cfg.update_args(list(vc['project_overrides']) +
                    ['DATA.TRAIN=tp_fixture', 'DATA.VAL=tp_fixture'])
    finalize_configs(is_training=False, num_gpus=0, registry=DatasetRegistry)
    return vc


def _tap_features(monkeypatch):
    """Name the backbone's returned feature maps 'fixture/<key>' (computation unchanged)."""
    import modeling.generalized_rcnn as gr

    def tapped(fn, keys):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            for key, t in zip(keys, out if isinstance(out, (list, tuple)) else [out]):
                tf.identity(t, name='fixture/' + key)
            return out
        return wrapped
    monkeypatch.setattr(gr, 'fpn_model', tapped(gr.fpn_model, ['p2', 'p3', 'p4', 'p5', 'p6']))
    monkeypatch.setattr(gr, 'resnet_c4_backbone', tapped(gr.resnet_c4_backbone, ['c4']))


def _fixture_weights(variant, weights_module):
    """The project's WeightsLoader, its values made by the fixture's ``make_weights`` for
    the variables of the graph being initialised (variables of unknown kind: none)."""
    from utils.training import WeightsLoader

    class FixtureWeights(WeightsLoader):
        def __init__(self):  # no file to read
            self.path, self.skip_regex = 'weights.make_weights({})'.format(variant), None
            self.values, self.loaded, self.skipped = {}, [], {}

        def _run_init(self, sess):
            shapes = {v.op.name: v.shape.as_list() for v in tf1.global_variables()
                      if weights_module.weight_kind(v.op.name) is not None}
            self.values = weights_module.make_weights(shapes, variant)
            super()._run_init(sess)
    return FixtureWeights()


def _project_outputs(outputs, feature_keys, check):
    """Predictor outputs (boxes, scores, labels, masks, proposal boxes, proposal scores,
    features...) -> the dict ``check_project.compare`` expects."""
    boxes, scores, labels, masks, pboxes, pscores = outputs[:6]
    got = {'det_boxes': boxes, 'det_scores': scores, 'det_labels': labels, 'det_masks': masks}
    for key, x in zip(feature_keys, outputs[6:]):
        x = np.transpose(x, (0, 3, 1, 2)) if cfg.BACKBONE.DATA_FORMAT == 'NHWC' else x
        for k, val in check.feature_summary(x).items():
            got['feat_{}_{}'.format(key, k)] = val
    order = np.argsort(-pscores, kind='stable')  # the reference lists them by score
    got['proposal_boxes'], got['proposal_scores'] = pboxes[order], pscores[order]
    return got


def _assert_stages(variant, res, where=''):
    """Fail naming the first stage outside the fixture's tolerances, with its numbers."""
    numbers = {'features': 'features', 'proposals': 'proposals', 'detections': 'detections',
               'masks': 'detections'}  # the mask differences are with the detections
    for stage in STAGES:
        if not res['ok'][stage]:
            key = numbers[stage]
            pytest.fail('{}{}: first stage that differs from tensorpack: {} ({})'.format(
                variant, where, stage, json.dumps(res[key], default=float)))


def _fixture_image(vc):
    img = np.load(os.path.join(FIXTURE, 'image_resized.npy'))
    if 'input_crop' in vc:
        img = np.ascontiguousarray(img[:vc['input_crop'][0], :vc['input_crop'][1]])
    return img


def _frozen_and_run(predictor, img):
    """The predictor's graph frozen as export.py freezes it (the model inside both
    exports), run in a fresh graph and session."""
    from export import inner_graph_def
    names = [t.op.name for t in predictor.output_tensors]
    graph_def = inner_graph_def(predictor, names)
    with tf.Graph().as_default() as graph, tf1.Session(graph=graph) as sess:
        tf1.import_graph_def(graph_def, name='')
        return sess.run([n + ':0' for n in names], {'image:0': img})


@pytest.fixture(scope='module')
def built():
    """The last built (project_overrides, predictor, weights): r50_c4_mask_w336 is
    r50_c4_mask's model and weights on a cropped input, so it is built once for both."""
    cache = {}
    yield cache
    if cache:
        cache['predictor'].sess.close()


def _predictor(variant, vc, feature_keys, built, monkeypatch):
    """(predictor, weights loader) of the configured variant, reused from ``built`` when
    the previous variant had the same model."""
    from predict import build_predictor
    if built.get('overrides') != vc['project_overrides']:
        if built:
            built['predictor'].sess.close()
        _tap_features(monkeypatch)
        weights = _fixture_weights(variant, _fixture_module('weights'))
        predictor = build_predictor(weights, ['output/proposal_boxes', 'output/proposal_scores']
                                    + ['fixture/' + k for k in feature_keys])
        built.update(overrides=vc['project_overrides'], predictor=predictor, weights=weights)
    return built['predictor'], built['weights']


@pytest.mark.parametrize('variant', VARIANTS)
def test_same_outputs_as_tensorpack(variant, fresh_cfg, built, monkeypatch):
    """Default config + the variant's keys reproduce tensorpack's outputs: features,
    proposals (>= 99% of the top 1000 within 0.01 px), detections (all, boxes <= 0.02 px,
    scores <= 1e-4), masks (<= 5e-3) -- the fixture README's tolerances."""
    weights_module, check = _fixture_module('weights'), _fixture_module('check_project')
    vc = _configure(variant)
    with np.load(os.path.join(FIXTURE, variant, 'reference_outputs.npz')) as f:
        ref = {k: f[k] for k in f.files}
    feature_keys = [str(k) for k in ref['feature_names']]
    predictor, weights = _predictor(variant, vc, feature_keys, built, monkeypatch)
    assert sorted(weights.loaded) == sorted(str(n) for n in ref['var_names']), \
        '{}: the graph\'s variables differ from tensorpack\'s'.format(variant)
    assert weights_module.weights_digest(weights.values) == str(ref['weights_digest'])
    img = _fixture_image(vc)
    _assert_stages(variant, check.compare(ref, _project_outputs(predictor(img), feature_keys,
                                                                check)))
    if variant == 'r50_fpn_mask':  # the exports' frozen model computes the same
        exported = _frozen_and_run(predictor, img)
        _assert_stages(variant, check.compare(ref, _project_outputs(exported, feature_keys,
                                                                    check)), ' (frozen)')
        # and so does the batched predictor (--batch-size), next to a smaller image
        batched = _batched_predictor(feature_keys, weights, monkeypatch)
        try:
            first = batched([img, np.ascontiguousarray(img[:-64, :-96])])[0]
        finally:
            batched.predictor.sess.close()
        _assert_stages(variant, check.compare(ref, _project_outputs(first, feature_keys,
                                                                    check)), ' (batch of 2)')


def _batched_predictor(feature_keys, weights, monkeypatch):
    """predict.py's predictor of 2 images per run, features tapped per image."""
    import modeling.generalized_rcnn as gr
    from predict import build_predictor
    if gr.fpn_model.__name__ != 'wrapped':  # a reused predictor: the taps are gone
        _tap_features(monkeypatch)
    return build_predictor(weights, ['output/proposal_boxes', 'output/proposal_scores'] +
                           ['fixture/' + k for k in feature_keys], batch_size=2)


# ------------------------------------------------------------------ pre/post-processing
def _resize_info():
    with open(os.path.join(FIXTURE, 'image_resize.json')) as f:
        return json.load(f)


def test_uint8_resize_reproduces_tensorpack_input(fresh_cfg):
    """PREPROC.RESIZE_UINT8=True gives exactly the image tensorpack fed its model; the
    default float resize differs from it by less than one grey level."""
    info = _resize_info()
    img = read_image(os.path.join(FIXTURE, 'image.png'), 3, 'BGR')
    assert img.shape[:2] == tuple(info['original_hw'])
    want = np.load(os.path.join(FIXTURE, 'image_resized.npy'))
    got, (sy, sx) = resize_shortest_edge(img, info['short_edge'], info['max_size'], uint8=True)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose([sy, sx], [info['scale_y'], info['scale_x']], rtol=1e-12)
    as_float, _ = resize_shortest_edge(img, info['short_edge'], info['max_size'])
    diff = np.abs(as_float - want)
    # cv2 resizes uint8 with fixed-point weights: under one grey level apart
    assert 0 < diff.max() < 1 and not np.array_equal(as_float, want)


@pytest.mark.parametrize('isotropic', [False, True])
def test_scale_back_per_axis_or_isotropic(fresh_cfg, isotropic):
    """Boxes back to the original 300x400 image: per axis by default, tensorpack's
    isotropic sqrt(sy * sx) with TEST.ISOTROPIC_SCALE_BACK=True."""
    import eval as ev
    info = _resize_info()
    cfg.PREPROC.TEST_SHORT_EDGE_SIZE, cfg.PREPROC.MAX_SIZE = info['short_edge'], info['max_size']
    cfg.TEST.ISOTROPIC_SCALE_BACK = isotropic
    box = np.float32([[34.1, 20.5, 300.25, 250.]])

    def model_func(resized):
        assert resized.shape[:2] == tuple(info['resized_hw'])
        return box, np.float32([0.9]), np.int32([1])
    img = np.zeros(tuple(info['original_hw']) + (3,), np.float32)
    got = ev.predict_image(img, model_func)[0].box
    if isotropic:
        s = info['tensorpack_isotropic_scale']
        want = box[0] / s
    else:
        want = box[0] / np.float32([info['scale_x'], info['scale_y']] * 2)
    np.testing.assert_allclose(got, np.minimum(want, [400, 300, 400, 300]), rtol=1e-5)


# ------------------------------------------------------------------ old runs
def test_old_run_config_keeps_its_layout(fresh_cfg, tmp_path):
    """A run's config.yaml saved before RPN.ANCHOR_OFFSET (and the other keys whose default
    changed) existed gets the old values; a current one, or a partial user file, does not."""
    old = tmp_path / 'old.yaml'
    tree = cfg.to_dict()
    del tree['RPN']['ANCHOR_OFFSET'], tree['BACKBONE']['C4_PAD_INPUT']
    del tree['FRCNN']['DECODE_CLIP_SIZE'], tree['TEST']['MASK_PASTE']
    old.write_text(yaml.safe_dump(tree))
    assert legacy_values(str(old)) == {'RPN.ANCHOR_OFFSET': 0.5, 'BACKBONE.C4_PAD_INPUT': True,
                                       'FRCNN.DECODE_CLIP_SIZE': 1000., 'TEST.MASK_PASTE': 'edge'}
    new = tmp_path / 'new.yaml'
    cfg.save_yaml(str(new))
    assert legacy_values(str(new)) == {}
    assert cfg.RPN.ANCHOR_OFFSET == 0. and not cfg.BACKBONE.C4_PAD_INPUT  # the defaults


def test_predict_uses_old_layout_of_old_run(fresh_cfg, tmp_path, monkeypatch):
    """predict.py on an old run's folder: the run's config.yaml without RPN.ANCHOR_OFFSET
    gives the old 0.5 layout; --config still overrides it."""
    import predict
    run = tmp_path / 'run'
    run.mkdir()
    tree = cfg.to_dict()
    del tree['RPN']['ANCHOR_OFFSET']
    tree['DATA']['TRAIN'], tree['DATA']['VAL'] = ['shapes_train'], ['shapes_val']
    (run / 'config.yaml').write_text(yaml.safe_dump(tree))
    seen = {}

    def fake_run(args, weights):
        seen['offset'], seen['pad'] = cfg.RPN.ANCHOR_OFFSET, cfg.BACKBONE.C4_PAD_INPUT
        return 0
    monkeypatch.setattr(predict, 'run', fake_run)
    monkeypatch.setattr('utils.training.WeightsLoader.__init__', lambda self, path: None)
    argv = ['--load', str(run), '--predict', 'x.png']
    assert predict.main(predict.parse_args(argv)) == 0
    assert seen == {'offset': 0.5, 'pad': False}  # C4_PAD_INPUT was in the file
    cfg.freeze(False)  # predict.py's config is fresh in a new process
    assert predict.main(predict.parse_args(argv + ['--config', 'RPN.ANCHOR_OFFSET=0.25'])) == 0
    assert seen['offset'] == 0.25


def test_tensorpack_zoo_config_sets_tensorpack_conventions(fresh_cfg):
    """configs/tensorpack_zoo.yaml: every convention key at tensorpack's behaviour, and
    the fixture's resize through predict_image's path is tensorpack's input exactly."""
    import eval as ev
    cfg.load_yaml(os.path.join(ROOT, 'configs', 'tensorpack_zoo.yaml'))
    assert (cfg.RPN.ANCHOR_OFFSET, cfg.BACKBONE.C4_PAD_INPUT, cfg.FRCNN.DECODE_CLIP_SIZE,
            cfg.RPN.DROP_EMPTY_PROPOSALS, cfg.TEST.MASK_PASTE) == (0., False, 0., False, 'zeros')
    assert cfg.PREPROC.MAX_SIZE == 1344 and cfg.PREPROC.RESIZE_UINT8
    assert cfg.TEST.ISOTROPIC_SCALE_BACK
    info = _resize_info()
    cfg.PREPROC.TEST_SHORT_EDGE_SIZE, cfg.PREPROC.MAX_SIZE = info['short_edge'], info['max_size']
    seen = []
    img = read_image(os.path.join(FIXTURE, 'image.png'), 3, 'BGR')
    ev.predict_image(img, lambda x: seen.append(x) or (np.zeros((0, 4), np.float32),
                                                       np.zeros(0, np.float32),
                                                       np.zeros(0, np.int32)))
    np.testing.assert_array_equal(seen[0], np.load(os.path.join(FIXTURE, 'image_resized.npy')))


def test_resume_of_old_run_keeps_its_layout(fresh_cfg, tmp_path):
    """train.py resuming a log directory whose config.yaml predates RPN.ANCHOR_OFFSET: the
    user's config file (without the key) does not switch the run to the new layout."""
    import argparse
    from cli import setup_config
    tree = cfg.to_dict()
    del tree['RPN']['ANCHOR_OFFSET']
    run_config = tmp_path / 'config.yaml'
    run_config.write_text(yaml.safe_dump(tree))
    args = argparse.Namespace(config_file=os.path.join(ROOT, 'configs', 'shapes_demo.yaml'),
                              config=[])
    setup_config(args, is_training=False, run_config=str(run_config))
    assert cfg.RPN.ANCHOR_OFFSET == 0.5 and not cfg.BACKBONE.C4_PAD_INPUT
    cfg.freeze(False)
    cfg.RPN.ANCHOR_OFFSET = 0.
    setup_config(args, is_training=False, run_config=str(tmp_path / 'missing.yaml'))  # new run
    assert cfg.RPN.ANCHOR_OFFSET == 0.
