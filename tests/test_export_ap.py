"""COCO AP of the exports: the SavedModel and the frozen graph that ``predict.py
--export-savedmodel / --export-pb`` write, run on a validation set's image files by plain
TensorFlow in a fresh process (no project code), give the box and mask AP that
``predict.py --evaluate`` prints (within 0.1 points) and its detections (same classes and
order up to tied scores, boxes within 0.5 px, scores within 1e-3, each mask IoU >= 0.99).
The exported model's AP is computed here, with pycocotools, from its own outputs (``category_ids``,
``boxes``, pasted ``masks``): the SavedModel through ``encoded_image`` (PNG bytes), the
frozen graph through ``images`` (decoded by TensorFlow, in the model's channel order).

Default suite: the tiny model with random weights. An untrained model scores ~0 AP on real
labels, where any disagreement would go unseen; so its validation set is 8 shapes images
whose ground truth is two in three of that model's own detections, each moved by 1-10 % of
its size, under COCO ids 2, 5, 9: the AP lands mid-range, where a moved box or mask, a
changed score order or a wrong category id moves it.
Slow (``--run-slow``): the trained demo model (configs/shapes_demo.yaml) on all of
shapes_val, from the train.py log directory in ``$RCNN_DEMO_MODEL`` (skipped without it).

bf16 (``predict.py --precision bf16``, oneDNN on): the exports carry the bfloat16 rewrite
(bfloat16 convolutions and matmuls in both graphs) and plain TensorFlow serves them; their
AP, and predict.py's own in bf16, stay within 0.5 AP points of fp32 for the demo model.
For the tiny random model, whose near-tied scores reorder under any bfloat16 rounding, the
exports stay within 3 points (predict.py's bf16 session, which oneDNN also fuses
differently, is not compared there).
"""
import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tensorflow.core.framework import types_pb2

from tiny import (TINY, assert_masks_match, configured, matching_order, run_plain_tensorflow,
                  spread_class_scores)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, 'modeling', 'generalized_rcnn.py')),
    reason='needs the real model (modeling/generalized_rcnn.py)')

CATEGORY_IDS = [2, 5, 9]  # the pseudo ground truth's ids of circle, square, triangle
SHIFTS = (0.01, 0.03, 0.06, 0.1)  # ground-truth box j moves by SHIFTS[j % 4] of its size
AP_TOLERANCE = 0.001  # 0.1 AP points
BF16_AP_TOLERANCE = 0.03  # the tiny random model's near-tied scores reorder in bf16
BF16_DEMO_AP_TOLERANCE = 0.005  # the target for the trained demo model
AP_KEYS = {'bbox': 'mAP(bbox)/IoU=0.5:0.95', 'segm': 'mAP(segm)/IoU=0.5:0.95'}
DETECTIONS_CHECKED = 5  # images whose detections are compared one by one
SEED = 3  # of the tiny model's random weights
LOGIT_SPREAD = 100.  # scales the random class-logit weights (tiny.spread_class_scores)

PLAIN_TF = """
    import json

    import numpy as np
    import tensorflow as tf

    NAMES = ['num_detections', 'boxes', 'scores', 'category_ids', 'masks']

    def save(route, outputs):
        arrays = {}
        for i, out in enumerate(outputs):
            n = int(out[0][0])
            for name, value in zip(NAMES[1:], out[1:]):
                value = value[0, :n]
                arrays['{}_{}'.format(i, name)] = (np.packbits(value, axis=-1)
                                                   if name == 'masks' else value)
        np.savez(os.path.join(TMP, route + '.npz'), **arrays)

    with open(os.path.join(TMP, 'savedmodel', 'metadata.json')) as f:
        bgr = json.load(f)['channel_order'] == 'BGR'
    serve = tf.saved_model.load(os.path.join(TMP, 'savedmodel')).signatures['encoded_image']
    encoded = [tf.io.read_file(path) for path in FILES]
    save('saved', ([serve(encoded=tf.reshape(e, [1]))[n].numpy() for n in NAMES]
                   for e in encoded))
    images = [tf.io.decode_image(e, channels=3).numpy() for e in encoded]  # RGB
    save('frozen', iter_frozen(os.path.join(TMP, 'frozen.pb'), [n + ':0' for n in NAMES],
                               ({'images:0': (img[..., ::-1] if bgr else img)[None]}
                                for img in images)))
"""


def run_predict(args, timeout=1200, env=None):
    """predict.py in a fresh process (environment ``env`` or ours); its completed process."""
    env = dict(env or os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, 'predict.py'] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def printed_metrics(stdout):
    """The box and mask AP lines that predict.py --evaluate prints: {'bbox': AP, 'segm': AP}."""
    found = {}
    for iou_type, key in AP_KEYS.items():
        match = re.search(r'^\s+{}\s+([-\d.]+)$'.format(re.escape(key)), stdout, re.M)
        assert match, 'predict.py printed no {}:\n{}'.format(key, stdout[-2000:])
        found[iou_type] = float(match.group(1))
    return found


