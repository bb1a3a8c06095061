"""End-to-end exports of a trained model: a SavedModel and a frozen GraphDef that take
original images and return detections in those images' own pixels.

The project's inference graph (input ``image``: an already resized float image; outputs
``output/boxes``, ``output/scores``, ``output/labels``, ``output/masks`` in its pixels,
NOTES.md "Graph outputs") is frozen to constants and wrapped, inside the exported graph,
in what eval.py does around it in Python: the resize of ``common.resize_shortest_edge``,
the scale back to the original image, the clip, and the mask paste of ``eval.paste_mask``
(same threshold, same bilinear convention, ``TEST.MASK_PASTE``). A batch runs image by
image in a ``tf.map_fn`` (one image at a time: results equal one-at-a-time calls).
Loading needs TensorFlow only (no project code, no tensorpack); TF Serving can serve it.

Signatures (K = ``TEST.RESULTS_PER_IM`` at export time; detections padded to K):

- ``serving_default``: ``images`` uint8 [N, H, W, C] (C and channel order as trained,
  ``metadata.json``) -> ``num_detections`` int32 [N], ``boxes`` float32 [N, K, 4] (x1, y1,
  x2, y2, original-image pixels, pixel i covers [i, i+1)), ``scores`` float32 [N, K],
  ``classes`` int32 [N, K] (1..C, 0 = padding), ``category_ids`` int32 [N, K] (the
  dataset's own ids, 0 = padding) and with masks ``masks`` uint8 [N, K, H, W] (0/1).
- ``encoded_image``: ``encoded`` string [N] (JPEG/PNG/BMP/GIF of different sizes) -> the
  same, masks padded to the largest image, plus ``image_sizes`` int32 [N, 2] (H, W).
- ``class_names``: no input -> ``class_names`` string [C + 1] (index 0: background).

DIR also holds ``metadata.json`` and ``README.txt`` (thresholds, channels, conventions).

Precision: with ``TRAIN.PRECISION=bf16`` (``predict.py --precision bf16``) the frozen model
carries the bfloat16 rewrite that the predictor's session applies (`bf16_graph_def`): its
convolutions and matmuls run in bfloat16 wherever the graph is served; inputs and outputs
stay as above. Otherwise (fp32; fp16 is a GPU session rewrite) the graph is float32.
``metadata.json`` records which (``precision``).
"""
import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

import json
import os

import tensorflow as tf
from tensorpack.utils import logger

from config import config as cfg
from eval import get_inference_output_names
from utils.compat import freeze_graph_def, optimize_graph
from utils.precision import onednn_enabled
from utils.training import UserInputError

__all__ = ['serving_metadata', 'inner_graph_def', 'bf16_graph_def', 'build_serving_graph',
           'export_savedmodel', 'export_frozen_graph', 'SIGNATURE_OUTPUTS']

tf1 = tf.compat.v1
# Output keys of the image signatures, in this order (also the frozen graph's tensor names).
SIGNATURE_OUTPUTS = ('num_detections', 'boxes', 'scores', 'classes', 'category_ids', 'masks')
# eval.paste_mask's default: foreground where the interpolated probability passes 0.5.
MASK_THRESHOLD = 0.5
# The grappler pass behind the session rewrite of TRAIN.PRECISION=bf16 (utils/precision.py).
BF16_PASS = 'auto_mixed_precision_onednn_bfloat16'


def serving_metadata(category_ids):
    """What the exported graph bakes in from the (finalised) config, as a JSON-ready dict.

    Args:
        category_ids (list of int): the dataset's own id of each class 1..C
            (``predict.class_category_ids()``).
    """
    pre = cfg.PREPROC
    return {
        'image_channels': pre.IMAGE_CHANNELS,
        'channel_order': 'GRAY' if pre.IMAGE_CHANNELS == 1 else
                         pre.CHANNEL_ORDER + ('D' if pre.IMAGE_CHANNELS == 4 else ''),
        'short_edge_size': pre.TEST_SHORT_EDGE_SIZE, 'max_size': pre.MAX_SIZE,
        'resize_uint8': pre.RESIZE_UINT8, 'isotropic_scale_back': cfg.TEST.ISOTROPIC_SCALE_BACK,
        'max_detections': cfg.TEST.RESULTS_PER_IM,
        'score_threshold': cfg.TEST.RESULT_SCORE_THRESH,
        'nms_threshold': cfg.TEST.FRCNN_NMS_THRESH,
        'mode_mask': cfg.MODE_MASK, 'mask_threshold': MASK_THRESHOLD,
        'mask_paste': cfg.TEST.MASK_PASTE,
        'class_names': list(cfg.DATA.CLASS_NAMES),
        'category_ids': [int(i) for i in category_ids],
        'precision': 'bf16' if cfg.TRAIN.PRECISION == 'bf16' else 'fp32',
    }


