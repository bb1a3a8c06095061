"""train.py end to end, in subprocesses with the tiny model on the synthetic shapes data.

One short run (4 epochs of 10 iterations, 2 data worker processes, a checkpoint per
epoch, an evaluation at the end) is shared by most tests: the loss goes down, AP is
reported, the stdlib logs land in log.log. Copies of its log directory are then resumed
(the global step, epoch and LR continue; a finished schedule does nothing), blown up with
an absurd LR (the NaN guard stops with one message and the checkpoints stay untouched),
and its weights are loaded into a model with another class count. Two Horovod workers
end with identical weights. Bad command lines end with one "Error: ..." line and no
traceback. About 3 minutes on 2 cores, a third of it the Horovod test.
"""
import concurrent.futures
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import cv2
import numpy as np
import pytest
import tensorflow as tf

from tiny import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, 'modeling', 'generalized_rcnn.py')),
    reason='needs the real model (modeling/generalized_rcnn.py)')

# The recipe's schedule is defined at TRAIN.REFERENCE_BATCH images; at 1 it is used as is.
BASE_LR = 0.01
COMMON = TINY + ['TRAIN.REFERENCE_BATCH=1', 'TRAIN.BASE_LR={}'.format(BASE_LR),
                 'TRAIN.WARMUP=3', 'TRAIN.WARMUP_INIT_LR=0.001', 'TRAIN.STEPS_PER_EPOCH=10',
                 'TRAIN.CHECKPOINT_PERIOD=1', 'TRAIN.EVAL_PERIOD=0']
# Warm-up to step 3, then BASE_LR up to step 40: 4 epochs of 10 iterations. (At batch 1
# the tiny model's loss drops steadily at 0.01; at 0.02 it is already erratic.)
FIRST_RUN = COMMON + ['TRAIN.LR_SCHEDULE=(40,40,40)', 'DATA.NUM_WORKERS=2',
                      'TRAIN.EVAL_PERIOD=4']
AP_KEY = 'shapes_val/mAP(bbox)/IoU=0.5:0.95'


def run_train(logdir, config, args=(), env=None, launcher=(), timeout=300):
    """Run train.py; returns the CompletedProcess (text stdout / stderr)."""
    cmd = list(launcher) + [sys.executable, 'train.py', '--logdir', logdir] + list(args) + \
        ['--config'] + list(config)
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def read_stats(logdir):
    with open(os.path.join(logdir, 'stats.json')) as f:
        return json.load(f)


def snapshot(folder):
    """file name -> (mtime_ns, sha1) of every file in ``folder``."""
    out = {}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, 'rb') as f:
            out[name] = (os.stat(path).st_mtime_ns, hashlib.sha1(f.read()).hexdigest())
    return out


def copy_logdir(src, dst):
    shutil.copytree(src, dst, copy_function=shutil.copy2)  # copy2 keeps the mtimes
    return dst


def fail_info(p):
    return 'exit {}\n--- stdout\n{}\n--- stderr\n{}'.format(p.returncode, p.stdout[-3000:],
                                                            p.stderr[-3000:])


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp('first') / 'log')
    p = run_train(logdir, FIRST_RUN)
    assert p.returncode == 0, fail_info(p)
    return logdir, p


def test_loss_goes_down(first_run):
    logdir, _ = first_run
    stats = read_stats(logdir)
    assert [s['epoch_num'] for s in stats] == [1, 2, 3, 4]
    assert [s['global_step'] for s in stats] == [10, 20, 30, 40]
    cost = [s['total_cost'] for s in stats]  # moving averages, about 2.9 -> 2.2
    assert cost[-1] < cost[0] - 0.2, cost
    # 'learning_rate' is the value of each epoch's last iteration (global step 9, 19, ...)
    assert [s['learning_rate'] for s in stats] == pytest.approx([BASE_LR] * 4, rel=1e-5)
    for step in (10, 20, 30, 40):
        assert os.path.isfile(os.path.join(logdir, 'model-{}.index'.format(step)))


def test_data_workers_and_final_evaluation(first_run):
    logdir, p = first_run
    assert "Starting a process with 'fork' method" in p.stdout  # tensorpack's worker start
    stats = read_stats(logdir)
    assert AP_KEY not in stats[0] and AP_KEY in stats[-1]  # evaluated at the end only
    assert 0. <= stats[-1][AP_KEY] <= 1.
    assert 'Per-class AP (bbox)' in p.stdout
    assert os.path.isfile(os.path.join(logdir, 'outputs40-shapes_val.json'))
    # data.py logs through stdlib logging: it must reach the log file too
    with open(os.path.join(logdir, 'log.log')) as f:
        log = f.read()
    assert 'Filtered 0 images with no annotations out of 600' in log
    assert 'Evaluat' in log or AP_KEY in log
    # utils.precision turns grappler's memory optimizer off on CPU: no wall of TF warnings
    assert 'Error in PredictCost()' not in p.stderr


