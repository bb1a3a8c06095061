"""Channel pruning of a trained model's weights (prune.py's work), as NVIDIA TAO prunes.

Each channel space (modeling/channel_spaces.py) is scored per layer, by criterion:
``kernel`` (TAO's): the L2 norm of each output channel's kernel of every producer;
``gamma`` (network slimming, Liu et al. 2017): |gamma| of every normalisation layer on the
space (a space without one, e.g. an FC layer, is kept whole). Each layer's scores are
divided by its largest (so they are in [0, 1]) and combined by the equalization mode
(union: max, intersection: min, arithmetic_mean, geometric_mean). Channels scoring at
least the threshold stay; their count is rounded up to a multiple of the granularity, to
at least min_channels and at most the layer's width, filled with the next best channels.
Then every producer, normalisation and consumer variable of the space is sliced to those
channels.

On a space with GroupNorm, whole groups are kept or dropped (a group stays if one of its
channels does): the groups that stay see exactly the statistics they were trained with,
where regrouping the kept channels would change every group's mean and variance. The
group count becomes kept channels / channels per group, recorded in PRUNE.GN_GROUPS.
Where the GroupNorms of one space group differently (not nested), channels are chosen one
by one and each GroupNorm takes the largest group count up to its old one that divides
the kept count.

Before the channels, ``blocks_to_drop`` / ``drop_blocks`` remove whole residual branches
(prune.py --drop-blocks): those whose last norm layer has every |gamma| at most a bound.
The block then adds that norm's beta to its shortcut (modeling.backbone.dropped_block).

Weights are ``{variable name: ndarray}`` as ``utils.training.read_weights`` returns them.
"""
import collections
import logging
import math
import os
import re

import numpy as np

from config import config as cfg
from modeling.backbone import dropped_block_shift, residual_blocks
from modeling.channel_spaces import STAGES, layer_stage
from utils.training import TRAINING_STATE, UserInputError

__all__ = ['CRITERIA', 'EQUALIZATIONS', 'PruneOptions', 'prune_weights', 'summary_rows',
           'format_summary', 'write_pruned_model', 'branch_gammas', 'blocks_to_drop',
           'drop_blocks']

# --equalization: how the producers of one channel space combine their [C] scores.
EQUALIZATIONS = {
    'union': lambda s: s.max(axis=0),            # kept if any producer keeps it
    'intersection': lambda s: s.min(axis=0),     # kept only if every producer keeps it
    'arithmetic_mean': lambda s: s.mean(axis=0),
    'geometric_mean': lambda s: np.exp(np.log(np.maximum(s, 1e-30)).mean(axis=0)),
}
DEFAULT_GN_GROUPS = 32  # modeling.backbone.GroupNorm's default

CRITERIA = ('kernel', 'gamma')
PruneOptions = collections.namedtuple(
    'PruneOptions', 'threshold granularity min_channels equalization exclude criterion',
    defaults=('kernel',))
PruneResult = collections.namedtuple('PruneResult', 'weights channels gn_groups')


def _out_axis(name):
    """Output-channel axis of a layer's W: [kh, kw, in, out], [in, out] for FC, and
    [kh, kw, out, in] for the transposed conv."""
    return 2 if name.endswith('/deconv') else -1


def _in_axis(name, kernel):
    return 3 if name.endswith('/deconv') else kernel.ndim - 2


def _kernel_norms(weights, name):
    kernel = np.asarray(weights[name + '/W'], np.float64)
    axis = _out_axis(name) % kernel.ndim
    others = tuple(a for a in range(kernel.ndim) if a != axis)
    return np.sqrt(np.square(kernel).sum(axis=others))


def _norm_layers(weights, space, own=('/gn', '/bn')):
    """Names of the normalisation layers on ``space`` that have a gamma in ``weights``: its
    producers' own (``<producer>`` + each suffix of ``own``) and its separate norms (all
    GroupNorms: ``fpn/gn_c2``, ``fastrcnn/gn0``)."""
    names = [p + suffix for p in space.producers for suffix in own]
    return [n for n in names + list(space.norms) if n + '/gamma' in weights]


def channel_scores(weights, space, equalization, criterion='kernel'):
    """float64 [C]: per layer of ``space`` (ChannelSpace) by ``criterion`` (module doc),
    over the layer's largest, combined over the layers by EQUALIZATIONS[equalization]."""
    if criterion == 'gamma':
        norms = _norm_layers(weights, space)
        first = space.producers[0]
        per_layer = [np.abs(np.asarray(weights[n + '/gamma'], np.float64)) for n in norms] \
            or [np.ones(weights[first + '/W'].shape[_out_axis(first)])]  # kept whole
    else:
        per_layer = [_kernel_norms(weights, name) for name in space.producers]
    per_layer = [v / v.max() if v.max() > 0 else np.ones_like(v) for v in per_layer]
    return EQUALIZATIONS[equalization](np.stack(per_layer))


