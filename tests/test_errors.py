"""Every entry point ends a user error with one "Error: ..." line and exit status 1: a bad
config key, a bad value type, a missing file and an unregistered dataset, each caught
before any graph is built (so each run costs about one TensorFlow import).

train.py's own cases (and more) are in tests/test_train.py (BAD_COMMAND_LINES). bench/dense.py,
bench/memory_knobs.py and bench/soak.py take no file argument: no missing-file case for them;
memory_knobs.py runs dense.py's measurement, so one case shows its error path.
"""
import concurrent.futures
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_KEY = (['--config', 'NOPE.KEY=1'], r'Unknown config key "NOPE.KEY"')
BAD_TYPE = (['--config', 'TRAIN.BASE_LR=[1]'], r'"TRAIN.BASE_LR" expects a float')
MISSING_FILE = (['--config-file', '/nonexistent/config.yaml'],
                r'"/nonexistent/config.yaml" does not exist')
UNKNOWN_DATASET = (['--config', 'DATA.TRAIN=nope', 'DATA.VAL=[]'], r'"?nope"?.*not registered|'
                   r"Unknown dataset 'nope'")

BAD_BATCH = (['--batch-size', '0'], r'--batch-size must be >= 1, got 0')

ENTRY_POINTS = {  # name -> (command, the cases it supports)
    'predict.py': (['predict.py', '--load', '/nonexistent/ckpt', '--predict', ROOT],
                   [BAD_KEY, BAD_TYPE, MISSING_FILE, UNKNOWN_DATASET, BAD_BATCH]),
    'prune.py': (['prune.py', '--load', '/nonexistent/ckpt', '--threshold', '0.5', '--output',
                  '/tmp/never-written'], [BAD_KEY, BAD_TYPE, MISSING_FILE, UNKNOWN_DATASET]),
    'dataset.check': (['-m', 'dataset.check', '--output-dir', '/tmp'],
                      [BAD_KEY, BAD_TYPE, (['--config', 'DATA.COCO_JSON_SPLITS=[["x", '
                                            '"/nonexistent/a.json", "/tmp"]]'],
                                           r"not found: '/nonexistent/a.json'"),
                       UNKNOWN_DATASET]),
    'bench/inference.py': (['bench/inference.py', '--images', '1', '--no-flops'],
                           [BAD_KEY, BAD_TYPE, MISSING_FILE, UNKNOWN_DATASET,
                            (['--batch-size', '0'], r'--batch-size must be >= 1')]),
    'bench/train_step.py': (['bench/train_step.py', '--steps', '1'],
                            [BAD_KEY, BAD_TYPE, MISSING_FILE, UNKNOWN_DATASET]),
    'bench/dense.py': (['bench/dense.py', '--instances', '10'],
                       [BAD_KEY, BAD_TYPE, UNKNOWN_DATASET]),
    'bench/memory_knobs.py': (['bench/memory_knobs.py', '--knobs', 'crop'], [BAD_KEY]),
    'bench/soak.py': (['bench/soak.py', '--images', '1', '--steps', '1'],
                      [BAD_KEY, BAD_TYPE, UNKNOWN_DATASET]),
}
CASES = [(name, k) for name, (_, cases) in ENTRY_POINTS.items() for k in range(len(cases))]


@pytest.fixture(scope='module')
def runs():
    """Every (entry point, case), 3 at a time."""
    def one(case):
        name, k = case
        command, cases = ENTRY_POINTS[name]
        args = [sys.executable] + command + cases[k][0]
        return case, subprocess.run(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                                    capture_output=True, text=True, timeout=300)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize('case', CASES, ids=['{}-{}'.format(n, k) for n, k in CASES])
def test_user_error_is_one_line_and_status_1(runs, case):
    p = runs[case]
    pattern = ENTRY_POINTS[case[0]][1][case[1]][1]
    info = 'exit {}\n{}'.format(p.returncode, p.stderr[-3000:])
    assert p.returncode == 1, info
    assert 'Traceback' not in p.stderr, info
    errors = [line for line in p.stderr.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1 and re.search(pattern, errors[0]), info
    assert "'conv0' input" not in p.stdout  # nothing was built
