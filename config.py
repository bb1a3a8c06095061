"""The configuration: the global tree, validation, derived keys, freezing.

Everything tunable lives in the global ``config`` (alias ``cfg``), declared with its
defaults in ``config_defaults.py``. Entry scripts go through ``cli.setup_config``: an
optional ``load_yaml``, then ``config.update_args(['KEY=VALUE', ...])``, then
``finalize_configs(is_training, registry=DatasetRegistry)``, which validates, derives and
freezes the tree. Tests override keys with ``cfg.override([...])`` (tests/conftest.py).
"""
import difflib
import re

import config_defaults as D
from config_defaults import LEGACY_VALUES, config
from config_tree import ConfigError, parse_value, read_yaml_leaves

__all__ = ['config', 'cfg', 'finalize_configs', 'ConfigError', 'parse_value',
           'default_data_format', 'legacy_values', 'LEGACY_VALUES', 'prune_values']

cfg = _C = config


def _fail(msg):
    raise ConfigError(msg)


# Keys whose value must be one of a fixed list (config_defaults.py defines each list once).
_CHOICES = (('TRAINER', D.TRAINERS), ('BACKBONE.DEPTH', D.DEPTHS), ('BACKBONE.NORM', D.NORMS),
            ('BACKBONE.FREEZE_AT', D.FREEZE_AT), ('BACKBONE.TRAINABLE', D.TRAINABLE_LAYERS),
            ('BACKBONE.DATA_FORMAT', D.DATA_FORMATS), ('FPN.NORM', D.FPN_NORMS),
            ('FPN.PROPOSAL_MODE', D.PROPOSAL_MODES), ('TRAIN.PRECISION', D.PRECISIONS),
            ('TEST.MASK_PASTE', D.MASK_PASTE_MODES),
            ('PREPROC.IMAGE_CHANNELS', D.IMAGE_CHANNELS),
            ('PREPROC.CHANNEL_ORDER', D.CHANNEL_ORDERS),
            ('FPN.FRCNN_HEAD_FUNC', D.FRCNN_HEAD_FUNCS),
            ('FPN.MRCNN_HEAD_FUNC', D.MRCNN_HEAD_FUNCS))


def _get(key):
    node = _C
    for part in key.split('.'):
        node = getattr(node, part)
    return node


def _check_choices():
    """Every key of ``_CHOICES`` holds an allowed value; a typo gets the closest ones."""
    for key, allowed in _CHOICES:
        value = _get(key)
        if value in allowed:
            continue
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=2, cutoff=0.5)
        hint = ' Did you mean: {}?'.format(', '.join(close)) if close else ''
        _fail('{} must be one of {}, got {!r}.{}'.format(
            key, ', '.join(repr(a) for a in allowed), value, hint))


def _close_hint(word, allowed):
    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=2, cutoff=0.5)
    return ' Did you mean: {}?'.format(', '.join(close)) if close else ''


def _check_augmentations(stride):
    """PREPROC.AUGMENTATIONS: known names (config_defaults.AUGMENTORS) and parameters,
    numeric values, probabilities in [0, 1], large-scale jitter sizes the model can take."""
    key = 'PREPROC.AUGMENTATIONS'
    for item in _C.PREPROC.AUGMENTATIONS:
        name, params = (item, {}) if isinstance(item, str) else (list(item) + [None])[:2]
        if not isinstance(name, str) or not isinstance(params or {}, dict) or \
                (not isinstance(item, str) and len(item) != 2):
            _fail('{}: each item is a name or [name, {{param: value}}], got {!r}.'.format(
                key, item))
        if name not in D.AUGMENTORS:
            _fail('{}: unknown augmentor {!r}; known: {}.{}'.format(
                key, name, ', '.join(D.AUGMENTORS), _close_hint(name, D.AUGMENTORS)))
        for p, v in params.items():
            if p not in D.AUGMENTORS[name]:
                _fail('{}: {} has no parameter {!r}; it takes {}.{}'.format(
                    key, name, p, ', '.join(D.AUGMENTORS[name]) or 'none',
                    _close_hint(p, D.AUGMENTORS[name])))
            values = v if isinstance(v, (list, tuple)) else [v]
            if not values or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                     and x >= 0 for x in values):
                _fail('{}: {}.{} must be a number >= 0 (or a list of them), got {!r}.'.format(
                    key, name, p, v))
            if p == 'prob' and v > 1:
                _fail('{}: {}.prob must be in [0, 1], got {}.'.format(key, name, v))
        if name == 'LargeScaleJitter':
            lsj = dict(D.AUGMENTORS[name], **params)
            if lsj['size'] <= 0 or lsj['size'] % stride or \
                    not 0 < lsj['min_scale'] <= lsj['max_scale']:
                _fail('{}: LargeScaleJitter needs size a positive multiple of the largest '
                      'stride {} and 0 < min_scale <= max_scale, got {}.'.format(
                          key, stride, lsj))


