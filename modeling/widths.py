"""Layer widths of a pruned model: the lookups the model builders make at each layer.

prune.py writes ``PRUNE.CHANNELS`` ({layer name: output channels}) and ``PRUNE.GN_GROUPS``
({GroupNorm layer name: groups}) into the pruned model's config.yaml. A layer name is its
full variable scope as in the checkpoint (``group1/block0/conv2``, ``fpn/posthoc_3x3_p3``,
``cascade_rcnn_stage2/head/fc6``), without a replicated trainer's ``tower<k>/`` prefix.
An unpruned model has both mappings empty: every layer keeps its configured width.
"""
import re

import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow.compat.v1 as tf

from config import config as cfg

__all__ = ['layer_width', 'gn_groups', 'scoped_name', 'block_dropped']


def scoped_name(name=''):
    """``name`` under the current variable scope, e.g. 'conv1' in 'group0/block0' ->
    'group0/block0/conv1'; the tower prefix of replicated training is dropped."""
    scope = re.sub(r'^tower\d+(/|$)', '', tf.get_variable_scope().name)
    return '/'.join(p for p in (scope, name) if p)


def layer_width(name, default):
    """Output channels of layer ``name`` (relative to the current variable scope):
    PRUNE.CHANNELS of its full name, else ``default`` (the configured width)."""
    return cfg.PRUNE.CHANNELS.get(scoped_name(name), default)


def gn_groups(default):
    """Groups of the GroupNorm layer whose variable scope is the current one:
    PRUNE.GN_GROUPS of its name, else ``default``."""
    return cfg.PRUNE.GN_GROUPS.get(scoped_name(), default)


def block_dropped():
    """Whether prune.py removed the branch of the residual block whose variable scope is the
    current one (PRUNE.DROPPED_BLOCKS)."""
    return scoped_name() in cfg.PRUNE.DROPPED_BLOCKS