def inner_graph_def(predictor, output_names=None, precision='fp32'):
    """The predictor's graph (input ``image``) with its variables frozen to constants: the
    GraphDef that `build_serving_graph` wraps.

    Args:
        predictor: predict.py's predictor, whose outputs start with ``output/boxes``,
            ``output/scores``, ``output/labels`` (and ``output/masks``).
        output_names (list of str or None): the outputs kept; default the predictor's.
        precision (str): 'bf16': with `bf16_graph_def`'s rewrite; else as it is (float32).
    Not tensorpack's ``export_compact``, which fails on TF 2.18 (utils/compat.py, shim 9).
    """
    if output_names is None:
        output_names = [t.op.name for t in predictor.output_tensors]
    graph_def = freeze_graph_def(predictor.sess, predictor.graph.as_graph_def(), output_names)
    return bf16_graph_def(graph_def, output_names) if precision == 'bf16' else graph_def


def bf16_graph_def(graph_def, output_names):
    """oneDNN's bfloat16 auto-mixed-precision rewrite (`BF16_PASS`, what the session of
    ``TRAIN.PRECISION=bf16`` runs before each graph execution) applied once, to a GraphDef:
    convolutions and matmuls (and the ops between them) become bfloat16, with casts at
    the edges. Only this pass runs: the result holds no oneDNN-only fused ops, so any
    TensorFlow runs it (through Eigen's bfloat16 kernels on CPUs without bf16 units).

    Args:
        graph_def: a frozen GraphDef (no variables). output_names (list of str): its
            outputs, kept with their names (an output may become bfloat16).
    Raises:
        UserInputError: TensorFlow's oneDNN ops are off in this process; the pass would
            then change nothing.
    """
    from tensorflow.core.protobuf import config_pb2
    if not onednn_enabled():
        raise UserInputError('a bf16 export needs TensorFlow\'s oneDNN ops: set '
                             'TF_ENABLE_ONEDNN_OPTS=1 before running predict.py.')
    with tf.Graph().as_default() as graph:
        tf1.import_graph_def(graph_def, name='')
        meta_graph = tf1.train.export_meta_graph(graph=graph)
    meta_graph.collection_def['train_op'].node_list.value.extend(output_names)  # fetches
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.optimizers.append(BF16_PASS)
    config.graph_options.rewrite_options.min_graph_nodes = -1  # small graphs too
    out = optimize_graph(config, meta_graph)
    for node in out.node:
        if node.op == 'Placeholder' and 'T' in node.attr:
            # the pass tags the input with a T attr Placeholder lacks: TF logs an error
            # on every import of the graph
            del node.attr['T']
    return out


# ---------------------------------------------------------------------- in-graph pre/post
def _resized_size(shape2d, short, max_size):
    """int32 [2] (h', w') of ``common.resize_shortest_edge``, in the same float64 steps."""
    hw = tf.cast(shape2d, tf.float64)
    scale = short / tf.reduce_min(hw)
    longest = tf.reduce_max(hw)
    scale = tf.where(longest * scale > max_size, max_size / longest, scale)
    return tf.cast(tf.maximum(tf.floor(hw * scale + 0.5), 1.), tf.int32)


def _resize(image, meta):
    """float32 [H, W, C] -> (float32 [h', w', C] as cv2.INTER_LINEAR resizes it, int32 [2]).

    TensorFlow's bilinear resize with half-pixel centres (no antialiasing) samples where
    cv2.INTER_LINEAR does; with ``resize_uint8`` the input and the result are rounded to
    integers (cv2's uint8 path uses fixed-point weights: within one grey level).
    """
    size = _resized_size(tf.shape(image)[:2], meta['short_edge_size'], meta['max_size'])
    if meta['resize_uint8']:
        image = tf.clip_by_value(tf.round(image), 0., 255.)
    out = tf.image.resize(image[None], size, method='bilinear')[0]
    if meta['resize_uint8']:
        out = tf.clip_by_value(tf.round(out), 0., 255.)
    return out, size