def test_resume_continues_the_schedule(first_run, tmp_path):
    logdir = copy_logdir(first_run[0], str(tmp_path / 'log'))
    before = snapshot(logdir)
    # longer schedule: x0.1 at 45 and 48, end at 50 -> one more epoch, global steps 40..49
    p = run_train(logdir, COMMON + ['TRAIN.LR_SCHEDULE=(45,48,50)'])
    assert p.returncode == 0, fail_info(p)
    assert 'Resuming from {} (global step 40)'.format(os.path.join(logdir, 'model-40')) \
        in p.stdout
    assert 'Start Epoch 5 ...' in p.stdout and 'Start Epoch 1 ...' not in p.stdout
    # the LR of the first resumed iteration is the schedule's at step 40, not warm-up's 0.001
    assert '[HyperParamSetter] At global_step=40, learning_rate is set to {:.6f}'.format(
        BASE_LR) in p.stdout
    stats = read_stats(logdir)
    assert [s['epoch_num'] for s in stats] == [1, 2, 3, 4, 5]
    assert [s['global_step'] for s in stats] == [10, 20, 30, 40, 50]
    assert stats[-1]['learning_rate'] == pytest.approx(BASE_LR * 0.01, rel=1e-5)  # step 49
    assert os.path.isfile(os.path.join(logdir, 'model-50.index'))
    # nothing of the first run is lost: files kept unchanged, or moved aside (log, config)
    after = snapshot(logdir)
    for name, (mtime, digest) in before.items():
        if name in ('log.log', 'config.yaml', 'stats.json', 'checkpoint'):
            continue
        assert after[name] == (mtime, digest), name
    old_logs = [n for n in after if n.startswith('log.log.')]
    assert len(old_logs) == 1 and after[old_logs[0]][1] == before['log.log'][1]
    old_configs = [n for n in after if re.fullmatch(r'config-[\d-]+\+*\.yaml', n)]
    assert len(old_configs) == 1 and after[old_configs[0]][1] == before['config.yaml'][1]


def test_resuming_a_finished_schedule_does_nothing(first_run, tmp_path):
    logdir = copy_logdir(first_run[0], str(tmp_path / 'log'))
    before = snapshot(logdir)
    p = run_train(logdir, FIRST_RUN)  # its schedule ends at step 40, where it stopped
    assert p.returncode == 0, fail_info(p)
    assert 'Nothing to do: the schedule ends at global step 40' in p.stdout
    assert "'conv0' input" not in p.stdout  # returned before building the graph
    after = snapshot(logdir)
    assert {n: v for n, v in after.items() if not n.startswith('log.log')} == \
        {n: v for n, v in before.items() if n != 'log.log'}  # same config: not rewritten