def exported_results(npz_path, image_ids, shapes):
    """COCO-format results (category_id = the export's ``category_ids``) of one route."""
    arrays = np.load(npz_path)
    results = []
    for i, (image_id, (h, w)) in enumerate(zip(image_ids, shapes)):
        masks = np.unpackbits(arrays['{}_masks'.format(i)], axis=-1, count=w)
        for box, score, cat, mask in zip(arrays['{}_boxes'.format(i)],
                                         arrays['{}_scores'.format(i)],
                                         arrays['{}_category_ids'.format(i)], masks):
            rle = mask_util.encode(np.asfortranarray(mask[:h]))
            rle['counts'] = rle['counts'].decode('ascii')
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({'image_id': image_id, 'category_id': int(cat), 'score': float(score),
                            'bbox': [x1, y1, x2 - x1, y2 - y1], 'segmentation': rle})
    return results


def coco_ap(coco_gt, results):
    """{'bbox': AP, 'segm': AP} (COCO mAP@[.5:.95]) of COCO-format results."""
    aps = {}
    for iou_type in AP_KEYS:
        dets = [{k: v for k, v in r.items() if k != ('bbox' if iou_type == 'segm' else
                                                    'segmentation')} for r in results]
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        aps[iou_type] = float(ev.stats[0])
    return aps


def assert_same_detections(got, want):
    """COCO-format results of one image: the export's vs predict.py's results json (the
    same detections in the same order up to tied scores, `matching_order`)."""
    order = matching_order([(d['category_id'], d['bbox'], d['score']) for d in got],
                           [(d['category_id'], d['bbox'], d['score']) for d in want], 0.5, 1e-3)
    assert_masks_match([mask_util.decode(got[j]['segmentation']) for j in order],
                       [mask_util.decode(d['segmentation']) for d in want])


ValSet = collections.namedtuple('ValSet', ['coco_gt', 'files', 'image_ids'])
ValSet.__doc__ = """A validation set: pycocotools ground truth, image files, their image ids."""


def export_and_compare(tmp, predict_args, val, env=None, tolerance=AP_TOLERANCE,
                       same_detections=True):
    """Run predict.py --evaluate --export-savedmodel --export-pb (in ``env``), then the
    exports in plain TensorFlow on ``val``'s files; assert the exports' AP within
    ``tolerance`` (None: no check) of predict.py's and (``same_detections``) the same
    detections on the first `DETECTIONS_CHECKED` images. Returns {'predict' / 'saved' /
    'frozen': {'bbox': AP, 'segm': AP}}."""
    results_json = os.path.join(tmp, 'results.json')
    p = run_predict(predict_args + ['--evaluate', results_json, '--export-savedmodel',
                                    os.path.join(tmp, 'savedmodel'),
                                    '--export-pb', os.path.join(tmp, 'frozen.pb')], env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    aps = {'predict': printed_metrics(p.stdout)}
    plain = run_plain_tensorflow(PLAIN_TF, tmp, TMP=tmp, FILES=val.files)
    assert plain.returncode == 0, plain.stderr[-3000:]
    with open(results_json) as f:
        want = json.load(f)
    shapes = [(val.coco_gt.imgs[i]['height'], val.coco_gt.imgs[i]['width'])
              for i in val.image_ids]
    for route in ('saved', 'frozen'):
        got = exported_results(os.path.join(tmp, route + '.npz'), val.image_ids, shapes)
        for image_id in val.image_ids[:DETECTIONS_CHECKED if same_detections else 0]:
            assert_same_detections([d for d in got if d['image_id'] == image_id],
                                   [d for d in want if d['image_id'] == image_id])
        aps[route] = coco_ap(val.coco_gt, got)
    print('COCO AP (box, mask):', json.dumps(aps))
    if tolerance is not None:
        assert_close_aps({k: aps[k] for k in ('saved', 'frozen')}, aps['predict'], tolerance)
    return aps


def assert_close_aps(aps, reference, tolerance):
    """Every AP of ``aps`` ({route: {'bbox', 'segm'}}) within ``tolerance`` of ``reference``."""
    for route, values in aps.items():
        for iou_type in AP_KEYS:
            assert abs(values[iou_type] - reference[iou_type]) <= tolerance, (route, aps,
                                                                              reference)


def bf16_matmuls(graph_def):
    """Convolutions and matmuls computing in bfloat16 in a GraphDef (its functions too)."""
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return sum(n.op in ('Conv2D', 'Conv2DBackpropInput', 'MatMul', 'BatchMatMulV2')
               and n.attr['T'].type == types_pb2.DT_BFLOAT16 for n in nodes)


def read_graph_defs(folder):
    """(the SavedModel's GraphDef, the frozen graph's) of an export folder."""
    from tensorflow.core.framework import graph_pb2
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(folder, 'savedmodel', 'saved_model.pb'), 'rb') as f:
        saved.ParseFromString(f.read())
    frozen = graph_pb2.GraphDef()
    with open(os.path.join(folder, 'frozen.pb'), 'rb') as f:
        frozen.ParseFromString(f.read())
    return saved.meta_graphs[0].graph_def, frozen