def _axis_weights(lo, hi, res, size):
    """Bilinear weights of one axis for pasting, as ``eval._paste_region`` computes them.

    Args:
        lo, hi: float64 [K] the box edges along this axis (x1, x2 or y1, y2), pixels.
        res (int): mask cells along this axis. size: scalar int32, image pixels along it.
    Returns:
        float32 [K, size, res]: row p holds pixel p's weights; zero rows for the pixels
        whose centre is outside [lo, hi).
    """
    pix = tf.cast(tf.range(size), tf.float64)[None]  # [1, S]
    size_f = tf.cast(size, tf.float64)
    start = tf.clip_by_value(tf.math.ceil(lo - 0.5), 0., size_f)[:, None]
    end = tf.clip_by_value(tf.math.ceil(hi - 0.5), 0., size_f)[:, None]
    inside = (pix >= start) & (pix < end)
    width = tf.where(hi > lo, hi - lo, tf.ones_like(lo))[:, None]  # empty boxes: no pixel
    coords = tf.clip_by_value((pix + 0.5 - lo[:, None]) * (res / width) - 0.5, 0., res - 1.)
    low = tf.minimum(tf.floor(coords), float(max(res - 2, 0)))
    high = tf.minimum(low + 1., res - 1.)
    frac = coords - low
    weights = (tf.one_hot(tf.cast(low, tf.int32), res) * tf.cast(1. - frac, tf.float32)[..., None]
               + tf.one_hot(tf.cast(high, tf.int32), res) * tf.cast(frac, tf.float32)[..., None])
    return tf.where(inside[..., None], weights, tf.zeros_like(weights))


def paste_masks(masks, boxes, shape2d, border, threshold=MASK_THRESHOLD):
    """``eval.paste_mask`` of every instance, in the graph.

    Args:
        masks: float32 [K, R, R] probabilities. boxes: float32 [K, 4] x1y1x2y2 image pixels.
        shape2d: int32 [2] (H, W). border (str): 'zeros' or 'edge' (TEST.MASK_PASTE).
    Returns:
        uint8 [K, H, W] of 0/1.
    """
    res = int(masks.shape[-1])
    x1, y1, x2, y2 = tf.unstack(tf.cast(boxes, tf.float64), axis=1)
    if border == 'zeros':  # a ring of zero cells, the box grown by one cell (eval.py)
        cw, ch = (x2 - x1) / res, (y2 - y1) / res
        masks = tf.pad(masks, [[0, 0], [1, 1], [1, 1]])
        x1, y1, x2, y2 = x1 - cw, y1 - ch, x2 + cw, y2 + ch
        res += 2
    wy = _axis_weights(y1, y2, res, shape2d[0])  # [K, H, R]
    wx = _axis_weights(x1, x2, res, shape2d[1])  # [K, W, R]
    region = tf.matmul(tf.matmul(wy, masks), wx, transpose_b=True)  # [K, H, W]
    fg = region >= threshold if border == 'zeros' else region > threshold
    return tf.cast(fg, tf.uint8)