def _check_prune():
    """PRUNE.CHANNELS and PRUNE.GN_GROUPS: {layer name: positive int}."""
    for key in ('CHANNELS', 'GN_GROUPS'):
        mapping = getattr(_C.PRUNE, key)
        if not isinstance(mapping, dict):
            _fail('PRUNE.{} must be a mapping {{layer name: int}}, got {!r}.'.format(key, mapping))
        for name, value in mapping.items():
            if not isinstance(name, str) or isinstance(value, bool) or \
                    not isinstance(value, int) or value < 1:
                _fail('PRUNE.{}: {!r}: {!r} must be a layer name and a positive int.'.format(
                    key, name, value))
    for name, groups in _C.PRUNE.GN_GROUPS.items():
        width = _C.PRUNE.CHANNELS.get(name.rsplit('/', 1)[0])
        if width is not None and name.endswith('/gn') and width % groups:
            _fail('PRUNE.GN_GROUPS: {} has {} groups, which do not divide its {} channels '
                  '(PRUNE.CHANNELS).'.format(name, groups, width))
    _check_dropped_blocks(_C.PRUNE.DROPPED_BLOCKS)


def _check_dropped_blocks(blocks):
    """PRUNE.DROPPED_BLOCKS (a list: the config tree checks that): names 'group<g>/block<i>'
    of blocks BACKBONE.DEPTH has."""
    counts = D.BLOCKS_FOR_DEPTH.get(_C.BACKBONE.DEPTH, [])
    for name in blocks:
        m = re.fullmatch(r'group([0-3])/block(\d+)', name) if isinstance(name, str) else None
        if not m or int(m.group(2)) >= counts[int(m.group(1))]:
            _fail('PRUNE.DROPPED_BLOCKS: {!r} is not a residual block of ResNet-{} '
                  '("group<0-3>/block<i>").'.format(name, _C.BACKBONE.DEPTH))
    if blocks and _C.BACKBONE.NORM == 'None':
        _fail('PRUNE.DROPPED_BLOCKS needs a BACKBONE.NORM: a dropped block keeps its last '
              'norm layer\'s beta.')


