"""Tests of dataset/: registry, COCO json loader + evaluator, balloon, synthetic shapes."""
import json
import logging
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util
import yaml

from dataset import (DatasetRegistry, DatasetRegistryError, register_balloon, register_coco,
                     register_coco_json, register_shapes)
from dataset.coco import COCO_CLASS_NAMES, COCODetection
from dataset.dataset import read_image_size
from dataset.shapes import CLASS_NAMES as SHAPE_NAMES, ShapesDataset, generate_image

BALLOON_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'balloon')


def perfect_results(roidbs):
    """Detections equal to the non-crowd ground truth: bbox x1y1x2y2 + RLE masks."""
    results = []
    for rdb in roidbs:
        h, w = rdb['height'], rdb['width']
        if h is None:
            h, w = read_image_size(rdb['file_name'])
        for box, cls, crowd, segm in zip(rdb['boxes'], rdb['class'], rdb['is_crowd'],
                                         rdb['segmentation']):
            if crowd:
                continue
            rle = mask_util.merge(mask_util.frPyObjects(
                [np.asarray(p, np.float64).ravel().tolist() for p in segm], h, w))
            results.append({'image_id': rdb['image_id'], 'category_id': int(cls),
                            'bbox': [float(v) for v in box], 'score': 0.9,
                            'segmentation': rle})
    return results


# ---------------------------------------------------------------- registry

def test_registry_unknown_name_lists_registered_and_close():
    DatasetRegistry.register('zz_alpha_train', lambda: 'split-a')
    DatasetRegistry.register('zz_alpha_val', lambda: 'split-b')
    assert DatasetRegistry.get('zz_alpha_val') == 'split-b'
    assert 'zz_alpha_train' in DatasetRegistry.names()
    assert DatasetRegistry.names() == sorted(DatasetRegistry.names())
    with pytest.raises(ValueError) as e:
        DatasetRegistry.get('zz_alpha_trian')
    assert isinstance(e.value, KeyError)
    msg = str(e.value)
    assert 'Did you mean: zz_alpha_train' in msg
    registered = msg.split('Registered: ')[1]
    assert registered.index('zz_alpha_train') < registered.index('zz_alpha_val')


def test_registry_replace_warns(caplog):
    DatasetRegistry.register('zz_replace', lambda: 1)
    with caplog.at_level(logging.WARNING, logger='dataset.dataset'):
        DatasetRegistry.register('zz_replace', lambda: 2)
    assert DatasetRegistry.get('zz_replace') == 2
    assert any('zz_replace' in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError):
        DatasetRegistry.register('zz_bad', 'not callable')


def test_metadata():
    DatasetRegistry.register_metadata('zz_meta', 'class_names', ['a', 'b'])
    assert DatasetRegistry.get_metadata('zz_meta', 'class_names') == ['a', 'b']
    with pytest.raises(DatasetRegistryError, match='class_names'):
        DatasetRegistry.get_metadata('zz_meta', 'class_nmes')
    with pytest.raises(ValueError, match='zz_meta'):
        DatasetRegistry.get_metadata('zz_mta', 'class_names')


# ---------------------------------------------------------------- COCO json

