"""Tests of dataset/check.py: the annotation checker, on small generated COCO jsons and images."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dataset import DatasetRegistry, register_coco_json
from dataset.check import (KINDS, _probe_image, check_and_report, check_dataset,
                           format_summary, image_size_from_header, write_report)
from tests.tiny import ListSplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOON_DIR = os.path.join(ROOT, '..', 'shared', 'data', 'balloon')


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _poly(x1, y1, x2, y2):
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


@pytest.fixture
def bad_coco(tmp_path):
    """A 64 x 64 COCO json with one problem per image; returns (name, json_file, tmp_path).

    Image ids: 1 good, 2 box partly out + box fully out, 3 zero-size box, 4 2-point
    polygon, 5 zero-area polygon, 6 polygon outside box, 7 unknown category, 8 duplicate
    annotation id, 9 missing file, 10 corrupt JPEG, 11 truncated PNG, 12 JPEG of another
    size, 13 no annotation, 14 duplicate image id (of 1); annotation 99 points at image 999;
    category 2 has no annotation.
    """
    img_dir = tmp_path / 'images'
    img_dir.mkdir()
    files = {i: f'im{i}.png' for i in range(1, 14)}
    files.update({10: 'corrupt.jpg', 12: 'small.jpg'})
    for i, f in files.items():
        if i not in (9, 10, 12):
            cv2.imwrite(str(img_dir / f), _noise(64, 64, i))
    rng = np.random.default_rng(1)
    (img_dir / files[10]).write_bytes(b'\x00' + rng.bytes(5000))  # cannot start with FFD8
    png = (img_dir / files[11]).read_bytes()
    (img_dir / files[11]).write_bytes(png[:int(len(png) * 0.7)])
    cv2.imwrite(str(img_dir / files[12]), _noise(48, 40))
    images = [{'id': i, 'file_name': f, 'height': 64, 'width': 64} for i, f in files.items()]
    images.append({'id': 1, 'file_name': 'im14.png', 'height': 64, 'width': 64})
    good = {'bbox': [10, 10, 20, 20], 'segmentation': _poly(10, 10, 30, 30), 'category_id': 1}
    anns = [dict(good, image_id=i) for i in (1, 9, 10, 11, 12)]
    anns += [
        dict(good, image_id=2, bbox=[50, 50, 30, 30], segmentation=_poly(50, 50, 80, 80)),
        dict(good, image_id=2, bbox=[100, 100, 10, 10], segmentation=_poly(100, 100, 110, 110)),
        dict(good, image_id=3, bbox=[10, 10, 0, 5]),
        dict(good, image_id=4, segmentation=[[10, 10, 30, 30]] + _poly(10, 10, 30, 30)),
        dict(good, image_id=5, segmentation=[[10, 10, 20, 20, 30, 30]]),
        dict(good, image_id=6, segmentation=_poly(10, 10, 40, 30)),
        dict(good, image_id=7, category_id=42),
        dict(good, image_id=8), dict(good, image_id=8),
        dict(good, image_id=999)]
    for k, a in enumerate(anns):
        a['id'] = k + 1
    anns[-2]['id'] = anns[-3]['id']  # image 8's two annotations share an id
    anns[-1]['id'] = 99
    json_file = tmp_path / 'ann.json'
    json_file.write_text(json.dumps({'images': images, 'annotations': anns, 'categories': [
        {'id': 1, 'name': 'thing'}, {'id': 2, 'name': 'other'}]}))
    register_coco_json('zz_check_bad', str(json_file), str(img_dir))
    return 'zz_check_bad', json_file, tmp_path


EXPECTED = {  # kind -> image ids it must name (exactly)
    'box_partly_outside_image': {2}, 'box_outside_image': {2}, 'box_degenerate': {3},
    'polygon_too_few_points': {4}, 'polygon_zero_area': {5}, 'polygon_outside_box': {6},
    'unknown_category': {7}, 'duplicate_annotation_id': {8}, 'image_missing': {9},
    'image_unreadable': {10}, 'image_truncated': {11}, 'image_size_mismatch': {12},
    'image_no_annotations': {3, 7, 13}, 'duplicate_image_id': {1},
    'annotation_missing_image': {999}, 'category_unused': {None}}


def test_check_finds_each_problem_on_its_image(bad_coco):
    name, _, _ = bad_coco
    report = check_dataset(name)
    assert report['fatal'] == []
    assert report['num_images'] == 13 and report['num_annotations'] == 15
    found = {k: {e['image_id'] for e in v} for k, v in report['problems'].items()}
    assert found == EXPECTED
    assert list(report['problems']) == [k for k in KINDS if k in EXPECTED]  # fixed order
    p = report['problems']
    assert p['duplicate_annotation_id'][0]['annotation'] == 13
    assert p['box_partly_outside_image'][0]['annotation'] == 6
    assert p['box_outside_image'][0]['annotation'] == 7
    assert p['image_size_mismatch'][0]['detail'].endswith('file is 48 x 40')
    assert 'FFD9' not in p['image_truncated'][0]['detail']  # it is the PNG one
    assert p['image_truncated'][0]['file'].endswith('im11.png')
    assert '42' in p['unknown_category'][0]['detail']
    assert p['category_unused'][0]['detail'] == "category 2 'other' has no annotation"
    no_ann = {e['image_id']: e['detail'] for e in p['image_no_annotations']}
    assert no_ann[13] == 'no annotation' and 'none of its 1' in no_ann[7]


def test_decode_mode_agrees(bad_coco):
    fast, slow = check_dataset(bad_coco[0]), check_dataset(bad_coco[0], decode=True)
    assert {k: len(v) for k, v in fast['problems'].items()} == \
        {k: len(v) for k, v in slow['problems'].items()}


def test_report_json_summary_and_exit_status(bad_coco, capsys):
    name, _, tmp_path = bad_coco
    out = tmp_path / 'out'
    assert check_and_report([name], str(out)) == 0  # per-image problems only warn
    with open(out / f'{name}_warnings.json') as f:
        saved = json.load(f)
    assert {k: {e['image_id'] for e in v} for k, v in saved['problems'].items()} == EXPECTED
    assert saved['problems']['image_missing'][0]['file'].endswith('im9.png')
    assert saved['meaning'] == {k: KINDS[k] for k in saved['problems']}
    printed = capsys.readouterr().out
    summary = format_summary(saved)
    assert summary in printed
    for kind in EXPECTED:
        row = next(line for line in summary.splitlines() if line.startswith(kind + ' '))
        assert row.split()[1] == str(len(saved['problems'][kind]))
    assert 'im9.png' in summary


def test_fatal_missing_json_and_no_usable_image(tmp_path, capsys):
    register_coco_json('zz_check_nojson', str(tmp_path / 'nope.json'), str(tmp_path),
                       class_names=['a'])
    json_file = tmp_path / 'gone.json'
    json_file.write_text(json.dumps({
        'images': [{'id': 1, 'file_name': 'gone.png', 'height': 8, 'width': 8}],
        'annotations': [{'id': 1, 'image_id': 1, 'bbox': [1, 1, 4, 4], 'category_id': 3}],
        'categories': [{'id': 3, 'name': 'a'}]}))
    register_coco_json('zz_check_gone', str(json_file), str(tmp_path))
    assert check_and_report(['zz_check_nojson'], str(tmp_path)) == 1
    assert 'nope.json' in capsys.readouterr().err
    report = check_dataset('zz_check_gone')
    assert len(report['fatal']) == 1 and 'no usable image' in report['fatal'][0]
    assert check_and_report(['zz_check_gone'], str(tmp_path)) == 1
    assert 'FATAL' in format_summary(report)


def test_malformed_json_reported_and_loader_failure_fatal(tmp_path):
    cv2.imwrite(str(tmp_path / 'a.png'), _noise(16, 16))
    json_file = tmp_path / 'bad.json'
    json_file.write_text(json.dumps({
        'images': [{'id': 5, 'file_name': 'a.png', 'height': 16, 'width': 16}],
        'annotations': [{'id': 1, 'image_id': 5, 'category_id': 1},
                        {'id': 2, 'image_id': 5, 'category_id': 1, 'bbox': [1, 1, 8, 8],
                         'segmentation': [[1, 1, 9, 1, 9]]}],
        'categories': [{'id': 1, 'name': 'a'}]}))
    register_coco_json('zz_check_malformed', str(json_file), str(tmp_path))
    report = check_dataset('zz_check_malformed')
    found = {k: [(e['image_id'], e['annotation']) for e in v]
             for k, v in report['problems'].items()}
    assert found == {'annotation_malformed': [(5, 1)], 'polygon_malformed': [(5, 2)]}
    assert len(report['fatal']) == 1 and 'the loader fails on' in report['fatal'][0]


def test_roidb_split_checks(tmp_path):
    """A split that is not COCO-json backed is checked on its roidbs."""
    cv2.imwrite(str(tmp_path / 'a.png'), _noise(32, 48))
    boxes = np.array([[2, 2, 20, 20], [40, 2, 60, 20], [5, 5, 5, 9]], np.float32)
    segm = [[np.array([[2, 2], [20, 2], [20, 20]], np.float32)],
            [np.array([[40, 2], [48, 2], [48, 20]], np.float32)],
            [np.array([[5, 5], [5, 9], [5, 7]], np.float32)]]
    rdb = {'file_name': str(tmp_path / 'a.png'), 'image_id': np.int64(7), 'height': None,
           'width': None, 'boxes': boxes, 'class': np.array([1, 2, 1], np.int32),
           'is_crowd': np.zeros(3, np.int8), 'segmentation': segm}
    DatasetRegistry.register('zz_check_roidb', lambda: ListSplit([rdb]))
    DatasetRegistry.register_metadata('zz_check_roidb', 'class_names', ['x'])
    report = check_dataset('zz_check_roidb')
    found = {k: [(e['image_id'], e['annotation']) for e in v]
             for k, v in report['problems'].items()}
    assert found == {'unknown_category': [(7, 1)], 'box_degenerate': [(7, 2)],
                     'box_partly_outside_image': [(7, 1)], 'polygon_zero_area': [(7, 2)]}
    write_report(report, str(tmp_path / 'r' / 'x.json'))  # NumPy image id serialises
    assert json.loads((tmp_path / 'r' / 'x.json').read_text())['problems']


@pytest.mark.parametrize('ext,params', [('.png', []), ('.jpg', []),
                                        ('.jpg', [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])])
def test_header_size_matches_cv2(tmp_path, ext, params):
    for h, w in [(17, 33), (64, 1), (300, 200)]:
        path = str(tmp_path / f'x{ext}')
        cv2.imwrite(path, _noise(h, w), params)
        assert image_size_from_header(path) == (h, w) == cv2.imread(path).shape[:2]
    bmp = str(tmp_path / 'x.bmp')
    cv2.imwrite(bmp, _noise(5, 6))
    assert image_size_from_header(bmp) is None  # other formats fall back to cv2


def test_truncated_jpeg_keeps_header_size(tmp_path):
    path = tmp_path / 't.jpg'
    cv2.imwrite(str(path), _noise(40, 30))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * 0.7)])
    size, (kind, detail) = _probe_image(str(path), decode=False)
    assert size == (40, 30) and kind == 'image_truncated' and 'FFD9' in detail
    path.write_bytes(data)
    assert _probe_image(str(path), decode=False) == ((40, 30), None)


def _run_cli(*args):
    return subprocess.run([sys.executable, '-m', 'dataset.check', *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_balloon(tmp_path):
    if not os.path.isdir(BALLOON_DIR):
        pytest.skip(f'balloon data not found at {BALLOON_DIR}')
    out = tmp_path / 'out'
    res = _run_cli('--config', f'DATA.BASEDIR={BALLOON_DIR}', 'DATA.TRAIN=balloon_train',
                   'DATA.VAL=balloon_val', '--output-dir', str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ('balloon_train', 'balloon_val'):
        report = json.loads((out / f'{name}_warnings.json').read_text())
        assert report['fatal'] == [] and report['num_images'] > 0
        assert f'== {name}:' in res.stdout


def test_cli_missing_basedir(tmp_path):
    res = _run_cli('--config', f"DATA.BASEDIR={tmp_path / 'nowhere'}",
                   'DATA.TRAIN=balloon_train', 'DATA.VAL=[]', '--output-dir', str(tmp_path))
    assert res.returncode != 0
    assert 'Traceback' not in res.stderr + res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1 and 'via_region_data.json' in errors[0], res.stderr
