"""Every config key with its default, top to bottom, and the values each choice allows.

Read this file to see what can be set (``--config KEY=VALUE`` or a YAML file). The tree
class is in ``config_tree.py``; ``config.py`` validates combinations of keys, derives the
dependent ones and freezes the tree (``finalize_configs``).
"""
from config_tree import AttrDict

# ---------------------------------------------------------------------------- allowed values
# Each tuple is the one definition used by validation (config.py) and by the code that
# acts on the key (named in brackets).
TRAINERS = ('replicated', 'horovod')                  # TRAINER (train.py)
DEPTHS = (18, 34, 50, 101)                            # BACKBONE.DEPTH (modeling/backbone.py)
# Residual blocks of res2..res5 (group0..group3) for each of DEPTHS.
BLOCKS_FOR_DEPTH = dict(zip(DEPTHS, ([2, 2, 2, 2], [3, 4, 6, 3], [3, 4, 6, 3], [3, 4, 23, 3])))
NORMS = ('FreezeBN', 'BN', 'SyncBN', 'GN', 'None')    # BACKBONE.NORM (modeling/backbone.py)
FPN_NORMS = ('None', 'GN')                            # FPN.NORM (modeling/model_fpn.py)
FREEZE_AT = (0, 1, 2)                                 # BACKBONE.FREEZE_AT
TRAINABLE_LAYERS = ('all', '3+', '4+', '5+', 'heads')  # BACKBONE.TRAINABLE (backbone.py)
DATA_FORMATS = ('', 'NHWC', 'NCHW')                   # BACKBONE.DATA_FORMAT ('' = auto)
PRECISIONS = ('fp32', 'bf16', 'fp16')                 # TRAIN.PRECISION (utils/precision.py)
IMAGE_CHANNELS = (1, 3, 4)                            # PREPROC.IMAGE_CHANNELS (common.py)
CHANNEL_ORDERS = ('BGR', 'RGB')                       # PREPROC.CHANNEL_ORDER (common.py)
PROPOSAL_MODES = ('Level', 'Joint')                   # FPN.PROPOSAL_MODE (model_fpn.py)
MASK_PASTE_MODES = ('zeros', 'edge')                  # TEST.MASK_PASTE (eval.py)
# FPN.FRCNN_HEAD_FUNC / FPN.MRCNN_HEAD_FUNC: functions of modeling/model_frcnn.py and
# modeling/model_mrcnn.py, looked up by these names (their HEAD_FUNCS tables).
FRCNN_HEAD_FUNCS = ('fastrcnn_2fc_head', 'fastrcnn_4conv1fc_head', 'fastrcnn_4conv1fc_gn_head')
MRCNN_HEAD_FUNCS = ('maskrcnn_up4conv_head', 'maskrcnn_up4conv_gn_head')
# PREPROC.AUGMENTATIONS: the augmentors of augment.py by name, with every parameter each
# takes and its default (None: from the older PREPROC key named in augment.py).
AUGMENTORS = {
    'ResizeShortestEdge': {'sizes': None, 'max_size': None},  # TRAIN_SHORT_EDGE_SIZE, MAX_SIZE
    'HorizontalFlip': {'prob': None},       # 0.5 if PREPROC.HORIZONTAL_FLIP else 0
    'VerticalFlip': {'prob': 0.5},
    'Rotate90': {'prob': 0.75},             # k x 90 degrees, k uniform in 1..3 when applied
    'RandomCrop': {'size': None},           # PREPROC.CROP_SIZE (0: off)
    'LargeScaleJitter': {'size': 1024, 'min_scale': 0.1, 'max_scale': 2.0},
    'ColorJitter': {'brightness': 0.3, 'contrast': 0.3, 'saturation': 0.3, 'hue': 0.02},
    'CopyPaste': {'prob': 0.5, 'drop_covered': 0.95},
}

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
_C.BACKBONE.NORM = 'FreezeBN'  # 'FreezeBN', 'BN', 'SyncBN', 'GN' or 'None' (README: choosing)
_C.BACKBONE.FREEZE_AT = 2   # 0: train everything; 1: freeze the stem; 2: also freeze res2
# Which layers train (a memory knob): 'all', '3+', '4+', '5+' (backbone stages from
# res3/res4/res5 on, plus all heads) or 'heads' (no backbone layer trains).
_C.BACKBONE.TRAINABLE = 'all'
_C.BACKBONE.STRIDE_1X1 = False  # stride in the 1x1 conv of a bottleneck (Caffe-style weights)
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
# L1 penalty on every trained norm layer's gamma (network slimming, Liu et al. 2017): drives
# the scale of channels the model does not need towards 0, so `prune.py --criterion gamma`
# removes them with little loss. 0: off.
_C.TRAIN.NORM_L1 = 0.
_C.TRAIN.GRADIENT_ACCUMULATION = 1  # updates every k steps, so few devices match the batch
# Images per device per step (an int >= 1): the data pipeline pads a group of images of
# similar aspect ratio into one [N, H, W, C] batch; losses are per image, then averaged.
_C.TRAIN.IMAGES_PER_DEVICE = 1
_C.TRAIN.STEPS_PER_EPOCH = 500
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
# Training augmentation, applied in this order to the image, boxes, masks and crowd regions:
# names of AUGMENTORS (above), each alone or as [name, {param: value}], e.g.
# ['ResizeShortestEdge', 'HorizontalFlip', ['LargeScaleJitter', {'size': 512}], 'CopyPaste'].
# The default is the recipe of the three keys above (README.md, "Augmentation").
_C.PREPROC.AUGMENTATIONS = ['ResizeShortestEdge', 'HorizontalFlip', 'RandomCrop']