def _write_coco_json(tmp_path, bad=True):
    """3 categories with ids 17, 0, 5 (unsorted, 0-based, gaps); 3 images, one empty.

    With ``bad``: also a box reaching out of the image, a degenerate box and an
    annotation whose only polygon has 2 points.
    """
    crowd_mask = np.zeros((40, 50), np.uint8, order='F')
    crowd_mask[5:15, 10:30] = 1
    crowd_rle = mask_util.encode(crowd_mask)
    crowd_rle['counts'] = crowd_rle['counts'].decode('ascii')

    def sq(x, y, s):
        return [x, y, x + s, y, x + s, y + s, x, y + s]

    anns = [
        {'id': 1, 'image_id': 10, 'category_id': 0, 'bbox': [2, 3, 10, 10],
         'segmentation': [sq(2, 3, 10)], 'iscrowd': 0, 'area': 100},
        {'id': 2, 'image_id': 10, 'category_id': 17, 'bbox': [30, 20, 20, 20],
         'segmentation': [sq(30, 20, 20), [1, 1, 2, 2]], 'iscrowd': 0, 'area': 400},
        {'id': 3, 'image_id': 10, 'category_id': 5, 'bbox': [10, 5, 20, 10],
         'segmentation': crowd_rle, 'iscrowd': 1, 'area': 200},
        {'id': 4, 'image_id': 11, 'category_id': 5, 'bbox': [5, 5, 20, 15],
         'segmentation': [[5, 5, 25, 5, 25, 20, 5, 20]], 'iscrowd': 0, 'area': 300},
    ]
    if bad:
        anns += [
            {'id': 5, 'image_id': 11, 'category_id': 5, 'bbox': [5, 5, 0.5, 15],
             'segmentation': [[5, 5, 5.5, 5, 5.5, 20]], 'iscrowd': 0, 'area': 7},
            {'id': 6, 'image_id': 11, 'category_id': 0, 'bbox': [30, 20, 5, 5],
             'segmentation': [[30, 20, 35, 25]], 'iscrowd': 0, 'area': 25},
            {'id': 7, 'image_id': 11, 'category_id': 17, 'bbox': [40, 30, 20, 20],
             'segmentation': [sq(40, 30, 20)], 'iscrowd': 0, 'area': 400},
        ]
    data = {'images': [{'id': 10, 'file_name': 'a.jpg', 'height': 40, 'width': 50},
                       {'id': 11, 'file_name': 'sub/b.jpg', 'height': 40, 'width': 50},
                       {'id': 12, 'file_name': 'c.jpg', 'height': 40, 'width': 50}],
            'annotations': anns,
            'categories': [{'id': 17, 'name': 'cat17'}, {'id': 0, 'name': 'cat0'},
                           {'id': 5, 'name': 'cat5'}]}
    path = tmp_path / 'instances_x.json'
    path.write_text(json.dumps(data))
    return str(path)


def test_coco_loader(tmp_path, caplog):
    json_file = _write_coco_json(tmp_path)
    split = COCODetection(json_file, str(tmp_path / 'images'))
    assert split.class_names == ['cat0', 'cat5', 'cat17']
    assert split.category_ids == [0, 5, 17]
    with caplog.at_level(logging.WARNING, logger='dataset.coco'):
        roidbs = split.training_roidbs()
    assert [r['image_id'] for r in roidbs] == [10, 11, 12]
    assert roidbs[1]['file_name'] == str(tmp_path / 'images' / 'sub' / 'b.jpg')

    r0 = roidbs[0]
    np.testing.assert_allclose(r0['boxes'], [[2, 3, 12, 13], [30, 20, 50, 40], [10, 5, 30, 15]])
    assert r0['boxes'].dtype == np.float32
    assert r0['class'].tolist() == [1, 3, 2] and r0['class'].dtype == np.int32
    assert r0['is_crowd'].tolist() == [0, 0, 1]
    assert len(r0['segmentation'][1]) == 1  # the 2-point polygon is dropped
    assert r0['segmentation'][0][0].shape == (4, 2)
    assert r0['segmentation'][0][0].dtype == np.float32
    assert isinstance(r0['segmentation'][2], dict)  # crowd RLE kept

    r1 = roidbs[1]
    assert r1['class'].tolist() == [2, 3]  # degenerate box and polygon-less dropped
    np.testing.assert_allclose(r1['boxes'][1], [40, 30, 50, 40])  # clipped to the image
    assert roidbs[2]['boxes'].shape == (0, 4) and roidbs[2]['class'].shape == (0,)
    assert split.dropped == {'box smaller than 1 pixel': 1, 'no valid polygon': 1,
                             'polygon with < 3 points (polygon only)': 2}
    log = ' '.join(r.getMessage() for r in caplog.records)
    assert '1 box smaller than 1 pixel' in log and '1 no valid polygon' in log

    inf = split.inference_roidbs()
    assert len(inf) == 3 and {'file_name', 'image_id'} <= set(inf[2])


