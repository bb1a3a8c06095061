"""The configuration tree: defaults, command-line overrides, validation.

Everything tunable lives in the global ``config`` (alias ``cfg``). Entry scripts call
``config.update_args(['KEY=VALUE', ...])`` (after an optional ``load_yaml``), then
``finalize_configs(is_training)``, which validates, derives and freezes the tree.
Values are Python literals parsed with ``ast.literal_eval``; a bare word is a string.
"""
import ast
import difflib
import os
import pprint

import yaml

__all__ = ['config', 'cfg', 'finalize_configs', 'ConfigError', 'legacy_values']


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key."""


class AttrDict:
    """A tree of attributes.

    While the defaults are declared, reading a missing attribute creates a sub-tree.
    ``seal()`` ends that: afterwards reading or writing an unknown attribute raises
    ``AttributeError`` naming the closest keys. ``freeze()`` (done by ``finalize_configs``)
    also refuses writes to known keys.
    """

    _sealed = False
    _frozen = False

    def __getattr__(self, name):
        if self._sealed or name.startswith('_'):
            raise AttributeError(self._unknown_message(name))
        ret = AttrDict()
        setattr(self, name, ret)
        return ret

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError('Config is frozen after finalize_configs(); cannot set '
                                 '"{}".'.format(name))
        if self._sealed and name not in self.__dict__:
            raise AttributeError(self._unknown_message(name))
        super().__setattr__(name, value)

    def _unknown_message(self, name):
        close = difflib.get_close_matches(name, list(self.__dict__), n=3, cutoff=0.5)
        hint = ' Did you mean: {}?'.format(', '.join(close)) if close else ''
        return 'Config has no key "{}".{}'.format(name, hint)

    def __str__(self):
        return pprint.pformat(self.to_dict(), width=100, compact=True)

    __repr__ = __str__

    def to_dict(self):
        """A nested plain dict (tuples become lists), e.g. for YAML."""
        def conv(v):
            if isinstance(v, AttrDict):
                return v.to_dict()
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            return v
        return {k: conv(v) for k, v in self.__dict__.items() if not k.startswith('_')}

    def flat_keys(self, prefix=''):
        """All leaf keys as dotted names, e.g. ``['DATA.BASEDIR', ...]``."""
        keys = []
        for k, v in self.__dict__.items():
            if k.startswith('_'):
                continue
            if isinstance(v, AttrDict):
                keys.extend(v.flat_keys(prefix + k + '.'))
            else:
                keys.append(prefix + k)
        return keys

    def _set_flag(self, flag, value):
        self.__dict__[flag] = value
        for v in self.__dict__.values():
            if isinstance(v, AttrDict):
                v._set_flag(flag, value)

    def seal(self):
        """No new keys from now on."""
        self._set_flag('_sealed', True)

    def freeze(self, frozen=True):
        """No writes at all (``frozen=False`` lifts it, e.g. between tests)."""
        self._set_flag('_frozen', frozen)

    def is_frozen(self):
        return self._frozen

    def _lookup(self, key):
        """Return (parent AttrDict, leaf name) of a dotted key, or raise ConfigError."""
        known = self.flat_keys()
        if key not in known:
            leaf = key.split('.')[-1]  # a right key in the wrong group, e.g. RESULTS_PER_IM
            close = [k for k in known if k.split('.')[-1] == leaf][:3]
            close = close or difflib.get_close_matches(key, known, n=3, cutoff=0.6) or \
                difflib.get_close_matches(key, known, n=3, cutoff=0.)
            hint = ' Closest known keys: {}.'.format(', '.join(close))
            raise ConfigError('Unknown config key "{}".{}'.format(key, hint))
        *parents, leaf = key.split('.')
        node = self
        for p in parents:
            node = node.__dict__[p]
        return node, leaf

    def set_value(self, key, value):
        """Set a dotted key to a value, checking it against the default's type."""
        if self._frozen:
            raise ConfigError('Config is frozen; cannot set "{}".'.format(key))
        node, leaf = self._lookup(key)
        node.__dict__[leaf] = _check_type(key, node.__dict__[leaf], value)

    def update_args(self, args):
        """Apply ``['KEY=VALUE', ...]`` overrides from the command line."""
        for arg in args:
            if '=' not in arg:
                raise ConfigError('Config override "{}" is not of the form KEY=VALUE.'.format(arg))
            key, _, text = arg.partition('=')
            self.set_value(key.strip(), parse_value(text.strip()))

    def load_yaml(self, path):
        """Apply every leaf of a YAML file (as written by ``save_yaml``)."""
        for key, value in read_yaml_leaves(path).items():
            self.set_value(key, value)

    def save_yaml(self, path):
        """Write every leaf; keys derived from this machine are written as 'auto'."""
        tree = self.to_dict()
        for key, value in self.__dict__.get('_auto_values', {}).items():
            *parents, leaf = key.split('.')
            node = tree
            for p in parents:
                node = node[p]
            node[leaf] = value
        with open(path, 'w') as f:
            yaml.safe_dump(tree, f, default_flow_style=None, sort_keys=False)


