"""predict.py end to end, with a checkpoint of the tiny model trained for 2 steps:
--predict on a folder of odd images, --json, --evaluate, --benchmark, --visualize, the
exports (run by plain TensorFlow in a fresh process) and a bad --load path."""
import glob
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tiny import TINY, assert_masks_match, configured, matching_order, run_plain_tensorflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, 'modeling', 'generalized_rcnn.py')),
    reason='needs the real model (modeling/generalized_rcnn.py)')

# Two iterations at a reference batch of 1, no evaluation: a checkpoint in seconds.
TRAIN_CONFIG = TINY + ['TRAIN.REFERENCE_BATCH=1', 'TRAIN.LR_SCHEDULE=(1,1,2)',
                       'TRAIN.WARMUP=1', 'TRAIN.STEPS_PER_EPOCH=1', 'TRAIN.EVAL_PERIOD=0']


def run_script(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp('train'))
    p = run_script(['train.py', '--logdir', logdir, '--config'] + TRAIN_CONFIG)
    assert p.returncode == 0, p.stderr[-3000:]
    return logdir


def write_inputs(folder):
    """Valid inputs of every layout read_image accepts, one corrupt file, a stem clash."""
    rs = np.random.RandomState(0)
    os.makedirs(os.path.join(folder, 'sub'))
    colour = rs.randint(0, 256, size=(100, 140, 3)).astype(np.uint8)
    colour[20:60, 30:90] = (20, 200, 40)
    cv2.imwrite(os.path.join(folder, 'rgb.png'), colour)
    cv2.imwrite(os.path.join(folder, 'gray.png'), colour[:, :, 1])
    cv2.imwrite(os.path.join(folder, 'rgba.png'), np.dstack([colour, np.full((100, 140), 128,
                                                                          np.uint8)]))
    cv2.imwrite(os.path.join(folder, 'deep16.png'), colour.astype(np.uint16) * 257)
    cv2.imwrite(os.path.join(folder, 'sub', 'rgb.jpg'), colour)
    with open(os.path.join(folder, 'bad.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n but not really')
    return colour


def write_coco(basedir, split, image_folder, colour):
    """A 2-image COCO split with the shapes classes under non-contiguous ids 2, 5, 9."""
    os.makedirs(os.path.join(basedir, image_folder), exist_ok=True)
    os.makedirs(os.path.join(basedir, 'annotations'), exist_ok=True)
    images, anns = [], []
    for i in range(2):
        cv2.imwrite(os.path.join(basedir, image_folder, '{}.png'.format(i)), colour)
        images.append({'id': i + 1, 'file_name': '{}.png'.format(i), 'height': 100,
                       'width': 140})
        anns.append({'id': i + 1, 'image_id': i + 1, 'category_id': 5, 'iscrowd': 0,
                     'bbox': [30, 20, 60, 40], 'area': 2400,
                     'segmentation': [[30, 20, 90, 20, 90, 60, 30, 60]]})
    cats = [{'id': c, 'name': n} for c, n in ((2, 'circle'), (5, 'square'), (9, 'triangle'))]
    with open(os.path.join(basedir, 'annotations', 'instances_{}.json'.format(split)), 'w') as f:
        json.dump({'images': images, 'annotations': anns, 'categories': cats}, f)


@pytest.fixture(scope='module')
def predict_run(checkpoint, tmp_path_factory):
    """One predict.py run doing everything at once (each run costs a graph build)."""
    tmp = str(tmp_path_factory.mktemp('predict'))
    inputs, out = os.path.join(tmp, 'inputs'), os.path.join(tmp, 'out')
    colour = write_inputs(inputs)
    coco = os.path.join(tmp, 'coco')
    write_coco(coco, 'val2017', 'val2017', colour)
    write_coco(coco, 'minival2014', 'val2014', colour)
    config = TINY + ['DATA.BASEDIR=' + coco, "DATA.VAL=('coco_val2017','coco_minival2014')",
                     'TEST.RESULT_SCORE_THRESH_VIS=1.0']  # draw nothing: overlay == input
    p = run_script(['predict.py', '--load', checkpoint, '--config'] + config + [
        '--predict', inputs, os.path.join(inputs, 'sub', '*.jpg'), os.path.join(tmp, 'nothere.png'),
        '--output', out, '--json', '--benchmark', '3', '--visualize', '2',
        '--evaluate', os.path.join(tmp, 'results.json'),
        '--export-savedmodel', os.path.join(tmp, 'savedmodel'),
        '--export-pb', os.path.join(tmp, 'frozen.pb')])
    return p, tmp, colour


def test_predict_folder_one_overlay_per_valid_input(predict_run):
    p, tmp, colour = predict_run
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = os.path.join(tmp, 'out')
    pngs = sorted(os.path.basename(f) for f in glob.glob(os.path.join(out, '*.png'))
                  if not os.path.basename(f).startswith('viz-'))
    assert pngs == ['deep16.png', 'gray.png', 'rgb-2.png', 'rgb.png', 'rgba.png']
    assert 'bad.png' in p.stdout and 'nothere.png' in p.stdout
    assert '2 of 7 inputs failed' in p.stdout
    # Nothing drawn (threshold 1.0): the overlay is the input, channels not swapped.
    np.testing.assert_array_equal(cv2.imread(os.path.join(out, 'rgb.png')), colour)
    gray = cv2.imread(os.path.join(out, 'gray.png'))
    assert (gray == colour[:, :, 1:2]).all()
    with open(os.path.join(out, 'rgb.json')) as f:
        record = json.load(f)
    assert record['height'] == 100 and record['width'] == 140
    for d in record['detections']:
        x1, y1, x2, y2 = d['box_x1y1x2y2']
        assert 0 <= x1 <= x2 <= 140 and 0 <= y1 <= y2 <= 100
        assert d['class_name'] in ('circle', 'square', 'triangle')
        assert d['segmentation']['size'] == [100, 140]


def test_predict_evaluate_benchmark_visualize(predict_run):
    p, tmp, _ = predict_run
    assert p.returncode == 0, p.stderr[-3000:]
    for split, cats in (('coco_val2017', {2, 5, 9}), ('coco_minival2014', {2, 5, 9})):
        with open(os.path.join(tmp, 'results-{}.json'.format(split))) as f:
            assert {d['category_id'] for d in json.load(f)} <= cats
        assert split in p.stdout
    assert 'mAP(bbox)/IoU=0.5:0.95' in p.stdout
    report = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{')]
    assert len(report) == 1 and report[0]['images'] == 3 and report[0]['images_per_s'] > 0
    assert all(report[0][k + '_ms'] > 0 for k in ('preprocess', 'graph', 'postprocess'))
    panels = sorted(glob.glob(os.path.join(tmp, 'out', 'viz-*.png')))
    assert len(panels) == 2
    h, w = cv2.imread(panels[0]).shape[:2]
    assert h >= 192 and (w - 8) % 3 == 0  # a shapes image, three times, 2 gaps of 4 px


PLAIN_TF = """
    import numpy as np
    import tensorflow as tf
    img = np.load(os.path.join(TMP, 'image.npy'))
    model = tf.saved_model.load(os.path.join(TMP, 'savedmodel'))
    out = model.signatures['serving_default'](images=tf.constant(img[None]))
    saved = {k: v.numpy() for k, v in out.items()}
    names = ['num_detections', 'boxes', 'scores', 'category_ids', 'masks']
    frozen = run_frozen(os.path.join(TMP, 'frozen.pb'), [n + ':0' for n in names],
                        {'images:0': img[None]})
    np.savez(os.path.join(TMP, 'plain.npz'), **{'saved_' + k: v for k, v in saved.items()},
             **{'frozen_' + n: v for n, v in zip(names, frozen)})
"""


def test_exports_match_in_project_predictor(predict_run, checkpoint):
    """predict.py's exports (end to end: original image in, detections in its pixels out)
    served by plain TensorFlow = the trained checkpoint through eval.predict_image."""
    p, tmp, colour = predict_run
    assert p.returncode == 0, p.stderr[-3000:]
    np.save(os.path.join(tmp, 'image.npy'), colour)  # BGR uint8, the original size
    plain = run_plain_tensorflow(PLAIN_TF, tmp, TMP=tmp)
    assert plain.returncode == 0, plain.stderr[-3000:]
    got = np.load(os.path.join(tmp, 'plain.npz'))

    import predict
    from eval import predict_image
    from utils.training import WeightsLoader
    with configured(TRAIN_CONFIG, is_training=False):
        want = predict_image(colour.astype(np.float32),
                             predict.build_predictor(WeightsLoader(checkpoint)))
    assert len(want) > 0, 'the tiny model detects nothing: the comparison would be empty'
    n = int(got['saved_num_detections'][0])
    assert n == int(got['frozen_num_detections'][0]) == len(want)
    for kind in ('saved', 'frozen'):
        # shapes_train (DATA.TRAIN) has no ids of its own: category ids are class ids
        found = zip(*(got[kind + key][0, :n] for key in ('_category_ids', '_boxes', '_scores')))
        order = matching_order(list(found), [(r.class_id, r.box, r.score) for r in want],
                               0.5, 1e-3)
        masks = got[kind + '_masks'][0, :n]
        assert masks.shape[1:] == colour.shape[:2]
        assert_masks_match(masks[order], [r.mask for r in want])


def test_bad_load_path_is_one_clear_line(tmp_path):
    missing = str(tmp_path / 'no_such_checkpoint')
    p = run_script(['predict.py', '--load', missing, '--config'] + TINY +
                   ['--predict', str(tmp_path)])
    assert p.returncode == 1
    assert 'Traceback' not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith('Error: ') and missing in last


def test_expand_inputs_files_folders_globs_and_home(tmp_path, monkeypatch):
    import predict
    (tmp_path / 'imgs').mkdir()
    for name in ('b.png', 'a.jpg', 'notes.txt'):
        (tmp_path / 'imgs' / name).write_bytes(b'x')
    monkeypatch.setenv('HOME', str(tmp_path))
    folder = str(tmp_path / 'imgs')
    paths, missing = predict.expand_inputs(
        [folder, '~/imgs/*.png', os.path.join(folder, 'a.jpg'), '~/nope.png', str(tmp_path)])
    assert paths == [os.path.join(folder, 'a.jpg'), os.path.join(folder, 'b.png')]  # no repeats
    assert missing == [('~/nope.png', 'no such file'), (str(tmp_path), 'folder without images')]


def test_json_detections_carry_original_and_contiguous_ids(tmp_path):
    """--json: category_id is the dataset's own id (here 0, 5, 17), class_id 1..C."""
    import predict
    from dataset import register_builtin_datasets
    from eval import DetectionResult
    cats = [{'id': 17, 'name': 'triangle'}, {'id': 0, 'name': 'circle'},
            {'id': 5, 'name': 'square'}]
    anns = [{'id': i + 1, 'image_id': 1, 'category_id': c['id'], 'iscrowd': 0,
             'bbox': [10 * i, 5, 8, 8], 'area': 64} for i, c in enumerate(cats)]
    path = str(tmp_path / 'train.json')
    with open(path, 'w') as f:
        json.dump({'images': [{'id': 1, 'file_name': 'a.png', 'height': 40, 'width': 40}],
                   'annotations': anns, 'categories': cats}, f)
    splits = [['zz_ids_train', path, str(tmp_path)]]
    register_builtin_datasets(str(tmp_path), splits, ['zz_ids_train'])
    results = [DetectionResult(np.float32([1, 2, 3, 4]), 0.9, c, None) for c in (3, 1, 2)]
    with configured(['DATA.TRAIN=zz_ids_train', 'DATA.VAL=zz_ids_train',
                     'DATA.COCO_JSON_SPLITS={!r}'.format(splits)], is_training=False):
        record = predict.detections_json('a.png', np.zeros((40, 40, 3)), results)
    got = [(d['category_id'], d['class_id'], d['class_name']) for d in record['detections']]
    assert got == [(17, 3, 'triangle'), (0, 1, 'circle'), (5, 2, 'square')]
    assert json.loads(json.dumps(record)) == record  # plain JSON types