def test_coco_eval_maps_back_to_original_ids(tmp_path):
    split = COCODetection(_write_coco_json(tmp_path, bad=False), str(tmp_path))
    results = perfect_results(split.training_roidbs())
    out = tmp_path / 'out' / 'res.json'
    metrics = split.eval_inference_results(results, output=str(out))
    assert metrics['mAP(bbox)/IoU=0.5:0.95'] == pytest.approx(1.0)
    assert metrics['mAP(segm)/IoU=0.5:0.95'] == pytest.approx(1.0)
    assert metrics['mAP(bbox)/class/cat17'] == pytest.approx(1.0)
    written = json.loads(out.read_text())
    assert sorted({d['category_id'] for d in written}) == [0, 5, 17]
    first = next(d for d in written if d['category_id'] == 0 and d['image_id'] == 10)
    assert first['bbox'] == [2, 3, 10, 10]  # xywh

    # Wrong classes must score low: proves the class mapping is what gets evaluated.
    wrong = [dict(r, category_id=r['category_id'] % 3 + 1) for r in results]
    assert split.eval_inference_results(wrong)['mAP(bbox)/IoU=0.5:0.95'] < 0.5

    empty = split.eval_inference_results([])
    assert empty['mAP(bbox)/IoU=0.5:0.95'] == 0.0 and empty['mAP(segm)/class/cat5'] == 0.0


def test_register_coco_json_and_standard_splits(tmp_path):
    json_file = _write_coco_json(tmp_path)
    register_coco_json('zz_coco_custom', json_file, str(tmp_path))
    assert DatasetRegistry.get_metadata('zz_coco_custom', 'class_names') == \
        ['cat0', 'cat5', 'cat17']
    assert len(DatasetRegistry.get('zz_coco_custom').training_roidbs()) == 3
    with pytest.raises(FileNotFoundError, match='nope.json'):
        register_coco_json('zz_coco_missing', str(tmp_path / 'nope.json'), str(tmp_path))

    register_coco(str(tmp_path / 'coco'))  # nothing read yet
    assert DatasetRegistry.get_metadata('coco_val2017', 'class_names') == COCO_CLASS_NAMES
    assert len(COCO_CLASS_NAMES) == 80
    with pytest.raises(FileNotFoundError, match='instances_minival2014.json'):
        DatasetRegistry.get('coco_minival2014')


# ---------------------------------------------------------------- balloon

@pytest.fixture(scope='module')
def balloon_splits():
    if not os.path.isfile(os.path.join(BALLOON_DIR, 'train', 'via_region_data.json')):
        pytest.skip(f'balloon data not found at {os.path.abspath(BALLOON_DIR)}')
    register_balloon(BALLOON_DIR)
    return DatasetRegistry.get('balloon_train'), DatasetRegistry.get('balloon_val')


@pytest.mark.parametrize('index,n_images,n_polys', [(0, 61, 255), (1, 13, 50)])
def test_balloon_counts(balloon_splits, index, n_images, n_polys):
    roidbs = balloon_splits[index].training_roidbs()
    assert len(roidbs) == n_images
    assert sum(len(r['segmentation']) for r in roidbs) == n_polys
    for r in roidbs:
        assert os.path.isfile(r['file_name'])
        assert set(r['class'].tolist()) <= {1}
        for box, segm in zip(r['boxes'], r['segmentation']):
            assert len(segm) == 1 and segm[0].shape[1] == 2 and len(segm[0]) >= 3
            assert (segm[0].min(0) >= box[:2]).all() and (segm[0].max(0) <= box[2:]).all()
    assert DatasetRegistry.get_metadata('balloon_train', 'class_names') == ['balloon']


def test_balloon_eval_perfect(balloon_splits):
    val = balloon_splits[1]
    metrics = val.eval_inference_results(perfect_results(val.training_roidbs()))
    assert metrics['mAP(bbox)/IoU=0.5:0.95'] == pytest.approx(1.0)
    assert metrics['mAP(segm)/IoU=0.5:0.95'] == pytest.approx(1.0)