# ---------------------------------------------------------------------------- RPN
_C.RPN.ANCHOR_STRIDE = 16       # C4 only
_C.RPN.ANCHOR_SIZES = (32, 64, 128, 256, 512)
_C.RPN.ANCHOR_RATIOS = (0.5, 1., 2.)
# Anchors of feature cell (y, x) are centred at ((x + OFFSET) * stride, (y + OFFSET) * stride):
# 0 is tensorpack's and detectron2's layout (model-zoo weights need it); 0.5 is the layout of
# runs saved before this key existed.
_C.RPN.ANCHOR_OFFSET = 0.
# Anchor labels: IoU >= POSITIVE with some gt is foreground, < NEGATIVE with all is
# background; BATCH_PER_IM labels are sampled per image, at most FG_RATIO foreground.
_C.RPN.POSITIVE_ANCHOR_THRESH = 0.7
_C.RPN.NEGATIVE_ANCHOR_THRESH = 0.3
_C.RPN.FG_RATIO = 0.5
_C.RPN.BATCH_PER_IM = 256
_C.RPN.MIN_SIZE = 0.            # proposals keep width and height > this (pixels)
# True (detectron2): proposals of width or height <= MIN_SIZE are always dropped, zero-size
# ones (clipped away) included. False: only when MIN_SIZE > 0 (tensorpack).
_C.RPN.DROP_EMPTY_PROPOSALS = True
_C.RPN.PROPOSAL_NMS_THRESH = 0.7  # NMS IoU among proposals
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
_C.MRCNN.RESOLUTION = 28        # FPN output masks are RESOLUTION^2 (even; C4 masks are 14^2)
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

# ---------------------------------------------------------------------------- pruning
# Written by prune.py into a pruned model's config.yaml; the model builders read them
# (modeling/widths.py). CHANNELS: {layer name: output channels}, e.g.
# {'group1/block0/conv1': 96, 'fpn/lateral_1x1_c2': 48}; a layer not named keeps the width
# its own key gives (FPN.NUM_CHANNEL, ...). GN_GROUPS: {GroupNorm layer name: groups}, e.g.
# {'fpn/gn_c2': 24}, where pruning left a count the default 32 groups do not divide.
_C.PRUNE.CHANNELS = {}
_C.PRUNE.GN_GROUPS = {}
# Residual blocks whose branch prune.py removed (--drop-blocks), e.g. ['group3/block1']:
# the block computes relu(shortcut + beta), beta being its last norm layer's shift, which is
# what the branch added on average (exactly, when that norm's gamma is 0).
_C.PRUNE.DROPPED_BLOCKS = []

# Keys added with a new default behaviour, and the behaviour the code had before them. A
# run's config.yaml (a full dump) that lacks one was trained and evaluated that old way.
LEGACY_VALUES = {'RPN.ANCHOR_OFFSET': 0.5, 'BACKBONE.C4_PAD_INPUT': True,
                 'FRCNN.DECODE_CLIP_SIZE': 1000., 'TEST.MASK_PASTE': 'edge'}
# Removed keys that the config.yaml of an older run may still hold: accepted (and ignored)
# only with the value they always had.
RETIRED_KEYS = {
    'TRAIN.STARTING_EPOCH': (1, 'never read: resuming derives the epoch from the checkpoint'),
    'BACKBONE.TF_PAD_MODE': (False, 'the backbone always pads as tensorpack\'s default'),
}
_C.seal(RETIRED_KEYS)  # the defaults are declared: from here on only existing keys can be set
