"""Test setup: the compat shims first, the repo root on sys.path, quiet logs."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import utils.compat  # noqa: E402,F401  (must precede every TensorFlow import)

import pytest  # noqa: E402

from config import config as _cfg  # noqa: E402


@pytest.fixture
def fresh_cfg():
    """The global config, unfrozen for the test; every key (and the frozen flag) is
    restored afterwards. The one way tests change config keys."""
    with _cfg.override() as c:
        yield c