def test_balloon_config_file_finalizes(balloon_splits):
    from tiny import configured, yaml_overrides
    path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'balloon.yaml')
    with configured(yaml_overrides(path), tiny=False) as cfg:
        assert cfg.DATA.CLASS_NAMES == ['BG', 'balloon']
        assert cfg.BACKBONE.WEIGHTS == '' and cfg.TRAIN.LR_SCHEDULE[-1] == 1200


def test_balloon_missing_folder(tmp_path):
    register_balloon(str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError, match='nowhere'):
        DatasetRegistry.get('balloon_val')
    register_balloon(BALLOON_DIR)  # leave the registry usable for other tests


# ---------------------------------------------------------------- shapes

def _same_roidb(a, b):
    return (a['height'] == b['height'] and a['width'] == b['width']
            and np.array_equal(a['boxes'], b['boxes']) and np.array_equal(a['class'], b['class'])
            and all(len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb))
                    for pa, pb in zip(a['segmentation'], b['segmentation'])))


def test_shapes_deterministic():
    img1, r1 = generate_image(7, 3)
    img2, r2 = generate_image(7, 3)
    assert np.array_equal(img1, img2) and _same_roidb(r1, r2)
    img3, r3 = generate_image(8, 3)
    assert img3.shape != img1.shape or not np.array_equal(img1, img3)
    # (seed, index) streams: seed 7 image 4 differs from seed 8 image 3.
    assert not np.array_equal(generate_image(7, 4)[0][:50, :50], img3[:50, :50])


def test_shapes_annotations_valid():
    counts = np.zeros(len(SHAPE_NAMES) + 1, int)
    for i in range(40):
        img, r = generate_image(0, i)
        h, w = img.shape[:2]
        assert img.dtype == np.uint8 and (r['height'], r['width']) == (h, w)
        assert 192 <= h <= 320 and 192 <= w <= 320
        assert len(r['boxes']) == len(r['class']) == len(r['is_crowd']) == len(r['segmentation'])
        assert (r['boxes'][:, :2] >= 0).all() and (r['boxes'][:, 2] <= w).all() \
            and (r['boxes'][:, 3] <= h).all()
        assert (r['boxes'][:, 2:] > r['boxes'][:, :2]).all()
        for box, polys in zip(r['boxes'], r['segmentation']):
            assert polys
            for p in polys:
                assert p.dtype == np.float32 and p.shape[1] == 2 and len(p) >= 3
                assert (p.min(0) >= box[:2]).all() and (p.max(0) <= box[2:]).all()
        counts += np.bincount(r['class'], minlength=len(counts))
    assert counts[0] == 0
    assert (counts[1:] >= 0.2 * counts.sum()).all(), counts


def test_shapes_occlusion_uses_visible_mask():
    # Find an instance whose polygons cover much less than its box: occluded or split.
    found = False
    for i in range(40):
        _, r = generate_image(0, i)
        for box, polys in zip(r['boxes'], r['segmentation']):
            area = sum(cv2.contourArea(p) for p in polys)
            box_area = (box[2] - box[0]) * (box[3] - box[1])
            assert area <= box_area
            found |= len(polys) > 1
    assert found, 'expected at least one shape split in two by an occluder'


def test_shapes_dense():
    img, r = generate_image(2, 0, 896, 1024, dense=True)
    assert 1000 <= len(r['class']) <= 3000
    assert np.median(r['boxes'][:, 2] - r['boxes'][:, 0]) < 32


