"""Batched inference (predict.py --batch-size N): an image predicted in a batch with
others of different sizes gets exactly what it gets alone."""
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from eval import predict_image, predict_images
from eval_batch import BatchModel
from tests.tiny import configured, matching_order, spread_class_scores


def _images():
    """Three test images of different sizes and orientations, with bright rectangles."""
    rs = np.random.RandomState(0)
    images = []
    for h, w in [(128, 170), (150, 128), (128, 128)]:
        img = rs.uniform(0, 80, (h, w, 3)).astype(np.float32)
        img[20:70, 30:100] = (20, 200, 40)
        images.append(img)
    return images


def _save_random_weights(predictor, path):
    """The predictor's (random) weights as an .npz of variable name -> value."""
    with predictor.graph.as_default():
        variables = tf.global_variables()
    values = predictor.sess.run(variables)
    np.savez(path, **{v.op.name: x for v, x in zip(variables, values)})


def _assert_same(alone, batched):
    """The same detections (boxes and scores within 1e-4, equal masks), in the same order
    up to tied scores."""
    assert len(alone) > 0, 'no detection: the comparison would be empty'
    order = matching_order([(b.class_id, b.box, b.score) for b in batched],
                           [(a.class_id, a.box, a.score) for a in alone], 1e-4, 1e-4)
    for a, j in zip(alone, order):
        if a.mask is not None:
            assert np.array_equal(a.mask, batched[j].mask)


@pytest.mark.parametrize('overrides', [['MODE_FPN=True', 'MODE_MASK=True'],
                                       ['MODE_FPN=False', 'MODE_MASK=True']],
                         ids=['fpn-mask', 'c4-mask'])
def test_batched_prediction_equals_prediction_alone(overrides, tmp_path):
    from predict import build_predictor
    from utils.training import WeightsLoader
    with configured(overrides + ['TEST.RESULT_SCORE_THRESH=0.01'], is_training=False):
        single = build_predictor(None)
        spread_class_scores(single.sess, 10.)  # scores ~10x further apart
        path = str(tmp_path / 'weights.npz')
        _save_random_weights(single, path)
        single = build_predictor(WeightsLoader(path))
        batched = build_predictor(WeightsLoader(path), batch_size=3)
        assert isinstance(batched, BatchModel)
        images = _images()
        alone = [predict_image(img, single) for img in images]
        together = predict_images(images, batched)
        two = predict_images(images[:2], batched)  # a short batch: one blank filler
    for a, b in zip(alone, together):
        _assert_same(a, b)
    for a, b in zip(alone[:2], two):
        _assert_same(a, b)