def read_yaml_leaves(path):
    """A YAML config file -> {dotted key: value} of its leaves (ConfigError if unreadable)."""
    if not os.path.isfile(path):
        raise ConfigError('Config file "{}" does not exist.'.format(path))
    with open(path) as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError('Config file "{}" is not valid YAML: {}'.format(
                path, str(e).replace('\n', ' '))) from None
    if not isinstance(tree, dict):
        raise ConfigError('Config file "{}" must hold a mapping.'.format(path))
    leaves = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + str(k) + '.')
            else:
                leaves[prefix + str(k)] = v
    walk(tree, '')
    return leaves


# Keys added with a new default behaviour, and the behaviour the code had before them. A
# run's config.yaml (a full dump) that lacks one was trained and evaluated that old way.
LEGACY_VALUES = {'RPN.ANCHOR_OFFSET': 0.5, 'BACKBONE.C4_PAD_INPUT': True,
                 'FRCNN.DECODE_CLIP_SIZE': 1000., 'TEST.MASK_PASTE': 'edge'}


def legacy_values(run_config_path):
    """{key: old value} for the ``LEGACY_VALUES`` keys a run's config.yaml lacks."""
    present = read_yaml_leaves(run_config_path)
    return {k: v for k, v in LEGACY_VALUES.items() if k not in present}


