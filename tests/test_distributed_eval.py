"""Evaluation shared by devices and Horovod ranks (utils/distributed.py, eval.py).

Unit tests: the shards cover every image once (uneven counts too), the merge restores
image order and rejects gaps; several devices in one process and simulated ranks (threads
with a barrier standing in for Horovod's allgather) give exactly one process's results.
Integration (about 2 minutes on 2 quiet cores): a tiny model trained 3 steps by 2 Horovod
ranks evaluates shapes_val at the end with both ranks; `predict.py --evaluate` on its
checkpoint in one process and under `horovodrun -np 2` give identical per-image results
(every detection) and AP; the training-time results agree with them up to the last digit.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import eval as ev
from tests.stand_in import add_corrupt_image
from test_train import ROOT, fail_info, run_train
from tiny import TINY
from utils import distributed
from utils.distributed import merge_shards, shard_bounds


@pytest.mark.parametrize('num_shards', [1, 2, 3, 7, 8])
def test_shards_cover_every_image_once(num_shards):
    for num in list(range(0, 20)) + [5000, 5003]:
        bounds = shard_bounds(num, num_shards)
        assert len(bounds) == num_shards
        items = [i for start, end in bounds for i in range(start, end)]
        assert items == list(range(num))  # once each, in order
        sizes = [end - start for start, end in bounds]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_bounds(3, 0)


def test_merge_restores_order_and_rejects_gaps():
    shards = [{'bounds': b, 'results': ['r{}'.format(i) for i in range(*b)],
               'failures': ['f{}'.format(b[0])]} for b in shard_bounds(7, 3)]
    results, failures = merge_shards(shards[::-1], 7)  # gathered in any order
    assert results == ['r{}'.format(i) for i in range(7)]
    assert failures == ['f0', 'f3', 'f5']
    with pytest.raises(ValueError, match='cover 5 of 7'):
        merge_shards(shards[:2], 7)
    with pytest.raises(ValueError, match='do not tile'):
        merge_shards([shards[0], shards[2]], 7)
    with pytest.raises(ValueError, match='do not tile'):
        merge_shards(shards + [shards[1]], 7)


def colour_boxes(image):
    """A stand-in model_func: the box of the pure red and of the pure green pixels (as
    tests/stand_in.py's StandInModel), score from the image's content."""
    boxes = []
    for ch in (2, 1):
        ys, xs = np.nonzero((image[:, :, ch] > 200) & (image.sum(axis=2) - image[:, :, ch] < 50))
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    score = 0.5 + float(image.mean()) / 255.
    return [np.asarray(boxes, np.float32), np.asarray([score, score / 2], np.float32),
            np.asarray([1, 2], np.int32), np.ones((2, 28, 28), np.float32)]


class ThreadRanks:
    """Simulated Horovod: ``size`` threads, an allgather that waits for all of them."""

    def __init__(self, size):
        self.size, self.slots = size, [None] * size
        self.barrier, self.local = threading.Barrier(size, timeout=60), threading.local()

    def rank_size(self):
        return self.local.rank, self.size

    def allgather(self, obj, name=None):
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        return list(self.slots)

    def run(self, func):
        out = [None] * self.size

        def one(rank):
            self.local.rank = rank
            out[rank] = func()
        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out


def test_devices_and_ranks_give_one_process_results(stand_in_cfg, coco_split, tmp_path,
                                                    monkeypatch):
    name, json_file = coco_split
    add_corrupt_image(tmp_path, json_file)  # 5 images: uneven over 2 or 3 ranks
    roidbs = ev.DatasetRegistry.get(name).inference_roidbs()
    single, single_failures = ev.predict_roidbs(roidbs, [colour_boxes])
    assert len(single) == 8 and len(single_failures) == 1
    assert ev.predict_roidbs(roidbs, [colour_boxes] * 3) == (single, single_failures)

    reference = ev.evaluate_on_dataset(name, colour_boxes, str(tmp_path / 'one.json'))
    assert reference['mAP(bbox)/IoU=0.5:0.95'] == pytest.approx(1.0)
    for size in (2, 3):
        ranks = ThreadRanks(size)
        monkeypatch.setattr(distributed, 'horovod_rank_size', ranks.rank_size)
        monkeypatch.setattr(distributed, 'horovod_allgather', ranks.allgather)
        out = str(tmp_path / 'ranks{}.json'.format(size))
        metrics = ranks.run(lambda: ev.evaluate_on_dataset(
            name, [colour_boxes, colour_boxes], out, horovod=True))
        assert metrics[0] == reference and metrics[1:] == [None] * (size - 1)
        assert [{tuple(s['bounds']) for s in ranks.slots}] == [set(shard_bounds(5, size))]
        with open(out) as f, open(str(tmp_path / 'one.json')) as g:
            assert json.load(f) == json.load(g)


# ------------------------------------------------------------------ Horovod, 2 ranks
# One thread per op in every run: the ranks' arithmetic is bitwise that of one process.
ONE_THREAD = {'RCNN_INTRA_OP_THREADS': '1', 'RCNN_INTER_OP_THREADS': '1'}
AP_KEY = 'shapes_val/mAP(bbox)/IoU=0.5:0.95'


def horovodrun():
    if importlib.util.find_spec('horovod') is None:
        pytest.skip('horovod is not installed')
    path = os.path.join(os.path.dirname(sys.executable), 'horovodrun')
    if not os.path.isfile(path):
        pytest.skip('no horovodrun next to {}'.format(sys.executable))
    return [path, '-np', '2', '-H', 'localhost:2']


def run_predict(args, launcher=()):
    cmd = list(launcher) + [sys.executable, 'predict.py'] + list(args)
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, **ONE_THREAD),
                          capture_output=True, text=True, timeout=300)


def printed_metrics(stdout):
    """'  mAP(bbox)/IoU=0.5:0.95   0.1234' lines of predict.py --evaluate -> {key: value}."""
    return {k: float(v) for k, v in re.findall(r'^\S*\s+(mAP\(\w+\)/\S+)\s+([-\d.]+)$',
                                               stdout, re.M)}


def assert_same_detections(got, want):
    """Every detection of ``got`` matches one of ``want`` on the same image and class, box
    within 0.0011 px and score within 1.1e-5 (one unit of the json's rounding)."""
    assert len(got) == len(want)
    unmatched = {}
    for d in want:
        unmatched.setdefault((d['image_id'], d['category_id']), []).append(d)
    for d in got:
        pool = unmatched.get((d['image_id'], d['category_id']), [])
        match = next((w for w in pool if abs(w['score'] - d['score']) <= 1.1e-5 and
                      np.allclose(w['bbox'], d['bbox'], rtol=0, atol=1.1e-3)), None)
        assert match is not None, d
        pool.remove(match)


def json_metrics(path):
    """Metrics (full precision) of a COCO-format results json of train.py's shapes_val."""
    from dataset import DatasetRegistry, register_shapes
    register_shapes()  # train.py's shapes_val (tests/tiny.py registers a smaller one)
    with open(path) as f:
        dets = json.load(f)
    results = [dict(d, bbox=[x, y, x + w, y + h]) for d in dets for x, y, w, h in [d['bbox']]]
    return DatasetRegistry.get('shapes_val').eval_inference_results(results)


def test_two_horovod_ranks_evaluate_like_one_process(tmp_path):
    launcher = horovodrun()
    logdir = str(tmp_path / 'log')
    p = run_train(logdir, TINY + [
        'TRAINER=horovod', 'TRAIN.REFERENCE_BATCH=2', 'TRAIN.BASE_LR=0.01', 'TRAIN.WARMUP=1',
        'TRAIN.LR_SCHEDULE=(3,3,3)', 'TRAIN.STEPS_PER_EPOCH=3', 'TRAIN.EVAL_PERIOD=1',
        'TEST.RESULT_SCORE_THRESH=0.0'],  # 3 steps: keep every detection to compare
        env=ONE_THREAD, launcher=launcher)
    assert p.returncode == 0, fail_info(p)
    out = p.stdout + p.stderr
    assert 'Evaluating shapes_val (rank 0 of 2)' in out and \
        'Evaluating shapes_val (rank 1 of 2)' in out  # both ranks predicted
    with open(os.path.join(logdir, 'outputs3-shapes_val.json')) as f:
        during_training = json.load(f)
    with open(os.path.join(logdir, 'stats.json')) as f:
        training_ap = json.load(f)[-1][AP_KEY]

    one = run_predict(['--load', logdir, '--evaluate', str(tmp_path / 'one.json')])
    assert one.returncode == 0, fail_info(one)
    two = run_predict(['--load', logdir, '--evaluate', str(tmp_path / 'two.json')], launcher)
    assert two.returncode == 0, fail_info(two)
    with open(str(tmp_path / 'one.json')) as f:
        reference = json.load(f)
    with open(str(tmp_path / 'two.json')) as f:
        assert json.load(f) == reference  # every detection of every image, in order
    assert len({d['image_id'] for d in reference}) == 100 and len(reference) > 1000
    # The training graph's predictor and predict.py's differ in the last float bit now and
    # then (a different graph, optimised differently): the same detections up to the
    # json's rounding, near-tied scores perhaps in another order.
    assert_same_detections(during_training, reference)
    single, shared = printed_metrics(one.stdout), printed_metrics(two.stdout)
    assert AP_KEY.split('/', 1)[1] in single and len(single) > 6
    assert shared == single
    # full precision: 2 ranks (two.json is one.json) and during training (near-tied
    # scores may come in another order, see above)
    one_process = json_metrics(str(tmp_path / 'one.json'))
    assert json_metrics(str(tmp_path / 'two.json')) == one_process
    assert training_ap == pytest.approx(one_process['mAP(bbox)/IoU=0.5:0.95'], abs=1e-4)
    assert single == pytest.approx(one_process, abs=5e-5)  # printed to 4 decimals
    # only rank 0 reports
    assert sum('shapes_val (results in' in ln for ln in two.stdout.splitlines()) == 1


def test_gpu_tower_predictors_split_the_images_alike():
    """predict.py's one-predictor-per-GPU path, built here on CPU (soft placement puts both
    towers on the CPU): tower 1 predicts like tower 0, and a split over both gives the
    single tower's list."""
    from predict import build_gpu_predictors
    from tiny import configured
    with configured(['TEST.RESULT_SCORE_THRESH=0.0'], is_training=False):
        roidbs = ev.DatasetRegistry.get('shapes_val').inference_roidbs()
        towers = build_gpu_predictors(None, 2)  # random weights, shared by the towers
        assert len(towers) == 2
        one, failures = ev.predict_roidbs(roidbs, towers[:1])
        assert len(one) == 8 * 20 and not failures  # TEST.RESULTS_PER_IM=20 per image
        assert ev.predict_roidbs(roidbs, towers[1:]) == (one, [])
        assert ev.predict_roidbs(roidbs, towers) == (one, [])
