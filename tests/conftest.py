"""Test setup: the compat shims first, the repo root on sys.path, quiet logs; tests marked
`slow` run only with `pytest --run-slow`."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import utils.compat  # noqa: E402,F401  (must precede every TensorFlow import)
from config import config as _cfg  # noqa: E402


def pytest_addoption(parser):
    parser.addoption('--run-slow', action='store_true', help='also run the tests marked slow')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: minutes-long test, run only with --run-slow')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--run-slow'):
        return
    skip = pytest.mark.skip(reason='slow: run with pytest --run-slow')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_cfg():
    """The global config, unfrozen for the test; every key (and the frozen flag) is
    restored afterwards. The one way tests change config keys."""
    with _cfg.override() as c:
        yield c


@pytest.fixture
def coco_split(tmp_path):
    """(dataset name, json path) of tests/stand_in.py's registered COCO split."""
    from tests.stand_in import write_coco_split
    return write_coco_split(tmp_path)


@pytest.fixture
def stand_in_cfg(fresh_cfg):
    """The config under which tests/stand_in.py's images are predicted at their own size."""
    fresh_cfg.PREPROC.TEST_SHORT_EDGE_SIZE = 48  # the images' own size: no resampling
    fresh_cfg.PREPROC.MAX_SIZE = 1000
    fresh_cfg.PREPROC.IMAGE_CHANNELS = 3
    fresh_cfg.PREPROC.CHANNEL_ORDER = 'BGR'
    fresh_cfg.MODE_MASK = True
    fresh_cfg.TRAIN.NUM_GPUS = 0
    return fresh_cfg