def test_shapes_split_files_cache_and_eval(tmp_path, monkeypatch):
    monkeypatch.setenv('SHAPES_CACHE_DIR', str(tmp_path))
    register_shapes()
    assert DatasetRegistry.get_metadata('shapes_val', 'class_names') == SHAPE_NAMES
    reg = DatasetRegistry.get('shapes_dense_train')
    assert reg.cache_dir.startswith(str(tmp_path)) and reg.dense

    split = ShapesDataset('val', num_images=12, seed=1)
    roidbs = split.training_roidbs()
    assert len(roidbs) == 12 and os.path.isdir(split.cache_dir)
    img, gen = generate_image(1, 5)
    assert np.array_equal(cv2.imread(roidbs[5]['file_name']), img)  # PNG is lossless
    assert _same_roidb(roidbs[5], gen)
    again = ShapesDataset('val', num_images=12, seed=1).training_roidbs()  # from cache
    assert all(_same_roidb(a, b) for a, b in zip(roidbs, again))
    assert not [f for f in os.listdir(split.cache_dir) if f.endswith('.tmp')]

    metrics = split.eval_inference_results(perfect_results(roidbs))
    assert metrics['mAP(bbox)/IoU=0.5:0.95'] == pytest.approx(1.0)
    assert metrics['mAP(segm)/IoU=0.5:0.95'] == pytest.approx(1.0)
    for name in SHAPE_NAMES:
        assert metrics[f'mAP(bbox)/class/{name}'] == pytest.approx(1.0)
    # Half the detections dropped: AP must fall.
    half = perfect_results(roidbs)[::2]
    assert split.eval_inference_results(half)['mAP(bbox)/IoU=0.5:0.95'] < 0.8


def test_invalid_json_is_a_dataset_error(tmp_path):
    from dataset import DatasetError
    from dataset.balloon import load_via_json
    from dataset.coco import COCODetection
    bad = tmp_path / 'bad.json'
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match='bad.json.*not valid json'):
        COCODetection(str(bad), str(tmp_path))
    with pytest.raises(DatasetError, match='bad.json.*not valid json'):
        load_via_json(str(bad), str(tmp_path))
    nocat = tmp_path / 'nocat.json'
    nocat.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DatasetError, match="has no 'categories'"):
        COCODetection(str(nocat), str(tmp_path))


def test_coco_json_splits_from_the_config(tmp_path):
    """DATA.COCO_JSON_SPLITS registers COCO-format data without code, and survives the run's
    config.yaml (which predict.py reads)."""
    from dataset import register_builtin_datasets
    from tiny import configured
    json_file = _write_coco_json(tmp_path)
    splits = [['zz_cfg_train', json_file, str(tmp_path)]]
    register_builtin_datasets(str(tmp_path), splits)
    overrides = ['DATA.TRAIN=zz_cfg_train', 'DATA.VAL=zz_cfg_train',
                 'DATA.COCO_JSON_SPLITS={!r}'.format(splits)]
    with configured(overrides) as cfg:
        assert cfg.DATA.CLASS_NAMES == ['BG', 'cat0', 'cat5', 'cat17']
        cfg.save_yaml(str(tmp_path / 'config.yaml'))
    with open(tmp_path / 'config.yaml') as f:
        assert yaml.safe_load(f)['DATA']['COCO_JSON_SPLITS'] == splits
    assert len(DatasetRegistry.get('zz_cfg_train').training_roidbs()) == 3

    with pytest.raises(DatasetRegistryError, match=r'\[name, json file, image folder\]'):
        register_builtin_datasets(str(tmp_path), [['zz_only_a_name']])
    with pytest.raises(FileNotFoundError, match='nope.json'):
        register_builtin_datasets(str(tmp_path), [['zz_nope', str(tmp_path / 'nope.json'), 'x']])


