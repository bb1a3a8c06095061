"""Test helpers: a tiny model configuration for fast CPU tests, a context manager to apply
it, a dataset split over given roidbs, a reference polygon rasteriser, detection and mask
matching between two routes through one model (and untrained class scores spread apart
for it), and a fresh process with plain TensorFlow only."""
import contextlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import yaml
from pycocotools import mask as mask_util

from config import config as cfg, finalize_configs
from dataset import DatasetRegistry, DatasetSplit, register_shapes

# ResNet-18, 128-160 px images, few proposals and narrow heads: one training step of the
# full Mask R-CNN takes well under a second on 2 cores.
TINY = [
    'DATA.TRAIN=shapes_train', 'DATA.VAL=shapes_val', 'DATA.NUM_WORKERS=0',
    'BACKBONE.DEPTH=18', 'BACKBONE.NORM=GN', 'BACKBONE.FREEZE_AT=0',
    'PREPROC.TRAIN_SHORT_EDGE_SIZE=[128,160]', 'PREPROC.TEST_SHORT_EDGE_SIZE=128',
    'PREPROC.MAX_SIZE=192',
    'RPN.ANCHOR_SIZES=(16,32,64,128,256)', 'RPN.HEAD_DIM=64', 'RPN.BATCH_PER_IM=64',
    'RPN.TRAIN_PRE_NMS_TOPK=300', 'RPN.TRAIN_POST_NMS_TOPK=100',
    'RPN.TEST_PRE_NMS_TOPK=300', 'RPN.TEST_POST_NMS_TOPK=100',
    'RPN.TRAIN_PER_LEVEL_NMS_TOPK=100', 'RPN.TEST_PER_LEVEL_NMS_TOPK=100',
    'FRCNN.BATCH_PER_IM=64', 'FPN.NUM_CHANNEL=32', 'FPN.FRCNN_CONV_HEAD_DIM=32',
    'FPN.FRCNN_FC_HEAD_DIM=64', 'MRCNN.HEAD_DIM=32', 'MRCNN.GT_MASK_SIZE=56',
    'TEST.RESULTS_PER_IM=20',
]


@contextlib.contextmanager
def configured(overrides=(), is_training=True, tiny=True):
    """Apply TINY (optionally) + overrides, finalise for CPU, restore everything after."""
    register_shapes(num_train=40, num_val=8)
    with cfg.override((TINY if tiny else []) + list(overrides)):
        finalize_configs(is_training=is_training, num_gpus=0, registry=DatasetRegistry)
        yield cfg


def yaml_overrides(path):
    """A config YAML file as KEY=VALUE overrides (what `configured` takes)."""
    with open(path) as f:
        tree = yaml.safe_load(f)
    out = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + key + '.')
            else:
                out.append('{}{}={!r}'.format(prefix, key, value))
    walk(tree, '')
    return out


class ListSplit(DatasetSplit):
    """A dataset split over the given roidbs (dataset/dataset.py format)."""

    def __init__(self, roidbs):
        self._roidbs = roidbs

    def training_roidbs(self):
        return self._roidbs

    def inference_roidbs(self):
        return [{'file_name': r['file_name'], 'image_id': r['image_id']} for r in self._roidbs]


def full_mask(polygons, h, w):
    """Reference full-image rasterisation of polygons ([K, 2] each): uint8 [h, w]."""
    flat = [np.asarray(p, np.float64).reshape(-1).tolist() for p in polygons]
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(flat, h, w)))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PLAIN_PROLOGUE = """
import os, sys
# The project's own tree must not be importable (its virtualenv may live inside it).
assert os.path.abspath(ROOT) not in [os.path.abspath(p or '.') for p in sys.path], sys.path


def iter_frozen(path, fetches, feeds):
    \"\"\"Run a frozen GraphDef file once per feed dict of ``feeds``, in one session: yields
    session.run(fetches, feed) (tensors by name), one feed at a time.\"\"\"
    import tensorflow as tf
    graph_def = tf.compat.v1.GraphDef()
    with open(path, 'rb') as f:
        graph_def.ParseFromString(f.read())
    with tf.Graph().as_default() as g:
        tf.compat.v1.import_graph_def(graph_def, name='')
        with tf.compat.v1.Session(graph=g) as sess:
            for feed in feeds:
                yield sess.run(fetches, feed)


def run_frozen(path, fetches, feed):
    \"\"\"Run a frozen GraphDef file: session.run(fetches, feed) by tensor names.\"\"\"
    return next(iter_frozen(path, fetches, [feed]))
"""
_PLAIN_EPILOGUE = """
own = [m.__name__ for m in list(sys.modules.values())
       if os.path.abspath(getattr(m, '__file__', None) or '/').startswith(ROOT + os.sep)
       and 'site-packages' not in m.__file__]
assert not own, own
"""