def select_channels(scores, options, group_size=1):
    """Sorted int [n] indices of the kept channels of one space (see the module doc).
    ``group_size``: consecutive channels kept or dropped together (a GroupNorm group)."""
    groups = scores.reshape(-1, group_size).max(axis=1)
    step = options.granularity // math.gcd(options.granularity, group_size)  # groups
    count = max(int((groups >= options.threshold).sum()),
                int(math.ceil(options.min_channels / group_size)))
    count = min(len(groups), int(math.ceil(count / step)) * step)
    order = np.argsort(-groups, kind='stable')  # ties: the lower index first
    kept = np.sort(order[:count])
    return (kept[:, None] * group_size + np.arange(group_size)).ravel()


def adjusted_groups(width, groups, kept):
    """A GroupNorm's group count after pruning its ``width`` channels to ``kept``."""
    per_group = width // groups
    if kept % per_group == 0:
        return kept // per_group
    return max(g for g in range(1, groups + 1) if kept % g == 0)


def _slice(array, axis, keep):
    return np.take(array, keep, axis=axis)


def _slice_space(weights, space, keep, width):
    """Slice every variable of ``space`` (in ``weights``, in place) to channels ``keep``."""
    for name in space.producers:
        for var in [v for v in weights if v.startswith(name + '/')]:
            axis = _out_axis(name) if var == name + '/W' else 0
            assert weights[var].shape[axis] == width, (var, weights[var].shape, width)
            weights[var] = _slice(weights[var], axis, keep)
    for name in space.norms:
        for var in [v for v in weights if v.startswith(name + '/')]:
            weights[var] = _slice(weights[var], 0, keep)
    for name in space.consumers:
        kernel = weights[name + '/W']
        axis = _in_axis(name, kernel)
        # an FC layer after RoIAlign reads C x S x S inputs flattened channel-major (NCHW)
        repeat = kernel.shape[axis] // width
        assert repeat * width == kernel.shape[axis], (name, kernel.shape, width)
        rows = (keep[:, None] * repeat + np.arange(repeat)).ravel()
        weights[name + '/W'] = _slice(kernel, axis, rows)