def bf16_export_and_compare(tmp, predict_args, val, reference, tolerance, routes):
    """predict.py --precision bf16 (oneDNN on: the rewrite needs it at export): its exports
    compute in bfloat16, and the AP of each of ``routes`` ('predict': predict.py's own in
    bf16, 'saved', 'frozen': the exports) is within ``tolerance`` of the float32
    ``reference``. Returns `export_and_compare`'s APs."""
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS='1')
    aps = export_and_compare(tmp, predict_args + ['--precision', 'bf16'], val, env=env,
                             tolerance=None, same_detections=False)
    with open(os.path.join(tmp, 'savedmodel', 'metadata.json')) as f:
        assert json.load(f)['precision'] == 'bf16'
    assert all(bf16_matmuls(g) > 20 for g in read_graph_defs(tmp))
    assert_close_aps({k: aps[k] for k in routes}, reference, tolerance)
    return aps


# ------------------------------------------------------------------ default: tiny model
def _shifted(mask, dx, dy):
    """uint8 [H, W] mask moved by (dx, dy) >= 0 pixels, zeros coming in."""
    out = np.zeros_like(mask)
    out[dy:, dx:] = mask[:mask.shape[0] - dy, :mask.shape[1] - dx]
    return out


def pseudo_ground_truth(detections, image):
    """COCO annotations of one image from the model's own detections: two in three of
    them, box and mask moved right and down by `SHIFTS` of the box size."""
    anns = []
    for j, r in enumerate(detections):
        if j % 3 == 2:
            continue
        x1, y1, x2, y2 = (float(v) for v in r.box)
        dx, dy = (int(round(SHIFTS[j % 4] * s)) for s in (x2 - x1, y2 - y1))
        mask = _shifted(r.mask, dx, dy)
        rle = mask_util.encode(np.asfortranarray(mask))
        rle['counts'] = rle['counts'].decode('ascii')
        anns.append({'image_id': image['id'], 'category_id': CATEGORY_IDS[r.class_id - 1],
                     'bbox': [x1 + dx, y1 + dy, x2 - x1, y2 - y1], 'iscrowd': 0,
                     'segmentation': rle, 'area': float(max(mask.sum(), 1))})
    return anns


def write_tiny_model_and_split(tmp):
    """Random weights of the tiny model (an .npz for --load) and a COCO json of shapes
    images with `pseudo_ground_truth`. Returns (npz path, json path, files, image ids)."""
    import tensorflow as tf
    from tensorpack import OfflinePredictor

    import predict
    from common import read_image
    from dataset import DatasetRegistry
    from eval import predict_image
    with configured(is_training=False):
        files = [r['file_name'] for r in DatasetRegistry.get('shapes_val').inference_roidbs()]
        config = predict.predict_config(None)
        config.create_graph = False  # built in this seeded graph: the same weights every run
        with tf.Graph().as_default():
            tf.compat.v1.set_random_seed(SEED)
            predictor = OfflinePredictor(config)
            variables = tf.compat.v1.global_variables()
            spread_class_scores(predictor.sess, LOGIT_SPREAD)  # every category id wins somewhere
        weights = os.path.join(tmp, 'weights.npz')
        np.savez(weights, **{v.op.name: x for v, x in
                             zip(variables, predictor.sess.run(variables))})
        images, anns = [], []
        for i, path in enumerate(files):
            img = read_image(path)
            images.append({'id': i + 1, 'file_name': os.path.basename(path),
                           'height': img.shape[0], 'width': img.shape[1]})
            anns += pseudo_ground_truth(predict_image(img, predictor), images[-1])
        predictor.sess.close()
    for k, ann in enumerate(anns):
        ann['id'] = k + 1
    assert {a['category_id'] for a in anns} == set(CATEGORY_IDS), 'a class without ground truth'
    cats = [{'id': c, 'name': n} for c, n in zip(CATEGORY_IDS, ('circle', 'square', 'triangle'))]
    split = os.path.join(tmp, 'pseudo.json')
    with open(split, 'w') as f:
        json.dump({'images': images, 'annotations': anns, 'categories': cats}, f)
    return weights, split, files, [im['id'] for im in images]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """The tiny model's weights and pseudo ground truth, and predict.py's arguments for it."""
    tmp = str(tmp_path_factory.mktemp('export_ap'))
    weights, split, files, image_ids = write_tiny_model_and_split(tmp)
    splits = [['export_ap_pseudo', split, os.path.dirname(files[0])]]
    config = TINY + ['DATA.COCO_JSON_SPLITS={!r}'.format(splits),
                     "DATA.TRAIN=('export_ap_pseudo',)", "DATA.VAL=('export_ap_pseudo',)",
                     'DATA.DROP_UNUSED_CATEGORIES=False']
    return {'tmp': tmp, 'args': ['--load', weights, '--config'] + config,
            'val': ValSet(COCO(split), files, image_ids)}


