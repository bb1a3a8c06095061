"""Exports of a trained model's inference graph: a SavedModel and a frozen GraphDef.

Both take a tensorpack ``OfflinePredictor`` (predict.py builds it from --load) and keep
the graph's stable names: input ``image``, outputs ``output/boxes``, ``output/scores``,
``output/labels`` (and ``output/masks``), as NOTES.md ("Graph outputs") describes.
"""
import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

import tensorflow as tf
from tensorpack.utils import logger

from utils.compat import freeze_graph_def

__all__ = ['export_savedmodel', 'export_frozen_graph']


def _signature_key(tensor):
    """'output/boxes:0' -> 'boxes', 'image:0' -> 'image'."""
    return tensor.op.name.split('/')[-1]


def export_savedmodel(predictor, directory):
    """Write a SavedModel (TF Serving / ``tf.saved_model.load``) of a predictor's graph.

    Signature ``serving_default``: input ``image`` (float32 [H, W, C], the channels and
    order of ``cfg.PREPROC``, raw pixels in [0, 255], already resized by the caller);
    outputs ``boxes``, ``scores``, ``labels`` (and ``masks``) as in NOTES.md. Written with
    ``tf.compat.v1`` directly: tensorpack's ``export_serving`` names the keys after tensors
    ('output/boxes:0') and its ``export_compact`` fails on TF 2.18 (utils/compat.py, shim 9).

    Args:
        predictor: a tensorpack ``OfflinePredictor`` (its graph, session and tensors).
        directory (str): must not exist yet.
    """
    tf1 = tf.compat.v1
    with predictor.graph.as_default():  # build_tensor_info refuses eager mode
        info = tf1.saved_model.utils.build_tensor_info
        signature = tf1.saved_model.signature_def_utils.build_signature_def(
            inputs={_signature_key(t): info(t) for t in predictor.input_tensors},
            outputs={_signature_key(t): info(t) for t in predictor.output_tensors},
            method_name=tf1.saved_model.signature_constants.PREDICT_METHOD_NAME)
        builder = tf1.saved_model.Builder(directory)
        builder.add_meta_graph_and_variables(
            predictor.sess, [tf1.saved_model.tag_constants.SERVING],
            signature_def_map={'serving_default': signature})
        builder.save()
    logger.info('SavedModel written to {}.'.format(directory))


def export_frozen_graph(predictor, filename):
    """Write a predictor's graph with its variables frozen to constants as one GraphDef
    (.pb). Inputs and outputs keep their graph names: ``image:0``, ``output/boxes:0``, ...

    Not tensorpack's ``export_compact``, which fails on TF 2.18 (utils/compat.py, shim 9).
    """
    names = [t.op.name for t in predictor.output_tensors]
    frozen = freeze_graph_def(predictor.sess, predictor.graph.as_graph_def(), names)
    with open(filename, 'wb') as f:
        f.write(frozen.SerializeToString())
    logger.info('Frozen graph written to {}.'.format(filename))