def _validate():
    """Check values and combinations of keys; every message names the keys involved."""
    C = _C
    _check_choices()
    if C.CASCADE.ENABLED and not C.MODE_FPN:
        _fail('CASCADE.ENABLED=True needs MODE_FPN=True (the cascade heads are FPN heads).')
    if not 0 <= C.RPN.ANCHOR_OFFSET < 1:
        _fail('RPN.ANCHOR_OFFSET must be in [0, 1) (fraction of a stride), got {}.'.format(
            C.RPN.ANCHOR_OFFSET))
    if C.TRAIN.WEIGHT_DECAY < 0 or C.TRAIN.NORM_L1 < 0:
        _fail('TRAIN.WEIGHT_DECAY and TRAIN.NORM_L1 must be >= 0.')
    if C.FRCNN.DECODE_CLIP_SIZE < 0:
        _fail('FRCNN.DECODE_CLIP_SIZE must be >= 0 (0: PREPROC.MAX_SIZE).')
    if C.PREPROC.RESIZE_UINT8 and C.PREPROC.IMAGE_CHANNELS == 4:
        _fail('PREPROC.RESIZE_UINT8=True would round the 4th (depth) channel: use False.')
    if len(C.CASCADE.IOUS) != len(C.CASCADE.BBOX_REG_WEIGHTS):
        _fail('CASCADE.IOUS and CASCADE.BBOX_REG_WEIGHTS must have the same length.')

    nch = C.PREPROC.IMAGE_CHANNELS
    for key in ('PIXEL_MEAN', 'PIXEL_STD'):
        if len(getattr(C.PREPROC, key)) != nch:
            _fail('PREPROC.{} has {} values but PREPROC.IMAGE_CHANNELS={}: give one per '
                  'channel.'.format(key, len(getattr(C.PREPROC, key)), nch))
    if min(C.PREPROC.PIXEL_STD) <= 0:
        _fail('PREPROC.PIXEL_STD values must be positive.')

    short = C.PREPROC.TRAIN_SHORT_EDGE_SIZE
    if len(short) != 2 or short[0] > short[1] or short[0] <= 0:
        _fail('PREPROC.TRAIN_SHORT_EDGE_SIZE must be [min, max] with 0 < min <= max.')
    if max(short[1], C.PREPROC.TEST_SHORT_EDGE_SIZE) > C.PREPROC.MAX_SIZE:
        _fail('PREPROC short edge sizes must not exceed PREPROC.MAX_SIZE={}.'.format(
            C.PREPROC.MAX_SIZE))
    stride = C.FPN.ANCHOR_STRIDES[-1] if C.MODE_FPN else C.RPN.ANCHOR_STRIDE
    if C.PREPROC.CROP_SIZE and C.PREPROC.CROP_SIZE % stride:
        _fail('PREPROC.CROP_SIZE={} must be a multiple of the largest stride {}.'.format(
            C.PREPROC.CROP_SIZE, stride))
    _check_augmentations(stride)
    _check_prune()
    if C.PREPROC.MAX_SIZE < stride:
        _fail('PREPROC.MAX_SIZE={} is smaller than the largest stride {}.'.format(
            C.PREPROC.MAX_SIZE, stride))
    if C.MODE_FPN and len(C.FPN.ANCHOR_STRIDES) != len(C.RPN.ANCHOR_SIZES):
        _fail('FPN.ANCHOR_STRIDES ({}) and RPN.ANCHOR_SIZES ({}) need one size per level.'
              .format(len(C.FPN.ANCHOR_STRIDES), len(C.RPN.ANCHOR_SIZES)))
    if not 0 < C.FRCNN.FG_RATIO <= 1 or not 0 < C.RPN.FG_RATIO <= 1:
        _fail('FRCNN.FG_RATIO and RPN.FG_RATIO must be in (0, 1].')
    if C.MRCNN.RESOLUTION % 2:
        _fail('MRCNN.RESOLUTION must be even (the head upsamples 2x).')
    if C.TRAIN.GRADIENT_ACCUMULATION < 1:
        _fail('TRAIN.GRADIENT_ACCUMULATION must be >= 1.')
    n = C.TRAIN.IMAGES_PER_DEVICE
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        _fail('TRAIN.IMAGES_PER_DEVICE must be an integer >= 1, got {!r}.'.format(n))
    if not C.DATA.TRAIN:
        _fail('DATA.TRAIN names no dataset.')