@pytest.fixture(scope='module')
def fp32_aps(tiny):
    """`export_and_compare` of the tiny model in float32 (exports in ``tmp/fp32``)."""
    folder = os.path.join(tiny['tmp'], 'fp32')
    os.makedirs(folder)
    return export_and_compare(folder, tiny['args'], tiny['val'])


def test_exports_give_predict_evaluate_ap_tiny_model(fp32_aps):
    for iou_type in AP_KEYS:  # mid-range, where a difference would show
        assert 0.1 < fp32_aps['predict'][iou_type] < 0.95, fp32_aps


def test_bf16_export_carries_the_rewrite(tiny, fp32_aps):
    """predict.py --precision bf16 exports graphs whose convolutions and matmuls are
    bfloat16 (oneDNN's rewrite, made at export); plain TensorFlow serves them (on CPUs
    without bf16 units through Eigen's kernels) with an AP close to float32's."""
    bf16_export_and_compare(os.path.join(tiny['tmp'], 'bf16'), tiny['args'], tiny['val'],
                            fp32_aps['predict'], BF16_AP_TOLERANCE, ('saved', 'frozen'))
    assert not any(bf16_matmuls(g) for g in read_graph_defs(os.path.join(tiny['tmp'], 'fp32')))


# ------------------------------------------------------------------ slow: the demo model
def demo_model():
    """The trained demo's log directory (``$RCNN_DEMO_MODEL``); skips the test without it."""
    path = os.environ.get('RCNN_DEMO_MODEL', '')
    if not os.path.isdir(path):
        pytest.skip('set RCNN_DEMO_MODEL to the log directory of a trained demo '
                    '(make demo, or train.py --config-file configs/shapes_demo.yaml)')
    return path


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """The demo model's folder, shapes_val as predict.py registers it (100 images) and a
    folder for the exports."""
    from dataset import DatasetRegistry, register_shapes
    from dataset.dataset import roidbs_to_coco_gt
    from dataset.shapes import CLASS_NAMES
    model = demo_model()
    register_shapes()
    roidbs = DatasetRegistry.get('shapes_val').training_roidbs()
    val = ValSet(roidbs_to_coco_gt(roidbs, CLASS_NAMES), [r['file_name'] for r in roidbs],
                 [r['image_id'] for r in roidbs])
    return {'model': model, 'val': val, 'tmp': str(tmp_path_factory.mktemp('demo'))}


@pytest.fixture(scope='module')
def demo_fp32_aps(demo):
    """`export_and_compare` of the demo model in float32: 8 minutes on the shared 2 cores."""
    folder = os.path.join(demo['tmp'], 'fp32')
    os.makedirs(folder)
    return export_and_compare(folder, ['--load', demo['model']], demo['val'])


@pytest.mark.slow
def test_exports_give_predict_evaluate_ap_demo_model(demo_fp32_aps):
    assert min(demo_fp32_aps['predict'].values()) > 0.3, demo_fp32_aps  # a trained model


@pytest.mark.slow
def test_bf16_demo_ap_within_half_a_point_of_fp32(demo, demo_fp32_aps):
    """predict.py --precision bf16 and its bf16 exports on shapes_val: box and mask AP
    within 0.5 points of fp32. Runs on any CPU: where it has no bf16 units
    (`utils.precision.cpu_bf16_flags`, what --precision auto reads) through Eigen's
    bfloat16 kernels, slower than fp32 (BENCHMARKS.md)."""
    from utils.precision import cpu_bf16_flags
    print('CPU bfloat16 units: {}'.format(', '.join(cpu_bf16_flags()) or 'none (emulated)'))
    bf16_export_and_compare(os.path.join(demo['tmp'], 'bf16'), ['--load', demo['model']],
                            demo['val'], demo_fp32_aps['predict'], BF16_DEMO_AP_TOLERANCE,
                            ('predict', 'saved', 'frozen'))