def parse_value(text):
    """A Python literal if ``text`` parses as one, else the text itself (a bare word)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_type(key, default, value):
    """Coerce ``value`` to the type of ``default`` where that is lossless, else raise."""
    if default is None:
        return value
    if value is None and isinstance(default, str):
        return 'None'  # e.g. BACKBONE.NORM=None: the literal parses as Python's None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
        if isinstance(value, str):  # a bare word for a one-item list, e.g. DATA.VAL=balloon_val
            return type(default)([value])
    else:
        return value
    raise ConfigError('Config key "{}" expects a {} (like {!r}), got {} {!r}.'.format(
        key, type(default).__name__, default, type(value).__name__, value))


config = AttrDict()
_C = config

# ---------------------------------------------------------------------------- mode
_C.MODE_MASK = True         # Mask R-CNN (True) or Faster R-CNN (False)
_C.MODE_FPN = True          # FPN backbone (True) or C4 with a res5 RoI head (False)
# 'replicated': one device when at most one GPU (CPU included), else in-graph replication;
# 'horovod': one process per device, launched by horovodrun.
_C.TRAINER = 'replicated'

# ---------------------------------------------------------------------------- data
_C.DATA.BASEDIR = '/path/to/your/DATA/DIR'
# Registered dataset names (see dataset/); several are concatenated for training.
_C.DATA.TRAIN = ('coco_train2017',)
_C.DATA.VAL = ('coco_val2017',)
# Your own COCO-format data without code: [name, json file, image folder] per split, e.g.
# [['mine_train', '~/mine/train.json', '~/mine/images'], ['mine_val', ...]]; then name them
# in DATA.TRAIN / DATA.VAL. Saved in the run's config.yaml, so predict.py finds them too.
_C.DATA.COCO_JSON_SPLITS = []
_C.DATA.NUM_CATEGORY = -1   # derived from the first training set's "class_names" metadata
_C.DATA.CLASS_NAMES = []    # derived likewise; background is prepended as index 0
# A COCO_JSON_SPLITS category that no training annotation uses (Roboflow's parent class,
# labelme's _background_) is logged; True leaves it out of the classes of every json split.
_C.DATA.DROP_UNUSED_CATEGORIES = True
_C.DATA.FILTER_EMPTY_ANNOTATIONS = True
_C.DATA.NUM_WORKERS = 4     # data worker processes; 0 runs the pipeline in the main process
_C.DATA.MAX_GT_INSTANCES = 0  # >0: a random subset of this many instances per image (logged)

# ---------------------------------------------------------------------------- backbone
_C.BACKBONE.WEIGHTS = ''    # .npz / checkpoint to start from when train.py has no --load
_C.BACKBONE.DEPTH = 50      # ResNet depth: 18 or 34 (basic blocks), 50 or 101 (bottleneck)
_C.BACKBONE.NORM = 'FreezeBN'  # 'FreezeBN', 'SyncBN', 'GN' or 'None'
_C.BACKBONE.FREEZE_AT = 2   # 0: train everything; 1: freeze the stem; 2: also freeze res2
# Which layers train (seed 000's memory knob): 'all', '3+', '4+', '5+' (backbone stages from
# res3/res4/res5 on, plus all heads) or 'heads' (no backbone layer trains).
_C.BACKBONE.TRAINABLE = 'all'
_C.BACKBONE.STRIDE_1X1 = False  # stride in the 1x1 conv of a bottleneck (Caffe-style weights)
_C.BACKBONE.TF_PAD_MODE = False
_C.BACKBONE.DATA_FORMAT = ''  # 'NHWC' or 'NCHW'; '' = NCHW on GPU, NHWC on CPU
# C4 only. False (tensorpack): the image is not padded; a stride-2 shortcut drops an odd last
# row/column, so res4 is floor(H / 16) x floor(W / 16). True: padded to a multiple of 16
# first (res4 ceil(H / 16)), the layout of runs saved before this key existed.
_C.BACKBONE.C4_PAD_INPUT = False

# ---------------------------------------------------------------------------- training
# The schedule below is the standard COCO 1x recipe, defined for a TOTAL batch of
# TRAIN.REFERENCE_BATCH = 16 images (8 GPUs x 2 images, as in Detectron). With a total batch
# B = devices x images per device x TRAIN.GRADIENT_ACCUMULATION, the learning rate is scaled by
# B / 16 and every step count (warm-up, LR_SCHEDULE) by 16 / B (the linear scaling rule).
_C.TRAIN.REFERENCE_BATCH = 16
_C.TRAIN.BASE_LR = 0.02
_C.TRAIN.WARMUP = 1000          # linear warm-up steps (at the reference batch)
_C.TRAIN.WARMUP_INIT_LR = 0.02 / 3  # LR at step 0 (at the reference batch)
_C.TRAIN.LR_SCHEDULE = (60000, 80000, 90000)  # decay x0.1 at the first two; stop at the last
_C.TRAIN.MOMENTUM = 0.9
_C.TRAIN.WEIGHT_DECAY = 1e-4
_C.TRAIN.GRADIENT_ACCUMULATION = 1  # updates every k steps, so few devices match the batch
_C.TRAIN.STEPS_PER_EPOCH = 500
_C.TRAIN.STARTING_EPOCH = 1     # set automatically when resuming
_C.TRAIN.CHECKPOINT_PERIOD = 20  # epochs
_C.TRAIN.EVAL_PERIOD = 50       # epochs; 0 disables evaluation during training
_C.TRAIN.NUM_GPUS = -1          # derived
_C.TRAIN.PRECISION = 'fp32'     # 'fp32'; 'bf16' (CPU, oneDNN AMX) or 'fp16' (GPU, loss scaling)
_C.TRAIN.SEED = 42

# ---------------------------------------------------------------------------- preprocessing
_C.PREPROC.TRAIN_SHORT_EDGE_SIZE = [800, 800]  # [min, max] of the random short edge
_C.PREPROC.TEST_SHORT_EDGE_SIZE = 800
_C.PREPROC.MAX_SIZE = 1333
# Channels and their order as the MODEL sees them. Images are always read with cv2 (BGR);
# the reader converts to this order so training, evaluation and prediction agree.
_C.PREPROC.IMAGE_CHANNELS = 3           # 1 grayscale, 3 colour, 4 colour + depth
_C.PREPROC.CHANNEL_ORDER = 'BGR'        # for 3/4 channels: 'BGR' or 'RGB' (+ 'D' implied)
_C.PREPROC.PIXEL_MEAN = [103.53, 116.28, 123.675]  # in CHANNEL_ORDER
_C.PREPROC.PIXEL_STD = [57.375, 57.12, 58.395]
_C.PREPROC.CROP_SIZE = 0        # >0: train on random CROP_SIZE x CROP_SIZE crops after resize
_C.PREPROC.HORIZONTAL_FLIP = True
_C.PREPROC.RESIZE_UINT8 = False  # True: round to uint8 before resizing, as tensorpack does

# ---------------------------------------------------------------------------- RPN
_C.RPN.ANCHOR_STRIDE = 16       # C4 only
_C.RPN.ANCHOR_SIZES = (32, 64, 128, 256, 512)
_C.RPN.ANCHOR_RATIOS = (0.5, 1., 2.)
# Anchors of feature cell (y, x) are centred at ((x + OFFSET) * stride, (y + OFFSET) * stride):
# 0 is tensorpack's and detectron2's layout (model-zoo weights need it); 0.5 is the layout of
# runs saved before this key existed.
_C.RPN.ANCHOR_OFFSET = 0.
_C.RPN.POSITIVE_ANCHOR_THRESH = 0.7
_C.RPN.NEGATIVE_ANCHOR_THRESH = 0.3
_C.RPN.FG_RATIO = 0.5
_C.RPN.BATCH_PER_IM = 256
_C.RPN.MIN_SIZE = 0.
# True (detectron2): proposals of width or height <= MIN_SIZE are always dropped, zero-size
# ones (clipped away) included. False: only when MIN_SIZE > 0 (tensorpack).
_C.RPN.DROP_EMPTY_PROPOSALS = True
_C.RPN.PROPOSAL_NMS_THRESH = 0.7
# Anchors covered by a crowd box over more than this fraction of their area are ignored
# (e.g. 0.7). Above 1 (the default, as Detectron, Detectron2 and tensorpack): off, crowd
# regions count as background for the RPN.
_C.RPN.CROWD_OVERLAP_THRESH = 9.99
_C.RPN.HEAD_DIM = 1024          # C4 RPN conv channels (FPN uses FPN.NUM_CHANNEL)
# C4: top-k before and after NMS; FPN: PER_LEVEL_NMS_TOPK per level, then POST_NMS_TOPK.
_C.RPN.TRAIN_PRE_NMS_TOPK = 12000
_C.RPN.TRAIN_POST_NMS_TOPK = 2000
_C.RPN.TEST_PRE_NMS_TOPK = 6000
_C.RPN.TEST_POST_NMS_TOPK = 1000
_C.RPN.TRAIN_PER_LEVEL_NMS_TOPK = 2000
_C.RPN.TEST_PER_LEVEL_NMS_TOPK = 1000
_C.RPN.NUM_ANCHOR = -1          # derived

# ---------------------------------------------------------------------------- Fast R-CNN
_C.FRCNN.BATCH_PER_IM = 512
_C.FRCNN.BBOX_REG_WEIGHTS = [10., 10., 5., 5.]
# Every box decode (RPN, heads) clips dw, dh at log(X / 16): X = this, or PREPROC.MAX_SIZE
# when 0 (tensorpack). 1000. is detectron2's and runs' saved before this key existed.
_C.FRCNN.DECODE_CLIP_SIZE = 0.
_C.FRCNN.FG_THRESH = 0.5
_C.FRCNN.FG_RATIO = 0.25

# ---------------------------------------------------------------------------- FPN
_C.FPN.ANCHOR_STRIDES = (4, 8, 16, 32, 64)  # P2..P6
_C.FPN.PROPOSAL_MODE = 'Level'  # 'Level': NMS per level then merge; 'Joint': NMS over all
_C.FPN.NUM_CHANNEL = 256
_C.FPN.NORM = 'None'            # 'None' or 'GN'
_C.FPN.FRCNN_HEAD_FUNC = 'fastrcnn_2fc_head'  # or 'fastrcnn_4conv1fc_head', '..._gn_head'
_C.FPN.FRCNN_CONV_HEAD_DIM = 256
_C.FPN.FRCNN_FC_HEAD_DIM = 1024
_C.FPN.MRCNN_HEAD_FUNC = 'maskrcnn_up4conv_head'  # or 'maskrcnn_up4conv_gn_head'

# ---------------------------------------------------------------------------- Mask R-CNN
_C.MRCNN.HEAD_DIM = 256
_C.MRCNN.RESOLUTION = 28        # output masks are RESOLUTION x RESOLUTION
# Ground-truth masks travel as one GT_MASK_SIZE^2 bitmap per instance in its own box frame,
# not as full-image masks: memory per image stays linear in instances and independent of
# the image size (dense scenes).
_C.MRCNN.GT_MASK_SIZE = 112

# ---------------------------------------------------------------------------- Cascade R-CNN
_C.CASCADE.ENABLED = False      # needs MODE_FPN
_C.CASCADE.IOUS = [0.5, 0.6, 0.7]
_C.CASCADE.BBOX_REG_WEIGHTS = [[10., 10., 5., 5.], [20., 20., 10., 10.], [30., 30., 15., 15.]]

# ---------------------------------------------------------------------------- test time
_C.TEST.FRCNN_NMS_THRESH = 0.5
_C.TEST.RESULT_SCORE_THRESH = 0.05
_C.TEST.RESULT_SCORE_THRESH_VIS = 0.5  # only for drawing
_C.TEST.RESULTS_PER_IM = 100
# Boxes back to the original image: per axis (detectron2) or one isotropic sqrt(sy * sx)
# (tensorpack), which differ by the rounding of the resized size.
_C.TEST.ISOTROPIC_SCALE_BACK = False
# Mask pasting, bilinear at pixel centres: 'zeros' (tensorpack's accurate paste, detectron2):
# the mask fades to 0 beyond its outer cell centres; 'edge': the edge cells extend to the box
# edges (runs saved before this key existed).
_C.TEST.MASK_PASTE = 'zeros'

_C.seal()  # the defaults are declared: from here on only existing keys can be set
cfg = config

_NORMS = ('FreezeBN', 'SyncBN', 'GN', 'None')
_TRAINABLE = ('all', '3+', '4+', '5+', 'heads')


def _fail(msg):
    raise ConfigError(msg)


def _validate():
    """Check combinations of keys; every message names the keys involved."""
    C = _C
    if C.BACKBONE.DEPTH not in (18, 34, 50, 101):
        _fail('BACKBONE.DEPTH must be 18, 34, 50 or 101, got {}.'.format(C.BACKBONE.DEPTH))
    if C.BACKBONE.NORM not in _NORMS:
        _fail('BACKBONE.NORM must be one of {}, got "{}".'.format(_NORMS, C.BACKBONE.NORM))
    if C.BACKBONE.FREEZE_AT not in (0, 1, 2):
        _fail('BACKBONE.FREEZE_AT must be 0, 1 or 2, got {}.'.format(C.BACKBONE.FREEZE_AT))
    if C.BACKBONE.TRAINABLE not in _TRAINABLE:
        _fail('BACKBONE.TRAINABLE must be one of {}, got "{}".'.format(
            _TRAINABLE, C.BACKBONE.TRAINABLE))
    if C.BACKBONE.DATA_FORMAT not in ('', 'NHWC', 'NCHW'):
        _fail('BACKBONE.DATA_FORMAT must be "", "NHWC" or "NCHW".')
    if C.FPN.NORM not in ('None', 'GN'):
        _fail('FPN.NORM must be "None" or "GN", got "{}".'.format(C.FPN.NORM))
    if C.FPN.PROPOSAL_MODE not in ('Level', 'Joint'):
        _fail('FPN.PROPOSAL_MODE must be "Level" or "Joint".')
    if C.TRAINER not in ('replicated', 'horovod'):
        _fail('TRAINER must be "replicated" or "horovod", got "{}".'.format(C.TRAINER))
    if C.TRAIN.PRECISION not in ('fp32', 'bf16', 'fp16'):
        _fail('TRAIN.PRECISION must be "fp32", "bf16" or "fp16".')
    if C.CASCADE.ENABLED and not C.MODE_FPN:
        _fail('CASCADE.ENABLED=True needs MODE_FPN=True (the cascade heads are FPN heads).')
    if not 0 <= C.RPN.ANCHOR_OFFSET < 1:
        _fail('RPN.ANCHOR_OFFSET must be in [0, 1) (fraction of a stride), got {}.'.format(
            C.RPN.ANCHOR_OFFSET))
    if C.FRCNN.DECODE_CLIP_SIZE < 0:
        _fail('FRCNN.DECODE_CLIP_SIZE must be >= 0 (0: PREPROC.MAX_SIZE).')
    if C.TEST.MASK_PASTE not in ('zeros', 'edge'):
        _fail('TEST.MASK_PASTE must be "zeros" or "edge", got "{}".'.format(C.TEST.MASK_PASTE))
    if C.PREPROC.RESIZE_UINT8 and C.PREPROC.IMAGE_CHANNELS == 4:
        _fail('PREPROC.RESIZE_UINT8=True would round the 4th (depth) channel: use False.')
    if len(C.CASCADE.IOUS) != len(C.CASCADE.BBOX_REG_WEIGHTS):
        _fail('CASCADE.IOUS and CASCADE.BBOX_REG_WEIGHTS must have the same length.')

    nch = C.PREPROC.IMAGE_CHANNELS
    if nch not in (1, 3, 4):
        _fail('PREPROC.IMAGE_CHANNELS must be 1, 3 or 4, got {}.'.format(nch))
    for key in ('PIXEL_MEAN', 'PIXEL_STD'):
        if len(getattr(C.PREPROC, key)) != nch:
            _fail('PREPROC.{} has {} values but PREPROC.IMAGE_CHANNELS={}: give one per '
                  'channel.'.format(key, len(getattr(C.PREPROC, key)), nch))
    if min(C.PREPROC.PIXEL_STD) <= 0:
        _fail('PREPROC.PIXEL_STD values must be positive.')
    if C.PREPROC.CHANNEL_ORDER not in ('BGR', 'RGB'):
        _fail('PREPROC.CHANNEL_ORDER must be "BGR" or "RGB".')

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
    if not C.DATA.TRAIN:
        _fail('DATA.TRAIN names no dataset.')


def _derive_classes():
    """Class names and count from the first training set's metadata (never from code)."""
    from dataset import DatasetRegistry
    registered = set(DatasetRegistry.names())
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
        names = list(DatasetRegistry.get_metadata(name, 'class_names'))
    except Exception as e:  # unregistered dataset or missing metadata
        raise ConfigError('Cannot find the class names of dataset "{}" (DATA.TRAIN): {}'
                          .format(name, e)) from None
    _C.DATA.CLASS_NAMES = ['BG'] + names
    _C.DATA.NUM_CATEGORY = len(names)


def default_data_format(num_gpus):
    """NCHW on GPU (cuDNN's native layout), NHWC on CPU (NCHW there hits slow kernels)."""
    return 'NCHW' if num_gpus > 0 else 'NHWC'


def finalize_configs(is_training, num_gpus=None):
    """Validate, derive the dependent keys, and freeze the tree.

    Args:
        is_training (bool): training also derives the device count and scaled schedule.
        num_gpus (int or None): visible GPUs; detected with TensorFlow when None.
    Raises:
        ConfigError: naming the offending key(s).
    """
    _C.freeze(False)
    _C.__dict__['_auto_values'] = {}
    _validate()
    _derive_classes()
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
    _C.freeze()


def total_batch_size(num_workers):
    """Images per optimizer update: devices (or Horovod ranks) x 1 image x accumulation."""
    return max(num_workers, 1) * _C.TRAIN.GRADIENT_ACCUMULATION
