"""The prunable channels of the configured model, as prune.py (pruning.py) needs them.

A *channel space* is one set of feature channels: the output channels of its producer
layers, which must stay identical because their outputs are added (a residual group: every
block's last conv, the shortcut conv and, in ResNet-18/34, the stem; the FPN laterals,
summed top-down; the FPN outputs, all read by one shared RPN and RoI heads), the
normalisation layers on them, and the consumer layers that read them as input channels.
Layers that only consume (the RPN's and the heads' class / box outputs, the mask
predictor ``maskrcnn/conv``) are never pruned. A dropped residual block
(PRUNE.DROPPED_BLOCKS) has no convs left in its branch; the beta it adds is a norm of its
residual space.

Layer names are variable scopes as in the checkpoint (modeling/*.py; DESIGN.md "Variable
names"). For FLOPs every layer also gets its output positions per image at the test size:
PREPROC.TEST_SHORT_EDGE_SIZE x PREPROC.MAX_SIZE, padded as the model pads, with
RPN.TEST_POST_NMS_TOPK RoIs in the box head and TEST.RESULTS_PER_IM in the mask head.
"""
import math
from collections import namedtuple

from config import config as cfg
from utils.graph_inputs import image_pad_multiple

from .backbone import dropped_block_shift, num_blocks_for_depth

__all__ = ['ChannelSpace', 'channel_spaces', 'layer_stage', 'STAGES']

# Stages of the summary table, in order; ``layer_stage`` maps a layer name to one.
STAGES = ('stem', 'res2', 'res3', 'res4', 'res5', 'fpn', 'rpn', 'box head', 'mask head')


class ChannelSpace(namedtuple('ChannelSpace', 'producers norms consumers')):
    """One set of channels.

    Attributes:
        producers: layer names whose output channels these are (weights ``<name>/W`` on the
            output axis, and every 1-D variable under ``<name>/``: bias, BN, GN).
        norms: names of separate normalisation layers on these channels (``fpn/gn_c2``,
            ``fastrcnn/gn0``): every variable under them is sliced.
        consumers: layer names reading these channels as their input channels.
    """


class _Builder:
    """Collects spaces and each layer's output positions while walking the architecture."""

    def __init__(self):
        self.spaces, self.cells = [], {}
        self.height = cfg.PREPROC.TEST_SHORT_EDGE_SIZE
        self.width = cfg.PREPROC.MAX_SIZE
        mult = image_pad_multiple(cfg.MODE_FPN, cfg.BACKBONE.C4_PAD_INPUT)
        if mult > 1:
            self.height = int(math.ceil(self.height / mult) * mult)
            self.width = int(math.ceil(self.width / mult) * mult)

    def at_stride(self, stride):
        return math.ceil(self.height / stride) * math.ceil(self.width / stride)

    def space(self, producers, consumers=(), norms=()):
        """A new space; returns it so consumers can be appended."""
        s = ChannelSpace(list(producers), list(norms), list(consumers))
        self.spaces.append(s)
        return s

    def chain(self, names, space, cells, norms=None):
        """Layers in sequence reading ``space``; returns the last one's space. ``norms``:
        a GroupNorm name per layer (None: the norm, if any, is under the layer itself)."""
        for k, name in enumerate(names):
            space.consumers.append(name)
            self.cells[name] = cells[k] if isinstance(cells, list) else cells
            space = self.space([name], norms=[norms[k]] if norms and norms[k] else ())
        return space


def _resnet_groups(b, space, groups, first_group=0, roi_count=None):
    """Residual groups ``group{first_group}...`` reading ``space``; returns their output
    spaces. ``roi_count``: C4's res5 runs on that many 14 x 14 RoIs instead of the image."""
    bottleneck = cfg.BACKBONE.DEPTH >= 50
    num_blocks = num_blocks_for_depth(cfg.BACKBONE.DEPTH)
    outputs = []
    for g in range(first_group, first_group + groups):
        if roi_count is None:
            out_cells, in_cells = b.at_stride(4 * 2 ** g), b.at_stride(2 * 2 ** g)
        else:
            out_cells, in_cells = 49 * roi_count, 196 * roi_count
        for i in range(num_blocks[g]):
            block = 'group{}/block{}'.format(g, i)
            strided = i == 0 and (g > 0 or roi_count is not None)
            if block in cfg.PRUNE.DROPPED_BLOCKS:  # adds only its last norm's beta
                ends, norms = [], [dropped_block_shift(block)]
            else:
                ends, norms = [_block_branch(b, space, block, strided, bottleneck,
                                             (in_cells, out_cells))], []
            if i == 0 and (strided or bottleneck):  # a 1x1 conv shortcut
                shortcut = block + '/convshortcut'
                space.consumers.append(shortcut)
                b.cells[shortcut] = out_cells
                space = b.space(ends + [shortcut], norms=norms)
            else:  # identity: the block adds its output to its input's channels
                space.producers.extend(ends)
                space.norms.extend(norms)
        outputs.append(space)
    return outputs


def _block_branch(b, space, block, strided, bottleneck, cells):
    """The convs of a residual branch reading ``space``; returns the last one's name.
    ``cells``: (input, output) positions of the block."""
    convs = [block + '/conv{}'.format(k) for k in range(1, 4 if bottleneck else 3)]
    conv_cells = [cells[1]] * len(convs)
    if strided and bottleneck and not cfg.BACKBONE.STRIDE_1X1:
        conv_cells[0] = cells[0]  # the stride sits in the 3x3 conv
    inner = b.chain(convs[:-1], space, conv_cells[:-1])
    inner.consumers.append(convs[-1])
    b.cells[convs[-1]] = cells[1]
    return convs[-1]