def test_nan_guard_stops_and_keeps_the_checkpoints(first_run, tmp_path):
    logdir = copy_logdir(first_run[0], str(tmp_path / 'log'))
    before = snapshot(logdir)
    p = run_train(logdir, COMMON + ['TRAIN.BASE_LR=1e6', 'TRAIN.WARMUP=0',
                                    'TRAIN.LR_SCHEDULE=(100,100,100)'])
    assert p.returncode != 0, fail_info(p)
    assert 'Traceback' not in p.stderr, fail_info(p)
    errors = [line for line in p.stderr.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1, fail_info(p)
    msg = errors[0]
    step = int(re.search(r'global step (\d+)', msg).group(1))
    assert 40 <= step < 50, msg                                  # resumed at 40, blew up soon
    assert re.search(r'(total_cost|loss)=(nan|inf|-inf)\b', msg) or 'weights became' in msg, msg
    assert 'TRAIN.BASE_LR' in msg and 'TRAIN.WARMUP' in msg, msg
    assert os.path.join(logdir, 'model-40') in msg, msg            # names the kept checkpoint
    after = snapshot(logdir)
    for name in before:
        if name.startswith(('model-', 'checkpoint')):
            assert after[name] == before[name], name
    assert not [n for n in after if n.startswith('model-') and n not in before]


def processes_with(marker):
    """Pids of the live (not zombie) processes whose environment holds ``marker``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/{}/environ'.format(pid), 'rb') as f:
                env = f.read()
            with open('/proc/{}/stat'.format(pid)) as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
        except OSError:  # gone meanwhile, or another user's
            continue
        if marker.encode() in env and state != 'Z':  # a zombie holds no memory
            pids.append(int(pid))
    return pids


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='needs /proc')
def test_sigkill_leaves_no_worker_behind_and_resume_continues(tmp_path):
    """SIGKILL (the OOM killer's signal) the trainer: its data workers die too; the run
    then resumes at the last checkpoint's global step and learning rate."""
    logdir = str(tmp_path / 'log')
    marker = 'RCNN_TEST_RUN={}'.format(uuid.uuid4().hex)
    decays = (5, 15)  # LR 0.01 -> 0.001 at step 5 -> 0.0001 at 15
    config = COMMON + ['TRAIN.LR_SCHEDULE=({},{},1000)'.format(*decays), 'DATA.NUM_WORKERS=2']
    proc = subprocess.Popen(
        [sys.executable, 'train.py', '--logdir', logdir, '--config'] + config, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, RCNN_TEST_RUN=marker.split('=')[1]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def checkpoint():
            return os.path.isdir(logdir) and tf.train.latest_checkpoint(logdir)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and not checkpoint():
            time.sleep(0.5)
        assert proc.poll() is None and checkpoint(), 'no checkpoint before the kill'
        workers = [pid for pid in processes_with(marker) if pid != proc.pid]
        assert len(workers) >= 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while processes_with(marker) and time.time() < deadline:
            time.sleep(0.2)
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):  # this test's own processes, if any survived
            os.kill(pid, signal.SIGKILL)
    step = int(tf.train.latest_checkpoint(logdir).rsplit('-', 1)[1])
    assert step % 10 == 0 and step >= 10
    p = run_train(logdir, COMMON + ['TRAIN.LR_SCHEDULE=({},{},{})'.format(*decays, step + 10)])
    assert p.returncode == 0, fail_info(p)
    assert 'Resuming from {} (global step {})'.format(
        os.path.join(logdir, 'model-{}'.format(step)), step) in p.stdout
    lr = BASE_LR * 0.1 ** sum(step >= d for d in decays)
    assert '[HyperParamSetter] At global_step={}, learning_rate is set to {:.6f}'.format(
        step, lr) in p.stdout
    assert read_stats(logdir)[-1]['global_step'] == step + 10


def write_coco_split(basedir, num_images=4):
    """``coco_train2017`` under ``basedir``: shapes images, one category (not shapes' 3)."""
    from dataset.shapes import generate_image
    image_dir = os.path.join(basedir, 'train2017')
    os.makedirs(image_dir)
    os.makedirs(os.path.join(basedir, 'annotations'))
    images, anns = [], []
    for i in range(num_images):
        image, rdb = generate_image(seed=7, index=i, min_size=128, max_size=160)
        name = '{}.png'.format(i)
        cv2.imwrite(os.path.join(image_dir, name), image)
        images.append({'id': i + 1, 'file_name': name, 'height': rdb['height'],
                       'width': rdb['width']})
        for box, polys in zip(rdb['boxes'].tolist(), rdb['segmentation']):
            x1, y1, x2, y2 = box
            anns.append({'id': len(anns) + 1, 'image_id': i + 1, 'category_id': 1,
                         'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1),
                         'iscrowd': 0,
                         'segmentation': [np.asarray(q).reshape(-1).tolist() for q in polys]})
    with open(os.path.join(basedir, 'annotations', 'instances_train2017.json'), 'w') as f:
        json.dump({'images': images, 'annotations': anns,
                   'categories': [{'id': 1, 'name': 'shape'}]}, f)


def test_load_skips_only_the_class_dependent_layers(first_run, tmp_path):
    basedir = str(tmp_path / 'coco')
    write_coco_split(basedir)
    src = os.path.join(first_run[0], 'model-40')
    logdir = str(tmp_path / 'log')
    # LR 0: one iteration leaves every weight as loaded, so the checkpoint shows what loaded
    p = run_train(logdir, TINY + [
        'DATA.BASEDIR=' + basedir, 'DATA.TRAIN=coco_train2017', 'DATA.VAL=coco_train2017',
        'TRAIN.REFERENCE_BATCH=1', 'TRAIN.BASE_LR=0.', 'TRAIN.WARMUP_INIT_LR=0.',
        'TRAIN.LR_SCHEDULE=(1,1,1)', 'TRAIN.STEPS_PER_EPOCH=1', 'TRAIN.EVAL_PERIOD=0'],
        args=['--load', src])
    assert p.returncode == 0, fail_info(p)
    skipped = ['fastrcnn/outputs/box/W', 'fastrcnn/outputs/box/b', 'fastrcnn/outputs/class/W',
               'fastrcnn/outputs/class/b', 'maskrcnn/conv/W', 'maskrcnn/conv/b']
    line = next(ln for ln in p.stdout.splitlines() if 'Not loaded (shape differs' in ln)
    assert sorted(re.findall(r'([\w/]+) \[[\d, ]+\] vs file', line)) == skipped, line
    old = tf.train.load_checkpoint(src)
    new = tf.train.load_checkpoint(os.path.join(logdir, 'model-1'))
    weights = [n for n in new.get_variable_to_shape_map()
               if not re.search(r'Momentum|global_step|learning_rate|^EMA/', n)]
    assert len(weights) > 90
    differ = sorted(n for n in weights if new.get_tensor(n).shape != old.get_tensor(n).shape)
    assert differ == skipped
    for n in set(weights) - set(skipped):
        np.testing.assert_array_equal(new.get_tensor(n), old.get_tensor(n), err_msg=n)
    loaded = int(re.search(r'Loaded (\d+) variables from', p.stdout).group(1))
    assert loaded == len(weights) - len(skipped)


def test_two_horovod_workers_stay_in_sync(tmp_path):
    if importlib.util.find_spec('horovod') is None:
        pytest.skip('horovod is not installed')
    horovodrun = os.path.join(os.path.dirname(sys.executable), 'horovodrun')
    if not os.path.isfile(horovodrun):
        pytest.skip('no horovodrun next to {}'.format(sys.executable))
    logdir, prefix = str(tmp_path / 'log'), str(tmp_path / 'weights')
    # total batch 2 = the reference batch: 3 iterations of 2 images, one epoch
    p = run_train(logdir, TINY + [
        'TRAINER=horovod', 'TRAIN.REFERENCE_BATCH=2', 'TRAIN.BASE_LR={}'.format(BASE_LR),
        'TRAIN.WARMUP=1', 'TRAIN.LR_SCHEDULE=(3,3,3)', 'TRAIN.STEPS_PER_EPOCH=3',
        'TRAIN.EVAL_PERIOD=0'], env={'RCNN_TEST_DUMP_WEIGHTS': prefix},
        launcher=[horovodrun, '-np', '2', '-H', 'localhost:2'])
    assert p.returncode == 0, fail_info(p)
    out = p.stdout + p.stderr
    shards = dict(re.findall(r'Rank (\d) of 2 trains on (\d+) images', out))
    assert set(shards) == {'0', '1'} and sum(map(int, shards.values())) == 600, shards
    w0, w1 = (np.load('{}.rank{}.npz'.format(prefix, r)) for r in (0, 1))
    assert sorted(w0.files) == sorted(w1.files) and len(w0.files) > 90
    for name in w0.files:
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)
    # only rank 0 writes checkpoints and the log file
    saved = [ln for ln in out.splitlines() if 'Model saved to' in ln]
    assert saved and all(ln.startswith('[0]') for ln in saved), saved
    assert sorted(glob.glob(os.path.join(logdir, 'model-*.index'))) == \
        [os.path.join(logdir, 'model-3.index')]
    with open(os.path.join(logdir, 'log.log')) as f:
        log = f.read()
    assert 'Rank 0 of 2 trains' in log and 'Rank 1 of 2 trains' not in log


BAD_COMMAND_LINES = {
    'unknown key': ([], ['NOPE.KEY=1'], r'Unknown config key "NOPE.KEY"'),
    'missing --load': (['--load', '/nonexistent/weights.npz'], [],
                       r'--load: weights file "/nonexistent/weights.npz" does not exist'),
    'unknown dataset': ([], ['DATA.TRAIN=nope'],
                        r'DATA.TRAIN names dataset "nope", which is not registered'),
    'missing data dir': ([], ['DATA.BASEDIR=/nonexistent', 'DATA.TRAIN=balloon_train',
                              'DATA.VAL=balloon_val'], r"not found: '/nonexistent/train/"),
    'wrong value type': ([], ['TRAIN.BASE_LR=[1]'], r'"TRAIN.BASE_LR" expects a float'),
    'missing config file': (['--config-file', '/nonexistent.yaml'], [],
                            r'Config file "/nonexistent.yaml" does not exist'),
}


@pytest.fixture(scope='module')
def bad_runs(tmp_path_factory):
    """Every bad command line, run 3 at a time (each mostly imports TensorFlow)."""
    root = tmp_path_factory.mktemp('bad')

    def one(item):
        key, (args, config, _) = item
        logdir = str(root / key.replace(' ', '_'))
        return key, (logdir, run_train(logdir, TINY + ['TRAIN.EVAL_PERIOD=0'] + config, args))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        return dict(pool.map(one, BAD_COMMAND_LINES.items()))


@pytest.mark.parametrize('case', sorted(BAD_COMMAND_LINES))
def test_bad_command_line(bad_runs, case):
    logdir, p = bad_runs[case]
    assert p.returncode != 0, fail_info(p)
    assert 'Traceback' not in p.stderr, fail_info(p)
    errors = [line for line in p.stderr.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1 and re.search(BAD_COMMAND_LINES[case][2], errors[0]), fail_info(p)
    assert "'conv0' input" not in p.stdout  # failed before building the graph
    if case != 'missing data dir':  # these fail before the log directory is made
        assert not os.path.exists(logdir)
