"""ResNet backbones (C4 and FPN variants), their normalisations and layer freezing.

Variable names follow the tensorpack model zoo: ``conv0`` (+ ``conv0/bn`` or ``conv0/gn``),
``group{0..3}/block{i}/conv{1,2,3}`` and ``.../convshortcut``; groups 0..3 are res2..res5.

Stages are counted 0 (stem: conv0 + max pool) to 4 (res5). The first
``num_frozen_stages()`` of them are frozen: their variables are created outside the
TRAINABLE_VARIABLES collection (so neither the optimizer nor weight decay touches them),
their BatchNorms use the stored statistics, and their output goes through
``tf.stop_gradient`` so no backward memory is spent on them -- unless ``train_conv0`` keeps
the stem trainable (new input channels), in which case gradients flow through
the frozen stages down to conv0.

Feature maps use ``cfg.BACKBONE.DATA_FORMAT``: [1, C, H, W] (NCHW) or [1, H, W, C] (NHWC).
"""
import contextlib

import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow.compat.v1 as tf
from tensorpack.models import BatchNorm, Conv2D, MaxPooling, layer_register
from tensorpack.tfutils.argscope import argscope
from tensorpack.tfutils.varreplace import custom_getter_scope
from tensorpack.utils.argtools import get_data_format

from config import config as cfg
from config_defaults import BLOCKS_FOR_DEPTH, DEPTHS, TRAINABLE_LAYERS
from utils.compat import frozen_variable_getter

from .widths import block_dropped, gn_groups, layer_width

__all__ = ['GroupNorm', 'num_blocks_for_depth', 'block_func_for_depth', 'residual_blocks',
           'dropped_block_shift', 'num_frozen_stages',
           'backbone_scope', 'resnet_c4_backbone', 'resnet_conv5', 'resnet_fpn_backbone',
           'feature_data_format']

# Stages frozen by each BACKBONE.TRAINABLE value (config_defaults.TRAINABLE_LAYERS, in
# order): 'all' none, '3+' stem + res2, ..., 'heads' all 5 (stem + res2..res5).
FROZEN_STAGES_BY_TRAINABLE = dict(zip(TRAINABLE_LAYERS, (0, 2, 3, 4, 5)))