def _detect_one(image, shape_out, inner, meta):
    """One image through the whole pipeline.

    Args:
        image: float32 [H, W, C] original image, raw pixels in the model's channel order.
        shape_out: int32 [2] (H_out, W_out) >= (H, W): the masks are zero-padded to it.
        inner: the frozen inner GraphDef. meta: `serving_metadata`.
    Returns:
        (num int32, boxes [K, 4], scores [K], classes int32 [K], category_ids int32 [K]
        [, masks uint8 [K, H_out, W_out]]), detections padded with zeros to K.
    """
    shape2d = tf.shape(image)[:2]
    resized, size = _resize(image, meta)
    names = get_inference_output_names(meta['mode_mask'])
    outputs = tf1.import_graph_def(inner, input_map={'image:0': resized}, name='model',
                                   return_elements=[n + ':0' for n in names])
    # float32 even where the bf16 rewrite left an output in bfloat16
    boxes, scores = (tf.cast(t, tf.float32) for t in outputs[:2])
    labels = outputs[2]
    back = tf.cast(shape2d, tf.float64) / tf.cast(size, tf.float64)  # (sy, sx)
    if meta['isotropic_scale_back']:
        back = tf.fill([2], tf.sqrt(back[0] * back[1]))
    back = tf.cast(tf.stack([back[1], back[0], back[1], back[0]]), tf.float32)
    limit = tf.cast(tf.stack([shape2d[1], shape2d[0], shape2d[1], shape2d[0]]), tf.float32)
    boxes = tf.clip_by_value(tf.reshape(boxes, [-1, 4]) * back, 0., limit)  # as eval.py
    num = tf.shape(boxes)[0]
    k = meta['max_detections']
    pad = [[0, k - num]]
    category = tf.gather(tf.constant([0] + meta['category_ids'], tf.int32), labels)
    ret = [num, tf.pad(boxes, pad + [[0, 0]]), tf.pad(scores, pad),
           tf.pad(tf.cast(labels, tf.int32), pad), tf.pad(category, pad)]
    if meta['mode_mask']:
        masks = paste_masks(tf.cast(outputs[3], tf.float32), boxes, shape2d, meta['mask_paste'])
        extra = shape_out - shape2d
        ret.append(tf.pad(masks, [[0, k - num], [0, extra[0]], [0, extra[1]]]))
    return tuple(ret)


def _batch(fn, elems, meta):
    """``fn`` on each element, one at a time; the stacked `SIGNATURE_OUTPUTS` as a dict."""
    k = meta['max_detections']
    specs = [tf.TensorSpec([], tf.int32), tf.TensorSpec([k, 4], tf.float32),
             tf.TensorSpec([k], tf.float32), tf.TensorSpec([k], tf.int32),
             tf.TensorSpec([k], tf.int32)]
    if meta['mode_mask']:
        specs.append(tf.TensorSpec([k, None, None], tf.uint8))
    out = tf.map_fn(fn, elems, fn_output_signature=tuple(specs), parallel_iterations=1)
    return {name: tf.identity(t, name=name) for name, t in zip(SIGNATURE_OUTPUTS, out)}