def _derive_classes(registry):
    """Class names and count from the first training set's metadata (never from code)."""
    registered = set(registry.names())
    for key in ('TRAIN', 'VAL'):
        for n in getattr(_C.DATA, key):
            if n not in registered:
                close = difflib.get_close_matches(n, sorted(registered), n=3, cutoff=0.5)
                raise ConfigError('DATA.{} names dataset "{}", which is not registered.{} '
                                  'Registered: {}.'.format(
                                      key, n, ' Did you mean: {}?'.format(', '.join(close))
                                      if close else '', ', '.join(sorted(registered))))
    name = _C.DATA.TRAIN[0]
    try:
        names = list(registry.get_metadata(name, 'class_names'))
    except Exception as e:  # unregistered dataset or missing metadata
        raise ConfigError('Cannot find the class names of dataset "{}" (DATA.TRAIN): {}'
                          .format(name, e)) from None
    _C.DATA.CLASS_NAMES = ['BG'] + names
    _C.DATA.NUM_CATEGORY = len(names)


def legacy_values(run_config_path):
    """{key: old value} for the ``LEGACY_VALUES`` keys a run's config.yaml lacks."""
    present = read_yaml_leaves(run_config_path)
    return {k: v for k, v in LEGACY_VALUES.items() if k not in present}


def prune_values(run_config_path):
    """{key: value} of the PRUNE keys a run's config.yaml sets: the layer widths its
    weights have (empty for a model that was never pruned)."""
    present = read_yaml_leaves(run_config_path, _C.mapping_keys())
    return {k: v for k, v in present.items() if k.startswith('PRUNE.') and v}


def default_data_format(num_gpus):
    """NCHW on GPU (cuDNN's native layout), NHWC on CPU (NCHW there hits slow kernels)."""
    return 'NCHW' if num_gpus > 0 else 'NHWC'


def finalize_configs(is_training, num_gpus=None, *, registry):
    """Validate, derive the dependent keys, and freeze the tree.

    Args:
        is_training (bool): training also derives the device count and scaled schedule.
        num_gpus (int or None): visible GPUs; detected with TensorFlow when None.
        registry: ``dataset.DatasetRegistry`` (passed in: config imports nothing above it),
            which knows the DATA.TRAIN / DATA.VAL names and their class names.
    Raises:
        ConfigError: naming the offending key(s).
    """
    _C.freeze(False)
    _C.__dict__['_auto_values'] = {}
    _validate()
    _derive_classes(registry)
    _C.RPN.NUM_ANCHOR = len(_C.RPN.ANCHOR_SIZES) * len(_C.RPN.ANCHOR_RATIOS)
    if _C.MODE_FPN:
        _C.RPN.NUM_ANCHOR = len(_C.RPN.ANCHOR_RATIOS)
    if num_gpus is None:
        from tensorpack.utils.gpu import get_num_gpu
        num_gpus = get_num_gpu()
    _C.TRAIN.NUM_GPUS = num_gpus
    if not _C.BACKBONE.DATA_FORMAT:
        # Saved as '' (auto): a GPU-trained model must not force NCHW on a CPU predictor.
        _C.__dict__['_auto_values'] = {'BACKBONE.DATA_FORMAT': ''}
        _C.BACKBONE.DATA_FORMAT = default_data_format(num_gpus)
    if _C.TRAIN.PRECISION == 'fp16' and num_gpus == 0:
        if is_training:
            _fail('TRAIN.PRECISION=fp16 needs a GPU; on CPU use bf16.')
        # The weights are float32 whatever the training precision: predict in float32.
        from tensorpack.utils import logger
        logger.warn('TRAIN.PRECISION=fp16 needs a GPU: predicting in fp32 on this CPU.')
        _C.TRAIN.PRECISION = 'fp32'
    if is_training and _C.BACKBONE.NORM == 'BN' and _C.TRAIN.IMAGES_PER_DEVICE < 4:
        from tensorpack.utils import logger
        logger.warn('BACKBONE.NORM=BN with TRAIN.IMAGES_PER_DEVICE={}: batch statistics of so '
                    'few images are noisy; consider SyncBN, GN or FreezeBN (README).'.format(
                        _C.TRAIN.IMAGES_PER_DEVICE))
    _C.freeze()