@layer_register(log_shape=True)
def GroupNorm(x, group=32, gamma_initializer=tf.ones_initializer(),
              data_format='channels_last'):
    """Group Normalization (Wu & He, 2018) of a 4D tensor.

    Args:
        x: [N, H, W, C] (NHWC) or [N, C, H, W] (NCHW); C static and divisible by ``group``
            (a pruned model's PRUNE.GN_GROUPS of this layer replaces ``group``).
    Returns:
        same shape. Variables: ``gamma``, ``beta`` of shape [C].
    """
    data_format = get_data_format(data_format, keras_mode=False)
    axis = 1 if data_format == 'NCHW' else 3
    group = gn_groups(group)
    chan = x.shape.as_list()[axis]
    assert chan is not None and chan % group == 0, (chan, group)
    shape = tf.shape(x)
    if data_format == 'NCHW':
        grouped = tf.reshape(x, [shape[0], group, chan // group, shape[2], shape[3]])
        moments_axes, param_shape = [2, 3, 4], [1, group, chan // group, 1, 1]
    else:
        grouped = tf.reshape(x, [shape[0], shape[1], shape[2], group, chan // group])
        moments_axes, param_shape = [1, 2, 4], [1, 1, 1, group, chan // group]
    mean, var = tf.nn.moments(grouped, moments_axes, keepdims=True)  # [N, G] as 5D
    gamma = tf.get_variable('gamma', [chan], initializer=gamma_initializer)
    beta = tf.get_variable('beta', [chan], initializer=tf.zeros_initializer())
    # Fold normalisation and the affine into one small per-(image, channel) scale and shift:
    # two passes over the feature map (x * scale + shift) instead of four.
    scale = tf.cast(tf.reshape(gamma, param_shape), x.dtype) * tf.rsqrt(var + 1e-5)
    shift = tf.cast(tf.reshape(beta, param_shape), x.dtype) - mean * scale
    return tf.reshape(grouped * scale + shift, shape, name='output')


def num_blocks_for_depth(depth):
    """Residual blocks per group (res2..res5) of ResNet-``depth``."""
    if depth not in BLOCKS_FOR_DEPTH:
        raise ValueError('BACKBONE.DEPTH must be one of {}, got {}.'.format(DEPTHS, depth))
    return list(BLOCKS_FOR_DEPTH[depth])


def block_func_for_depth(depth):
    """``basic_block`` for ResNet-18/34, ``bottleneck_block`` for ResNet-50/101."""
    num_blocks_for_depth(depth)  # validates
    return basic_block if depth < 50 else bottleneck_block


def residual_blocks():
    """Names ('group<g>/block<i>') of the configured ResNet's residual blocks, in order."""
    return ['group{}/block{}'.format(g, i)
            for g, count in enumerate(num_blocks_for_depth(cfg.BACKBONE.DEPTH))
            for i in range(count)]


def dropped_block_shift(block=''):
    """The norm layer (variable scope) ending the residual branch of ``block`` (default: the
    current scope's block), whose ``beta`` a dropped block keeps: ``<block>/conv2/gn``
    (basic block, GroupNorm), ``.../conv3/bn`` (bottleneck, BatchNorm), ..."""
    last = 'conv3' if block_func_for_depth(cfg.BACKBONE.DEPTH) is bottleneck_block else 'conv2'
    norm = 'gn' if cfg.BACKBONE.NORM == 'GN' else 'bn'
    return '/'.join(p for p in (block, last, norm) if p)


def num_frozen_stages(freeze_at=None, trainable=None):
    """How many of the stages (stem, res2, res3, res4, res5) are frozen.

    Args:
        freeze_at: 0, 1 or 2 (default cfg.BACKBONE.FREEZE_AT).
        trainable: 'all', '3+', '4+', '5+' or 'heads' (default cfg.BACKBONE.TRAINABLE).
    Returns:
        int in 0..5: the larger of the two requirements.
    """
    freeze_at = cfg.BACKBONE.FREEZE_AT if freeze_at is None else freeze_at
    trainable = cfg.BACKBONE.TRAINABLE if trainable is None else trainable
    return max(freeze_at, FROZEN_STAGES_BY_TRAINABLE[trainable])


def feature_data_format():
    """cfg.BACKBONE.DATA_FORMAT ('NHWC' or 'NCHW'), checked to be resolved."""
    fmt = cfg.BACKBONE.DATA_FORMAT
    assert fmt in ('NHWC', 'NCHW'), \
        'cfg.BACKBONE.DATA_FORMAT is "{}": call finalize_configs() first.'.format(fmt)
    return fmt


@contextlib.contextmanager
def backbone_scope(freeze):
    """Layer defaults of backbone layers built inside; ``freeze`` makes them frozen.

    Frozen: variables are kept out of TRAINABLE_VARIABLES and BatchNorm uses its stored
    statistics. Not frozen: 'FreezeBN' still uses stored statistics (only the affine
    part trains); 'BN' uses this device's batch statistics (all its images); 'SyncBN'
    averages batch statistics over all devices.
    """
    norm = cfg.BACKBONE.NORM
    bn_args = {}
    if freeze or norm == 'FreezeBN':
        bn_args['training'] = False
    elif norm == 'SyncBN':
        bn_args['sync_statistics'] = 'horovod' if cfg.TRAINER == 'horovod' else 'nccl'
    init = tf.variance_scaling_initializer(scale=2.0, mode='fan_out',
                                           distribution='untruncated_normal')
    with argscope([Conv2D, MaxPooling, BatchNorm, GroupNorm], data_format=feature_data_format()), \
            argscope(Conv2D, use_bias=(norm == 'None'), kernel_initializer=init), \
            argscope(BatchNorm, **bn_args), \
            (custom_getter_scope(frozen_variable_getter) if freeze else contextlib.nullcontext()):
        yield


def _norm(x, zero_init=False):
    """cfg.BACKBONE.NORM on a conv output (identity for 'None'). ``zero_init`` starts
    gamma at 0, so a residual block starts as the identity (helps training from scratch)."""
    norm = cfg.BACKBONE.NORM
    if norm == 'None':
        return x
    gamma_init = tf.zeros_initializer() if zero_init else tf.ones_initializer()
    if norm == 'GN':
        return GroupNorm('gn', x, gamma_initializer=gamma_init)
    return BatchNorm('bn', x, gamma_initializer=gamma_init)


def _norm_relu(x):
    return tf.nn.relu(_norm(x))


def _pad(x, before, after):
    """Explicit spatial padding before a strided VALID conv/pool, so feature sizes are
    exactly H / stride for H divisible by the stride."""
    spatial = [before, after]
    if feature_data_format() == 'NCHW':
        return tf.pad(x, [[0, 0], [0, 0], spatial, spatial])
    return tf.pad(x, [[0, 0], spatial, spatial, [0, 0]])


def _conv3x3(name, x, channels, stride, activation):
    channels = layer_width(name, channels)
    if stride == 1:
        return Conv2D(name, x, channels, 3, activation=activation)
    return Conv2D(name, _pad(x, 1, 0), channels, 3, strides=stride, padding='VALID',
                  activation=activation)


def _shortcut(x, out_channels, stride, project):
    """The identity, or with ``project`` a 1x1 conv (first block of a group): decided by
    the architecture, not by the widths, which pruning may make equal."""
    if not project:
        return x
    if stride == 2:
        # An odd side n gives ceil(n / 2) here but floor(n / 2) in the residual branch
        # (unpadded C4 input): drop the last row/column, as tensorpack does. For even n the
        # 1x1 stride-2 conv never reads it, so this changes nothing.
        x = x[:, :, :-1, :-1] if feature_data_format() == 'NCHW' else x[:, :-1, :-1, :]
    return Conv2D('convshortcut', x, layer_width('convshortcut', out_channels), 1,
                  strides=stride, padding='VALID', activation=_norm)


def basic_block(x, channels, stride, first):
    """Two 3x3 convs (ResNet-18/34); the shortcut is a 1x1 conv in the ``first`` block of
    a strided group. [1, Cin, H, W] -> [1, channels, H/stride, W/stride] (channels:
    PRUNE.CHANNELS of conv2 in a pruned model, as every width below)."""
    shortcut = x
    x = _conv3x3('conv1', x, channels, stride, _norm_relu)
    x = Conv2D('conv2', x, layer_width('conv2', channels), 3,
               activation=lambda t: _norm(t, zero_init=True))
    return tf.nn.relu(x + _shortcut(shortcut, channels, stride, project=first and stride != 1))


def bottleneck_block(x, channels, stride, first):
    """1x1, 3x3, 1x1 (ResNet-50/101); the stride sits in the 1x1 conv with
    cfg.BACKBONE.STRIDE_1X1 (Caffe weights), else in the 3x3. ``first``: the group's first
    block, whose shortcut is a 1x1 conv. [1, Cin, H, W] -> [1, 4 * channels, H/stride,
    W/stride] (channels: PRUNE.CHANNELS of conv3 in a pruned model, as every width below)."""
    shortcut = x
    if cfg.BACKBONE.STRIDE_1X1:
        x = Conv2D('conv1', x, layer_width('conv1', channels), 1, strides=stride,
                   padding='VALID', activation=_norm_relu)
        x = Conv2D('conv2', x, layer_width('conv2', channels), 3, activation=_norm_relu)
    else:
        x = Conv2D('conv1', x, layer_width('conv1', channels), 1, activation=_norm_relu)
        x = _conv3x3('conv2', x, channels, stride, _norm_relu)
    x = Conv2D('conv3', x, layer_width('conv3', channels * 4), 1,
               activation=lambda t: _norm(t, zero_init=True))
    return tf.nn.relu(x + _shortcut(shortcut, channels * 4, stride, project=first))


def dropped_block(x, channels, stride, first, bottleneck):
    """A block whose residual branch prune.py removed (PRUNE.DROPPED_BLOCKS): relu(shortcut
    + beta), beta [C] being the branch's last norm layer's shift (variable
    ``dropped_block_shift``), what the branch added on average. Arguments as the block
    function's; the shortcut is the same as the full block's."""
    out_channels = channels * 4 if bottleneck else channels
    x = _shortcut(x, out_channels, stride, project=first and (bottleneck or stride != 1))
    axis = 1 if feature_data_format() == 'NCHW' else 3
    with tf.variable_scope(dropped_block_shift()):
        beta = tf.get_variable('beta', [x.shape.as_list()[axis]],
                               initializer=tf.zeros_initializer())
    shape = [1, -1, 1, 1] if axis == 1 else [1, 1, 1, -1]
    return tf.nn.relu(x + tf.cast(tf.reshape(beta, shape), x.dtype))


def resnet_group(name, x, block_func, channels, count, stride):
    """``count`` blocks under ``name/block{i}``; the first has the stride."""
    with tf.variable_scope(name):
        for i in range(count):
            with tf.variable_scope('block{}'.format(i)):
                if block_dropped():
                    x = dropped_block(x, channels, stride if i == 0 else 1, i == 0,
                                      bottleneck=block_func is bottleneck_block)
                else:
                    x = block_func(x, channels, stride if i == 0 else 1, first=i == 0)
    return x


def _resnet_stages(image, num_blocks, num_groups, train_conv0):
    """Stem and the first ``num_groups`` groups; returns the output of every group."""
    num_frozen = num_frozen_stages()
    block_func = block_func_for_depth(cfg.BACKBONE.DEPTH)
    # Gradients are only needed below a frozen stage when conv0 below it trains.
    cut_gradient = not train_conv0

    with backbone_scope(freeze=num_frozen >= 1 and not train_conv0):
        x = Conv2D('conv0', _pad(image, 3, 2), layer_width('conv0', 64), 7, strides=2,
                   padding='VALID', activation=_norm_relu)
        x = MaxPooling('pool0', _pad(x, 1, 0), 3, strides=2, padding='VALID')
    if num_frozen >= 1 and cut_gradient:
        x = tf.stop_gradient(x)

    outputs = []
    for group in range(num_groups):
        frozen = num_frozen >= group + 2
        with backbone_scope(freeze=frozen):
            x = resnet_group('group{}'.format(group), x, block_func, 64 * 2 ** group,
                             num_blocks[group], 1 if group == 0 else 2)
        if frozen and cut_gradient:
            x = tf.stop_gradient(x)
        outputs.append(x)
    return outputs


def resnet_c4_backbone(image, num_blocks, train_conv0=False):
    """Stem + res2..res4 for the C4 model.

    Args:
        image: float32 [1, C, H, W] or [1, H, W, C] (cfg.BACKBONE.DATA_FORMAT), normalised;
            C (1, 3 or 4) must be static.
        num_blocks: 3 or 4 ints (blocks of res2..res4; a 4th is ignored).
        train_conv0 (bool): conv0 trains even when the stem is frozen.
    Returns:
        C4 feature [1, 1024, floor(H/16), floor(W/16)] (256 channels for ResNet-18/34),
        same data format.
    """
    return _resnet_stages(image, num_blocks, 3, train_conv0)[-1]


def resnet_conv5(roi_features, num_block):
    """res5 (``group3``) of the C4 model, applied to RoIAligned features.

    Args:
        roi_features: [N, C, S, S] or [N, S, S, C] (cfg.BACKBONE.DATA_FORMAT), S even.
        num_block (int): blocks in res5.
    Returns:
        [N, 2048, S/2, S/2] (512 channels for ResNet-18/34); frozen only for
        BACKBONE.TRAINABLE='heads'. Calling it again (e.g. on the RoIs of the mask head at
        inference) reuses the same weights.
    """
    block_func = block_func_for_depth(cfg.BACKBONE.DEPTH)
    with backbone_scope(freeze=num_frozen_stages() >= 5), \
            tf.variable_scope(tf.get_variable_scope(), reuse=tf.AUTO_REUSE,
                              auxiliary_name_scope=False):  # keep e.g. the tower name scope
        return resnet_group('group3', roi_features, block_func, 512, num_block, 2)


def resnet_fpn_backbone(image, num_blocks, train_conv0=False):
    """Stem + res2..res5 for FPN.

    Args:
        image: as in ``resnet_c4_backbone`` but H and W multiples of 32.
        num_blocks: 4 ints.
        train_conv0 (bool): conv0 trains even when the stem is frozen.
    Returns:
        [C2, C3, C4, C5] of strides 4, 8, 16, 32 and 256, 512, 1024, 2048 channels
        (64, 128, 256, 512 for ResNet-18/34), same data format as ``image``.
    """
    assert len(num_blocks) == 4, num_blocks
    return _resnet_stages(image, num_blocks, 4, train_conv0)