def _shared_group_size(width, group_counts):
    """Channels per group that every GroupNorm of a space (``group_counts`` over ``width``
    channels) keeps whole: the largest group size if the others nest in it, else 1."""
    sizes = [width // g for g in group_counts]
    largest = max(sizes, default=1)
    return largest if all(largest % size == 0 for size in sizes) else 1


def prune_weights(weights, spaces, options, gn_groups=None):
    """Prune every channel space not excluded.

    Args:
        weights: {name: ndarray} of the model; not modified.
        spaces: list of ChannelSpace of that model (``channel_spaces()``).
        options (PruneOptions): threshold in [0, 1], granularity, min_channels,
            equalization (an EQUALIZATIONS key), exclude (compiled regex or None: a space
            with a producer it matches is kept whole), criterion (a CRITERIA entry).
        gn_groups: the model's PRUNE.GN_GROUPS (an already pruned model), or None.
    Returns:
        PruneResult: weights {name: ndarray} without training state (optimizer slots, ...),
        channels {layer: width} of every producer of a pruned space, gn_groups
        {GroupNorm layer: groups} of the GroupNorms whose group count changed (plus
        ``gn_groups`` given).
    Raises:
        UserInputError: a layer of the model is missing from ``weights``, or ``exclude``
            keeps every space whole.
    """
    weights = {k: v for k, v in weights.items() if not TRAINING_STATE.search(k)}
    gn_groups = dict(gn_groups or {})
    missing = sorted({n for s in spaces for n in s.producers + s.consumers
                      if n + '/W' not in weights})
    if missing:
        raise UserInputError('--load: the weights lack {} layer(s) of the configured model, '
                             'e.g. {}: is the config the one they were trained with?'.format(
                                 len(missing), ', '.join(missing[:3])))
    candidates = [s for s in spaces if not (options.exclude and any(
        options.exclude.search(p) for p in s.producers))]
    if not candidates:
        raise UserInputError('--exclude {!r} matches a layer of every channel group: nothing '
                             'would be pruned.'.format(options.exclude.pattern))
    channels = {}
    for space in candidates:
        width = weights[space.producers[0] + '/W'].shape[_out_axis(space.producers[0])]
        gns = {gn: gn_groups.get(gn, DEFAULT_GN_GROUPS)
               for gn in _norm_layers(weights, space, own=('/gn',))}
        scores = channel_scores(weights, space, options.equalization, options.criterion)
        keep = select_channels(scores, options, _shared_group_size(width, gns.values()))
        if len(keep) == width:
            continue
        for gn, groups in gns.items():
            if adjusted_groups(width, groups, len(keep)) != groups:
                gn_groups[gn] = adjusted_groups(width, groups, len(keep))
        _slice_space(weights, space, keep, width)
        channels.update({name: int(len(keep)) for name in space.producers})
    return PruneResult(weights, channels, gn_groups)


def branch_gammas(weights):
    """{block ('group<g>/block<i>'): largest |gamma| of the norm layer ending its residual
    branch}, in order, for the configured backbone's blocks that still have their branch
    (a gamma in ``weights``)."""
    found = collections.OrderedDict()
    for block in residual_blocks():
        gamma = weights.get(dropped_block_shift(block) + '/gamma')
        if gamma is not None:
            found[block] = float(np.abs(gamma).max())
    return found


def blocks_to_drop(weights, max_gamma, keep=None):
    """The blocks of ``branch_gammas`` whose branch's last gamma is <= ``max_gamma`` and
    whose name ``keep`` (regex or None) does not match: the branch adds gamma x (a signal
    of unit variance) + beta, so without it the block's output moves by at most
    ~max_gamma per channel."""
    return [b for b, g in branch_gammas(weights).items()
            if g <= max_gamma and not (keep and keep.search(b))]


def drop_blocks(weights, blocks):
    """``weights`` without the residual branches of ``blocks``: every variable of their
    convs and norms goes but the last norm's beta (modeling.backbone.dropped_block); the
    shortcut conv stays."""
    if not blocks:
        return dict(weights)
    keep = {dropped_block_shift(b) + '/beta' for b in blocks}
    branch = re.compile(r'^({})/conv\d/'.format('|'.join(re.escape(b) for b in blocks)))
    return {k: v for k, v in weights.items() if k in keep or not branch.match(k)}


def summary_rows(before, after, cells):
    """Per stage (modeling.channel_spaces.STAGES) and in total: output channels of its
    layers, parameters and FLOPs (2 per multiply-add of the conv / FC kernels, at the
    output positions ``cells``), before and after.

    Returns:
        list of (stage, channels_before, channels_after, params_before, params_after,
        flops_before, flops_after); the last row is 'total'.
    """
    table = collections.OrderedDict((s, [0] * 6) for s in STAGES + ('total',))
    for k, weights in enumerate((before, after)):
        for var, value in weights.items():
            if TRAINING_STATE.search(var):
                continue
            stage = layer_stage(var)
            for row in (table[stage], table['total']):
                row[2 + k] += int(value.size)
                if var.endswith('/W') and var[:-2] in cells:
                    row[k] += int(value.shape[_out_axis(var[:-2])])
                    row[4 + k] += 2 * int(value.size) * cells[var[:-2]]
    return [(stage,) + tuple(v) for stage, v in table.items() if any(v)]


def format_summary(rows):
    """The summary table as text lines."""
    lines = ['{:<10} {:>17} {:>21} {:>19}'.format('stage', 'channels', 'parameters',
                                                  'GFLOPs')]
    for stage, cb, ca, pb, pa, fb, fa in rows:
        lines.append('{:<10} {:>7} -> {:>6} {:>9} -> {:>9} {:>8.3f} -> {:>7.3f}'.format(
            stage, cb, ca, pb, pa, fb / 1e9, fa / 1e9))
    return lines


def write_pruned_model(weights, output_dir, channels, gn_groups, dropped_blocks=()):
    """Write ``output_dir``/model-0 (a TF checkpoint: ``--load output_dir`` reads it) and
    ``output_dir``/config.yaml, the global config with PRUNE.CHANNELS / PRUNE.GN_GROUPS /
    PRUNE.DROPPED_BLOCKS (merged with those of an already pruned model).

    Returns:
        the merged PRUNE.CHANNELS written.
    """
    from tensorpack.tfutils.varmanip import save_checkpoint_vars
    os.makedirs(output_dir, exist_ok=True)
    logger = logging.getLogger('tensorpack')
    level = logger.level
    logger.setLevel(logging.WARNING)  # it would log every variable name
    try:
        save_checkpoint_vars(weights, os.path.join(output_dir, 'model-0'))
    finally:
        logger.setLevel(level)
    merged = dict(cfg.PRUNE.CHANNELS, **channels)
    blocks = list(cfg.PRUNE.DROPPED_BLOCKS) + list(dropped_blocks)
    with cfg.override({'PRUNE.CHANNELS': merged, 'PRUNE.GN_GROUPS': gn_groups,
                       'PRUNE.DROPPED_BLOCKS': blocks}):
        cfg.save_yaml(os.path.join(output_dir, 'config.yaml'))
    return merged


def compile_regex(pattern, flag):
    """The value of command-line flag ``flag`` compiled as a regex (None for None);
    UserInputError if it is invalid."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserInputError('{} {!r} is not a valid regular expression: {}.'.format(
            flag, pattern, e)) from None