def run_plain_tensorflow(body, workdir, **names):
    """Run the Python source ``body`` as a user without this project would: a fresh process,
    no PYTHONPATH, in ``workdir``; each of ``names`` (and ROOT) is a global of the script,
    and so are ``run_frozen(path, fetches, feed)`` (a frozen GraphDef file, run) and
    ``iter_frozen(path, fetches, feeds)`` (run once per feed, lazily).
    It fails if the project is on sys.path or any project module got imported.

    Returns:
        subprocess.CompletedProcess (text output).
    """
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['TF_USE_LEGACY_KERAS'] = '1'
    header = ''.join('{} = {!r}\n'.format(k, v) for k, v in dict(names, ROOT=ROOT).items())
    code = header + _PLAIN_PROLOGUE + textwrap.dedent(body) + _PLAIN_EPILOGUE
    return subprocess.run([sys.executable, '-c', code], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)


def spread_class_scores(sess, factor):
    """Load zero-sum class-logit weights, scaled by ``factor``, into the box heads of a
    freshly initialised model in ``sess`` (a predictor's). Fresh box features share a large
    positive part (after ReLU) that makes one class win everywhere, by a hair: the scores
    of similar boxes lie ~1e-4 apart, where float noise between two routes through the
    model may reorder them or change which make the top k. Zero-sum weights cancel the
    shared part; scaled by 10 they spread the scores ~10x further apart, by 100 they let
    every class win somewhere.
    """
    import re
    import tensorflow as tf
    with sess.graph.as_default():
        logits = [v for v in tf.compat.v1.global_variables() if re.match(
            r'(fastrcnn|cascade_rcnn_stage\d)(/outputs)?/class/W$', v.op.name)]
        assert logits, 'no class-logit layer'
        for v in logits:
            w = sess.run(v)  # [features, classes]
            v.load((w - w.mean(axis=0)) * factor, sess)


def matching_order(got, want, box_atol, score_atol):
    """Detections ``(class id, box, score)`` of two routes through one model: the same set,
    in the same order except where scores tie within ``score_atol`` (float differences
    between the graphs may then swap two). Asserts each of ``want`` has its own match in
    ``got`` (same class, box within ``box_atol`` px, score within ``score_atol``).

    Returns:
        list of int: ``order`` with got[order[i]] the match of want[i].
    """
    assert len(got) == len(want), (len(got), len(want))
    free, order = list(range(len(got))), []
    for i, (class_id, box, score) in enumerate(want):
        j = next((j for j in free if got[j][0] == class_id and abs(got[j][2] - score) <= score_atol
                  and np.allclose(got[j][1], box, rtol=0, atol=box_atol)), None)
        assert j is not None, 'detection {} {} has no match in {}'.format(
            i, (class_id, box, score), got)
        assert all(abs(got[k][2] - score) <= score_atol for k in free[:free.index(j)]), \
            'detection {} is out of score order'.format(i)
        free.remove(j)
        order.append(j)
    return order


def assert_masks_match(got, want):
    """Each pair of 0/1 masks has IoU >= 0.99, give or take one pixel: an untrained mask
    head's probabilities sit near the 0.5 threshold, where float rounding may flip a pixel
    (a 50-pixel mask would otherwise fail on one)."""
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g, bool), np.asarray(w, bool)
        union, differ = (g | w).sum(), (g != w).sum()
        assert differ <= 0.01 * union + 1, 'mask {}: {} of {} pixels differ'.format(
            i, differ, union)
