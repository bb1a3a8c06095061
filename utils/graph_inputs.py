"""The graph's training inputs: their names and order, and the image padding multiple.

Shared by the data pipeline (which produces the inputs) and the model (which declares
them), so it lives below both. Names, dtypes and shapes follow NOTES.md ("Graph inputs").
"""
import math

__all__ = ['image_pad_multiple', 'fpn_levels', 'input_names']


def image_pad_multiple(mode_fpn, c4_pad_input):
    """The graph pads H and W up to a multiple of this: 32 (FPN); C4: 16 with
    ``c4_pad_input`` (BACKBONE.C4_PAD_INPUT), else 1 (no padding, as tensorpack)."""
    if mode_fpn:
        return 32
    return 16 if c4_pad_input else 1


def fpn_levels(strides):
    """FPN level l of each stride 2^l, e.g. (4, 8, 16, 32, 64) -> [2, 3, 4, 5, 6]."""
    return [int(round(math.log2(s))) for s in strides]


def input_names(mode_fpn, mode_mask, fpn_strides=(4, 8, 16, 32, 64), batched=False):
    """The graph's training input names, in the order of every training datapoint.

    FPN: image, anchor_labels_lvl{2..6}, anchor_boxes_lvl{2..6}, gt_boxes, gt_labels
    [, gt_masks] (one level per stride of ``fpn_strides``, i.e. FPN.ANCHOR_STRIDES);
    C4: image, anchor_labels, anchor_boxes, gt_boxes, gt_labels [, gt_masks].
    ``batched`` (more than one image per device): ``image_sizes`` follows ``image``.
    """
    names = ['image', 'image_sizes'] if batched else ['image']
    if mode_fpn:
        levels = fpn_levels(fpn_strides)
        names += ['anchor_labels_lvl{}'.format(lv) for lv in levels]
        names += ['anchor_boxes_lvl{}'.format(lv) for lv in levels]
    else:
        names += ['anchor_labels', 'anchor_boxes']
    names += ['gt_boxes', 'gt_labels']
    if mode_mask:
        names.append('gt_masks')
    return names