def _write_export(folder, categories, used, val_used=None):
    """A Roboflow / labelme-like export: ``categories`` [(id, name)], one 32x32 PNG per
    used category id with one box of it, as train.json (and val.json with ``val_used``)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for split, ids in (('train', used), ('val', val_used)):
        if ids is None:
            continue
        images, anns = [], []
        for i, cid in enumerate(ids):
            cv2.imwrite(os.path.join(folder, f'{split}{i}.png'), np.full((32, 32, 3), 90, np.uint8))
            images.append({'id': i + 1, 'file_name': f'{split}{i}.png', 'height': 32, 'width': 32})
            anns.append({'id': i + 1, 'image_id': i + 1, 'category_id': cid, 'iscrowd': 0,
                         'bbox': [4, 4, 10, 12], 'area': 120,
                         'segmentation': [[4, 4, 14, 4, 14, 16, 4, 16]]})
        path = os.path.join(folder, f'{split}.json')
        with open(path, 'w') as f:
            json.dump({'images': images, 'annotations': anns,
                       'categories': [{'id': c, 'name': n} for c, n in categories]}, f)
        paths.append(path)
    return paths


ROBOFLOW = [(0, 'shapes-parent'), (1, 'circle'), (2, 'square'), (3, 'triangle')]
LABELME = [(0, '_background_'), (1, 'cat'), (2, 'dog')]


@pytest.mark.parametrize('categories, used, kept', [
    (ROBOFLOW, [1, 2, 3, 1], ['circle', 'square', 'triangle']),
    (LABELME, [2, 1], ['cat', 'dog']),
], ids=['roboflow', 'labelme'])
def test_unused_category_warned_dropped_and_mapped_back(tmp_path, caplog, categories, used,
                                                        kept):
    from dataset import register_builtin_datasets
    from dataset.check import check_dataset
    # the val split lacks the last class: it stays a class (ids must agree with training)
    train, val = _write_export(str(tmp_path), categories, used, val_used=used[:1])
    splits = [['zz_un_train', train, str(tmp_path)], ['zz_un_val', val, str(tmp_path)]]
    unused_id, unused_name = categories[0]
    with caplog.at_level(logging.WARNING):
        register_builtin_datasets(str(tmp_path), splits, ['zz_un_train'], drop_unused=True)
    warning = f'{unused_id} "{unused_name}"'
    assert any(warning in r.getMessage() and 'Left out' in r.getMessage()
               for r in caplog.records), caplog.text
    for name in ('zz_un_train', 'zz_un_val'):
        assert DatasetRegistry.get_metadata(name, 'class_names') == kept
        assert DatasetRegistry.get_metadata(name, 'category_ids') == [c for c, _ in categories[1:]]
        split = DatasetRegistry.get(name)
        assert split.category_ids == [c for c, _ in categories[1:]]  # evaluation maps back
    roidbs = DatasetRegistry.get('zz_un_train').training_roidbs()
    assert [int(r['class'][0]) for r in roidbs] == used  # json id c -> class c (0 is gone)
    # the checker reports it as its own kind, whatever the option
    report = check_dataset('zz_un_train')
    assert [p['detail'] for p in report['problems']['category_unused']] == \
        [f'category {unused_id} {unused_name!r} has no annotation']

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        register_builtin_datasets(str(tmp_path), splits, ['zz_un_train'], drop_unused=False)
    assert any(warning in r.getMessage() and 'stay classes' in r.getMessage()
               for r in caplog.records), caplog.text
    assert DatasetRegistry.get_metadata('zz_un_train', 'class_names') == [n for _, n in categories]
    assert [int(r['class'][0]) for r in DatasetRegistry.get('zz_un_train').training_roidbs()] \
        == [u + 1 for u in used]


def test_dropped_classes_survive_the_runs_config_yaml(tmp_path):
    """predict.py reads the run's config.yaml: it must find the same class list."""
    import argparse

    from cli import setup_config
    from tiny import configured
    from dataset import register_builtin_datasets
    train, = _write_export(str(tmp_path), ROBOFLOW, [1, 2, 3])
    splits = [['zz_yaml_train', train, str(tmp_path)]]
    register_builtin_datasets(str(tmp_path), splits, ['zz_yaml_train'])  # as train.py does
    overrides = ['DATA.TRAIN=zz_yaml_train', 'DATA.VAL=zz_yaml_train',
                 'DATA.COCO_JSON_SPLITS={!r}'.format(splits)]
    with configured(overrides) as cfg:
        assert cfg.DATA.CLASS_NAMES == ['BG', 'circle', 'square', 'triangle']
        cfg.save_yaml(str(tmp_path / 'config.yaml'))
    DatasetRegistry._registry.pop('zz_yaml_train')  # a fresh predict.py process
    with configured() as cfg:
        cfg.freeze(False)
        setup_config(argparse.Namespace(config_file=str(tmp_path / 'config.yaml'), config=[]),
                     is_training=False)
        assert cfg.DATA.CLASS_NAMES == ['BG', 'circle', 'square', 'triangle']
        assert DatasetRegistry.get_metadata('zz_yaml_train', 'category_ids') == [1, 2, 3]
