"""pruning.py's selection: channel scores by criterion and equalization, thresholds,
granularity and whole GroupNorm groups, and the residual blocks --drop-blocks removes.
(tests/test_prune.py runs prune.py on whole models.)"""
import re

import numpy as np

import pruning
from modeling.channel_spaces import ChannelSpace, channel_spaces
from tiny import configured

NO_NORM = ['BACKBONE.NORM=None']


def test_select_channels_threshold_granularity_minimum():
    scores = np.array([1., .9, .1, .8, .2, .05, .7, .3])
    opts = pruning.PruneOptions(0.5, 1, 1, 'union', None)
    assert pruning.select_channels(scores, opts).tolist() == [0, 1, 3, 6]
    # 4 kept, rounded up to 6: the next best (.3, .2) join; the order stays sorted
    opts = opts._replace(granularity=3)
    assert pruning.select_channels(scores, opts).tolist() == [0, 1, 3, 4, 6, 7]
    opts = opts._replace(threshold=0.95, granularity=1, min_channels=3)
    assert pruning.select_channels(scores, opts).tolist() == [0, 1, 3]
    opts = opts._replace(threshold=0., min_channels=1)
    assert len(pruning.select_channels(scores, opts)) == 8  # 0 keeps every channel
    opts = opts._replace(threshold=1., granularity=16)
    assert len(pruning.select_channels(scores, opts)) == 8  # never more than the width


def test_select_whole_groups():
    """group_size 2 (a GroupNorm of 2 channels per group): a group stays if one of its
    channels passes; granularity and min_channels count channels, rounded to groups."""
    scores = np.array([1., .1, .2, .3, .1, .9, .2, .2])
    opts = pruning.PruneOptions(0.5, 1, 1, 'union', None)
    assert pruning.select_channels(scores, opts, 2).tolist() == [0, 1, 4, 5]
    opts = opts._replace(granularity=3)  # 6 channels: 3 groups, the next best (.3) joins
    assert pruning.select_channels(scores, opts, 2).tolist() == [0, 1, 2, 3, 4, 5]
    opts = opts._replace(threshold=0.95, granularity=1, min_channels=3)  # 2 groups
    assert pruning.select_channels(scores, opts, 2).tolist() == [0, 1, 4, 5]
    assert pruning._shared_group_size(64, [32, 16]) == 4     # 2 and 4 per group: nested
    assert pruning._shared_group_size(48, [16, 8]) == 6
    assert pruning._shared_group_size(60, [12, 15]) == 1     # 5 and 4: chosen one by one


def test_gamma_criterion_scores_the_norm_layers():
    space = ChannelSpace(['a', 'b'], ['c'], [])
    rs = np.random.RandomState(0)
    weights = {n + '/W': rs.uniform(.5, 1., (3, 3, 4, 6)) for n in 'ab'}
    weights['a/gn/gamma'] = np.array([2., -2., .1, 1., .2, .0])
    weights['c/gamma'] = np.array([1., 1., .05, -.1, .1, .0])
    got = pruning.channel_scores(weights, space, 'union', 'gamma')
    np.testing.assert_allclose(got, [1., 1., .05, .5, .1, 0.])
    kernel = pruning.channel_scores(weights, space, 'union', 'kernel')
    assert kernel.min() > .5  # the kernels know nothing of the gammas
    del weights['a/gn/gamma'], weights['c/gamma']  # no norm: kept whole
    np.testing.assert_array_equal(pruning.channel_scores(weights, space, 'union', 'gamma'),
                                  np.ones(6))


def test_gn_groups_keep_channels_per_group_or_divide():
    assert pruning.adjusted_groups(64, 32, 48) == 24      # 2 channels per group kept
    assert pruning.adjusted_groups(256, 32, 200) == 25     # 8 per group
    assert pruning.adjusted_groups(64, 32, 36) == 18
    assert pruning.adjusted_groups(256, 32, 36) == 18      # 36 % 8: largest divisor <= 32
    assert pruning.adjusted_groups(32, 32, 24) == 24


def test_equalization_modes_of_a_residual_group():
    """One channel weak in only one member of a residual group: union keeps it, intersection
    drops it from every member, the means fall in between."""
    with configured(NO_NORM, is_training=False):
        spaces, _ = channel_spaces()
    group = next(s for s in spaces if 'group1/block0/convshortcut' in s.producers)
    assert sorted(group.producers) == ['group1/block0/conv2', 'group1/block0/convshortcut',
                                       'group1/block1/conv2']
    rs = np.random.RandomState(0)
    weights = {p + '/W': rs.uniform(0.9, 1., (3, 3, 8, 16)) for p in group.producers}
    weights['group1/block0/convshortcut/W'][..., 5] *= 0.01
    scores = {mode: pruning.channel_scores(weights, group, mode)
              for mode in pruning.EQUALIZATIONS}
    assert scores['union'][5] > 0.9 and scores['intersection'][5] < 0.02
    assert 0.5 < scores['arithmetic_mean'][5] < 0.7
    assert scores['intersection'][5] < scores['geometric_mean'][5] < 0.3


def test_blocks_to_drop_by_largest_gamma():
    with configured(['BACKBONE.DEPTH=50'], is_training=False):  # conv3 ends a branch
        weights = {'group0/block0/conv3/gn/gamma': np.array([.1, -.3]),
                   'group0/block1/conv3/gn/gamma': np.array([.1, .31]),
                   'group0/block2/conv2/gn/gamma': np.zeros(2),  # not a branch end in R-50
                   'group3/block2/conv3/gn/gamma': np.zeros(2)}
        assert pruning.branch_gammas(weights) == {'group0/block0': .3, 'group0/block1': .31,
                                                  'group3/block2': 0.}
        assert pruning.blocks_to_drop(weights, .3) == ['group0/block0', 'group3/block2']
        assert pruning.blocks_to_drop(weights, .3, re.compile('^group0/')) == \
            ['group3/block2']
        weights.update({'group3/block2/conv3/gn/beta': np.ones(2), 'group3/block2/conv1/W': 0,
                        'group3/block2/conv3/W': 0, 'group3/block2/convshortcut/W': 0,
                        'group3/block1/conv1/W': 0})
        left = pruning.drop_blocks(weights, ['group3/block2'])
    assert sorted(k for k in left if k.startswith('group3')) == [
        'group3/block1/conv1/W', 'group3/block2/conv3/gn/beta', 'group3/block2/convshortcut/W']
