"""One training step on placeholders, as train.py's trainer builds it, for bench and tests."""
import collections

import utils.compat  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

import tensorflow.compat.v1 as tf
from tensorpack.input_source import PlaceholderInput
from tensorpack.train import SimpleTrainer

from .generalized_rcnn import build_model

__all__ = ['TrainingStep', 'build_training_step']

TrainingStep = collections.namedtuple('TrainingStep', 'placeholders cost losses train_op')
_LOSS_SUFFIXES = ('loss', 'wd_cost', 'norm_l1_cost', 'total_cost')


def build_training_step(model=None, optimizer=None):
    """The training graph of ``model`` (default ``build_model()``) in the default graph,
    built by tensorpack's ``SimpleTrainer`` exactly as train.py trains one device.

    Args:
        optimizer: a function returning a tf optimizer; default the model's own (momentum,
            LR variable, gradient accumulation, fp16 loss scaling).
    Returns:
        TrainingStep: placeholders (in ``model_input_names(True)`` order), cost (scalar
        ``total_cost``), losses ({op name: scalar float32} of every ``*loss``, ``wd_cost``,
        ``norm_l1_cost`` (TRAIN.NORM_L1 > 0) and ``total_cost``), train_op.
    """
    model = build_model() if model is None else model
    source = PlaceholderInput()
    trainer = SimpleTrainer()
    trainer.setup_graph(model.get_input_signature(), source, model.build_graph,
                        optimizer or model.get_optimizer)
    graph = tf.get_default_graph()
    losses = {t.op.name: t for op in graph.get_operations() for t in op.outputs
              if t.op.name.endswith(_LOSS_SUFFIXES) and t.dtype == tf.float32
              and t.shape.ndims == 0}
    return TrainingStep(source.get_input_tensors(), graph.get_tensor_by_name('total_cost:0'),
                        losses, trainer.train_op)
