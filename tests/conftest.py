"""Test setup: the compat shims first, the repo root on sys.path, quiet logs."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import utils.compat  # noqa: E402,F401  (must precede every TensorFlow import)