def _decode(encoded, meta):
    """One encoded image -> float32 [H, W, C] as ``common.read_image`` gives it (8-bit).

    JPEGs decode with the accurate integer DCT (cv2's); grayscale models get cv2's float
    BGR->gray weights; a 4-channel model gets the file's alpha (255 when it has none).
    """
    if meta['image_channels'] == 4:
        img = tf.io.decode_image(encoded, channels=4, expand_animations=False)
    else:
        img = tf.cond(tf.io.is_jpeg(encoded),
                      lambda: tf.io.decode_jpeg(encoded, channels=3,
                                                dct_method='INTEGER_ACCURATE'),
                      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    img = tf.cast(img, tf.float32)  # RGB(A)
    if meta['image_channels'] == 1:
        r, g, b = tf.unstack(img, axis=-1)
        return (b * 0.114 + g * 0.587 + r * 0.299)[..., None]
    if meta['channel_order'].startswith('BGR'):
        img = tf.concat([img[..., 2::-1], img[..., 3:]], axis=-1)
    return img


def build_serving_graph(inner, meta):
    """A new graph holding the end-to-end model.

    Returns:
        (graph, {signature name: (inputs dict, outputs dict)}), tensors of that graph.
    """
    c = meta['image_channels']
    graph = tf.Graph()
    with graph.as_default():
        # One function for both signatures: the frozen weights are stored once.
        detect = tf.function(lambda image, shape_out: _detect_one(image, shape_out, inner, meta),
                             input_signature=[tf.TensorSpec([None, None, c], tf.float32),
                                              tf.TensorSpec([2], tf.int32)])
        images = tf1.placeholder(tf.uint8, [None, None, None, c], name='images')
        shape2d = tf.shape(images)[1:3]
        outputs = _batch(lambda img: detect(tf.cast(img, tf.float32), shape2d), images, meta)
        with tf1.name_scope('encoded'):
            encoded = tf1.placeholder(tf.string, [None], name='encoded')
            sizes = tf.map_fn(lambda s: tf.shape(_decode(s, meta))[:2], encoded,
                              fn_output_signature=tf.int32)
            largest = tf.reduce_max(tf.concat([sizes, tf.zeros([1, 2], tf.int32)], 0), axis=0)
            enc_outputs = _batch(lambda s: detect(_decode(s, meta), largest), encoded, meta)
            enc_outputs['image_sizes'] = tf.identity(sizes, name='image_sizes')
        names = tf.constant(meta['class_names'], name='class_names')
    signatures = {'serving_default': ({'images': images}, outputs),
                  'encoded_image': ({'encoded': encoded}, enc_outputs),
                  'class_names': ({}, {'class_names': names})}
    return graph, signatures


def _write_metadata(directory, meta):
    """metadata.json (everything `serving_metadata` baked in) and a README.txt for people."""
    with open(os.path.join(directory, 'metadata.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    order = meta['channel_order']
    text = [
        'Mask R-CNN exported end to end (plain TensorFlow; no project code needed).',
        '',
        'serving_default: images uint8 [N, H, W, {}] in channel order {} (original size;'
        .format(meta['image_channels'], order),
        '  resized inside: short edge {}, long edge <= {}, bilinear).'.format(
            meta['short_edge_size'], meta['max_size']),
        'encoded_image: encoded string [N] (JPEG/PNG/...; decoded to {} inside).'.format(order),
        'Outputs: num_detections [N]; boxes [N, K, 4] x1,y1,x2,y2 original-image pixels;',
        '  scores, classes (1..C), category_ids (dataset ids) [N, K]; masks uint8 [N, K, H, W]',
        '  (encoded_image: padded to the largest image, image_sizes [N, 2] = H, W).',
        'K = {} (padded with zeros after num_detections), score threshold {}, mask '
        'threshold {} ({} paste).'.format(meta['max_detections'], meta['score_threshold'],
                                          meta['mask_threshold'], meta['mask_paste']),
        'Precision: {}.'.format('bf16 (convolutions and matmuls in bfloat16 inside the graph)'
                                if meta['precision'] == 'bf16' else 'float32'),
        'Classes: ' + ', '.join('{}={}'.format(i, n) for i, n in
                                enumerate(meta['class_names'])),
    ]
    with open(os.path.join(directory, 'README.txt'), 'w') as f:
        f.write('\n'.join(text) + '\n')


def export_savedmodel(predictor, directory, meta):
    """Write the end-to-end SavedModel (module docstring) of a predictor's model to
    ``directory`` (must not exist yet), with metadata.json and README.txt.

    Args:
        predictor: a tensorpack ``OfflinePredictor`` of the configured model (predict.py).
        meta: `serving_metadata`.
    """
    inner = inner_graph_def(predictor, precision=meta['precision'])
    graph, signatures = build_serving_graph(inner, meta)
    build = tf1.saved_model.utils.build_tensor_info
    with graph.as_default(), tf1.Session(graph=graph) as sess:
        signature_map = {
            key: tf1.saved_model.signature_def_utils.build_signature_def(
                inputs={k: build(t) for k, t in inputs.items()},
                outputs={k: build(t) for k, t in outputs.items()},
                method_name=tf1.saved_model.signature_constants.PREDICT_METHOD_NAME)
            for key, (inputs, outputs) in signatures.items()}
        builder = tf1.saved_model.Builder(directory)
        builder.add_meta_graph_and_variables(sess, [tf1.saved_model.tag_constants.SERVING],
                                             signature_def_map=signature_map)
        builder.save()
    _write_metadata(directory, meta)
    logger.info('SavedModel written to {}.'.format(directory))


def export_frozen_graph(predictor, filename, meta):
    """Write the end-to-end graph (everything constant) as one GraphDef (.pb); tensors
    ``images:0`` -> ``num_detections:0``, ``boxes:0``, ... (`SIGNATURE_OUTPUTS`) and
    ``encoded/encoded:0`` -> ``encoded/boxes:0``, ..., ``encoded/image_sizes:0``. The
    metadata (`serving_metadata`) goes next to it as ``<filename>.json``."""
    graph, _ = build_serving_graph(inner_graph_def(predictor, precision=meta['precision']),
                                   meta)
    with open(filename, 'wb') as f:
        f.write(graph.as_graph_def().SerializeToString())
    with open(filename + '.json', 'w') as f:
        json.dump(meta, f, indent=1)
    logger.info('Frozen graph written to {}.'.format(filename))