def _box_head_spaces(b, features, prefix):
    """The box head ``prefix`` (fastrcnn, cascade_rcnn_stage<k>/head) on the RoI features."""
    rois = cfg.RPN.TEST_POST_NMS_TOPK
    if cfg.FPN.FRCNN_HEAD_FUNC == 'fastrcnn_2fc_head':
        names, norms = [prefix + '/fc6', prefix + '/fc7'], None
        cells = rois
    else:
        names = [prefix + '/conv{}'.format(k) for k in range(4)] + [prefix + '/fc']
        gn = cfg.FPN.FRCNN_HEAD_FUNC.endswith('_gn_head')
        norms = [prefix + '/gn{}'.format(k) for k in range(4)] + [None] if gn else None
        cells = [49 * rois] * 4 + [rois]
    out = b.chain(names, features, cells, norms)
    outputs = prefix.replace('/head', '/outputs') if '/head' in prefix else prefix + '/outputs'
    for name in (outputs + '/class', outputs + '/box'):
        out.consumers.append(name)
        b.cells[name] = rois


def _mask_head_spaces(b, features, num_convs):
    """The mask head (``maskrcnn``) on RoI features of MRCNN.RESOLUTION / 2 cells."""
    dets = cfg.TEST.RESULTS_PER_IM
    res = cfg.MRCNN.RESOLUTION if cfg.MODE_FPN else 14
    names = ['maskrcnn/fcn{}'.format(k) for k in range(num_convs)] + ['maskrcnn/deconv']
    gn = cfg.FPN.MRCNN_HEAD_FUNC.endswith('_gn_head') and num_convs
    norms = ['maskrcnn/gn{}'.format(k) for k in range(num_convs)] + [None] if gn else None
    # the 2x2 stride-2 deconv does its work per input cell, like a conv at (res / 2)^2
    out = b.chain(names, features, (res // 2) ** 2 * dets, norms)
    out.consumers.append('maskrcnn/conv')
    b.cells['maskrcnn/conv'] = res ** 2 * dets


def channel_spaces():
    """The channel spaces of the model the (finalised) global config describes.

    Returns:
        (list of ChannelSpace, {layer name: output positions per image at the test size}).
    """
    b = _Builder()
    b.cells['conv0'] = b.at_stride(2)
    stem = b.space(['conv0'])
    if not cfg.MODE_FPN:
        c4 = _resnet_groups(b, stem, 3)[-1]
        b.chain(['rpn/conv0'], c4, b.at_stride(16)).consumers.extend(['rpn/class', 'rpn/box'])
        res5 = _resnet_groups(b, c4, 1, first_group=3, roi_count=cfg.RPN.TEST_POST_NMS_TOPK)[0]
        for name in ('fastrcnn/class', 'fastrcnn/box'):
            res5.consumers.append(name)
            b.cells[name] = cfg.RPN.TEST_POST_NMS_TOPK
        if cfg.MODE_MASK:
            _mask_head_spaces(b, res5, 0)
        return b.spaces, b.cells
    c2345 = _resnet_groups(b, stem, 4)
    gn = cfg.FPN.NORM == 'GN'
    lateral = b.space(['fpn/lateral_1x1_c{}'.format(i) for i in range(2, 6)],
                      norms=['fpn/gn_c{}'.format(i) for i in range(2, 6)] if gn else ())
    posthoc = b.space(['fpn/posthoc_3x3_p{}'.format(i) for i in range(2, 6)],
                      norms=['fpn/gn_p{}'.format(i) for i in range(2, 6)] if gn else ())
    for i, c in enumerate(c2345):
        c.consumers.append('fpn/lateral_1x1_c{}'.format(i + 2))
        lateral.consumers.append('fpn/posthoc_3x3_p{}'.format(i + 2))
        b.cells['fpn/lateral_1x1_c{}'.format(i + 2)] = b.at_stride(4 * 2 ** i)
        b.cells['fpn/posthoc_3x3_p{}'.format(i + 2)] = b.at_stride(4 * 2 ** i)
    rpn_cells = sum(b.at_stride(s) for s in cfg.FPN.ANCHOR_STRIDES)  # P6 included
    rpn = b.chain(['rpn/conv0'], posthoc, rpn_cells)
    for name in ('rpn/class', 'rpn/box'):
        rpn.consumers.append(name)
        b.cells[name] = rpn_cells
    if cfg.CASCADE.ENABLED:
        for stage in range(len(cfg.CASCADE.IOUS)):
            _box_head_spaces(b, posthoc, 'cascade_rcnn_stage{}/head'.format(stage + 1))
    else:
        _box_head_spaces(b, posthoc, 'fastrcnn')
    if cfg.MODE_MASK:
        _mask_head_spaces(b, posthoc, 4)
    return b.spaces, b.cells


def layer_stage(name):
    """The STAGES entry of a layer (or variable) name."""
    head = name.split('/')[0]
    if head.startswith('group'):
        return 'res{}'.format(int(head[len('group'):]) + 2)
    return {'conv0': 'stem', 'fpn': 'fpn', 'rpn': 'rpn', 'maskrcnn': 'mask head'}.get(
        head, 'box head')
