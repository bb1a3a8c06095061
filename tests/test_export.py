"""export.py end to end: SavedModels and a frozen graph of three tiny models (BGR, RGB,
grayscale; freshly initialised weights), served by plain TensorFlow in one fresh process
without the project on sys.path, give the in-project predictor's detections (eval.py's
resize, scale back and mask paste): one image at a time, as a batch, from encoded PNGs of
different sizes, and through the frozen GraphDef."""
import json
import os

import cv2
import numpy as np
import pytest

from tiny import (assert_masks_match, configured, matching_order, run_plain_tensorflow,
                  spread_class_scores)

# name -> config overrides of the exported model
MODELS = {
    'bgr': [],
    'rgb': ['PREPROC.CHANNEL_ORDER=RGB', 'PREPROC.PIXEL_MEAN=[123.675,116.28,103.53]',
            'PREPROC.PIXEL_STD=[58.395,57.12,57.375]', 'TEST.ISOTROPIC_SCALE_BACK=True'],
    'gray': ['PREPROC.IMAGE_CHANNELS=1', 'PREPROC.PIXEL_MEAN=[118.]', 'PREPROC.PIXEL_STD=[57.]',
             'TEST.MASK_PASTE=edge'],
}
# Image sizes (H, W): two of the same size for the batch, then others for encoded inputs.
SIZES = [(100, 140), (100, 140), (150, 96), (61, 203)]

PLAIN_TF = """
    import numpy as np
    import tensorflow as tf

    def run(fn, **kw):
        return {k: v.numpy() for k, v in fn(**kw).items()}
    for name in MODELS:
        d = os.path.join(TMP, name)
        images = [np.load(os.path.join(d, 'img{}.npy'.format(i))) for i in range(N)]
        model = tf.saved_model.load(os.path.join(d, 'savedmodel'))
        serve = model.signatures['serving_default']
        out = {}
        for i, img in enumerate(images):
            out.update({'single{}_{}'.format(i, k): v for k, v in
                        run(serve, images=tf.constant(img[None])).items()})
        out.update({'batch_' + k: v for k, v in
                    run(serve, images=tf.constant(np.stack(images[:2]))).items()})
        pngs = [open(os.path.join(d, 'img{}.png'.format(i)), 'rb').read() for i in range(N)]
        out.update({'enc_' + k: v for k, v in
                    run(model.signatures['encoded_image'], encoded=tf.constant(pngs)).items()})
        names = model.signatures['class_names']()['class_names'].numpy()
        out['names'] = np.array([n.decode() for n in names])
        out['frozen_boxes'], out['frozen_masks'] = run_frozen(
            os.path.join(d, 'frozen.pb'), ['boxes:0', 'masks:0'], {'images:0': images[2][None]})
        np.savez(os.path.join(d, 'plain.npz'), **out)
"""


def _export_model(name, folder):
    """Export model ``name`` to ``folder``; return the in-project detections of each image
    (from the array) and of each PNG (read as predict.py reads files)."""
    import export
    import predict
    from common import read_image
    from eval import predict_image
    rs = np.random.RandomState(1)
    with configured(MODELS[name], is_training=False) as cfg:
        channels = cfg.PREPROC.IMAGE_CHANNELS
        predictor = predict.build_predictor(None)
        spread_class_scores(predictor.sess, 10.)  # scores ~10x further apart
        images = []
        for i, (h, w) in enumerate(SIZES):
            bgr = rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
            bgr[h // 4:h // 2, w // 5:w // 2] = (20, 200, 40)  # something object-like
            cv2.imwrite(os.path.join(folder, 'img{}.png'.format(i)), bgr)
            img = read_image(os.path.join(folder, 'img{}.png'.format(i)))  # model order
            if i == 1:
                img = images[0].astype(np.float32)  # the batch: the same image twice
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
            np.save(os.path.join(folder, 'img{}.npy'.format(i)), img)
            images.append(img)
        want = [predict_image(img.astype(np.float32), predictor) for img in images]
        want_png = [predict_image(read_image(os.path.join(folder, 'img{}.png'.format(i))),
                                  predictor) for i in range(len(SIZES))]
        meta = export.serving_metadata(predict.class_category_ids())
        export.export_savedmodel(predictor, os.path.join(folder, 'savedmodel'), meta)
        export.export_frozen_graph(predictor, os.path.join(folder, 'frozen.pb'), meta)
        predictor.sess.close()
    assert images[0].shape[2] == channels
    return want, want_png


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    """{model name: (plain-TF outputs, in-project detections per array, per PNG, folder)}."""
    tmp = str(tmp_path_factory.mktemp('export'))
    wants = {}
    for name in MODELS:
        os.makedirs(os.path.join(tmp, name))
        wants[name] = _export_model(name, os.path.join(tmp, name))
    plain = run_plain_tensorflow(PLAIN_TF, tmp, TMP=tmp, MODELS=list(MODELS), N=len(SIZES))
    assert plain.returncode == 0, plain.stderr[-3000:]
    return {name: (dict(np.load(os.path.join(tmp, name, 'plain.npz'))), *wants[name],
                   os.path.join(tmp, name)) for name in MODELS}


def assert_same(got, prefix, index, want, shape):
    """Outputs ``prefix*`` (batch row ``index``) equal the in-project detections: same
    count, classes and order (up to tied scores, `matching_order`), boxes within 0.5 px,
    scores within 1e-3, each mask IoU >= 0.99 (`assert_masks_match`) and zero beyond the
    image (``shape``: its H, W)."""
    n = int(got[prefix + 'num_detections'][index])
    assert n == len(want) > 0, (n, len(want))
    k = got[prefix + 'boxes'].shape[1]
    classes, boxes, scores = (got[prefix + key][index, :n]
                              for key in ('classes', 'boxes', 'scores'))
    order = matching_order(list(zip(classes, boxes, scores)),
                           [(r.class_id, r.box, r.score) for r in want], 0.5, 1e-3)
    assert not got[prefix + 'classes'][index, n:].any() and n <= k
    masks = got[prefix + 'masks'][index]
    h, w = shape
    assert not masks[:, h:].any() and not masks[:, :, w:].any()
    assert_masks_match(masks[order, :h, :w], [r.mask for r in want])


@pytest.mark.parametrize('name', list(MODELS))
def test_savedmodel_matches_in_project_predictor(served, name):
    got, want, _, _ = served[name]
    for i, (h, w) in enumerate(SIZES):
        assert got['single{}_masks'.format(i)].shape[2:] == (h, w)
        assert_same(got, 'single{}_'.format(i), 0, want[i], (h, w))
    np.testing.assert_array_equal(got['names'], ['BG', 'circle', 'square', 'triangle'])


@pytest.mark.parametrize('name', list(MODELS))
def test_batch_equals_one_at_a_time(served, name):
    got = served[name][0]
    for key in ('num_detections', 'boxes', 'scores', 'classes', 'masks'):
        for row in range(2):
            np.testing.assert_array_equal(got['batch_' + key][row], got['single0_' + key][0])


@pytest.mark.parametrize('name', list(MODELS))
def test_encoded_images_of_different_sizes(served, name):
    """PNG bytes decoded in the graph = the files read by common.read_image (channels,
    order, cv2's float gray); masks padded to the largest image."""
    got, _, want_png, _ = served[name]
    np.testing.assert_array_equal(got['enc_image_sizes'], SIZES)
    assert got['enc_masks'].shape[2:] == tuple(np.max(SIZES, axis=0))
    for i, shape in enumerate(SIZES):
        assert_same(got, 'enc_', i, want_png[i], shape)


def test_frozen_graph_and_metadata(served):
    got, _, _, folder = served['bgr']
    np.testing.assert_array_equal(got['frozen_boxes'], got['single2_boxes'])
    np.testing.assert_array_equal(got['frozen_masks'], got['single2_masks'])
    with open(os.path.join(folder, 'savedmodel', 'metadata.json')) as f:
        meta = json.load(f)
    assert meta['channel_order'] == 'BGR' and meta['max_detections'] == 20
    assert meta['category_ids'] == [1, 2, 3] and meta['mask_threshold'] == 0.5
    with open(os.path.join(served['gray'][3], 'savedmodel', 'metadata.json')) as f:
        assert json.load(f)['channel_order'] == 'GRAY'
    assert 'channel order RGB' in open(os.path.join(served['rgb'][3], 'savedmodel',
                                                    'README.txt')).read()


def test_category_ids_are_the_training_json_ids(tmp_path):
    """A COCO-format training set: category_ids maps classes 1..C to the json's own ids."""
    import export
    import predict
    from dataset.coco import register_coco_json
    cats = [{'id': c, 'name': n} for c, n in ((9, 'triangle'), (2, 'circle'), (5, 'square'))]
    path = str(tmp_path / 'train.json')
    with open(path, 'w') as f:
        json.dump({'images': [], 'annotations': [], 'categories': cats}, f)
    register_coco_json('export_test_coco', path, str(tmp_path))
    with configured(['DATA.TRAIN=export_test_coco'], is_training=False):
        meta = export.serving_metadata(predict.class_category_ids())
    assert meta['class_names'] == ['BG', 'circle', 'square', 'triangle']
    assert meta['category_ids'] == [2, 5, 9]


def test_bf16_export_needs_onednn(monkeypatch):
    """Without TensorFlow's oneDNN ops the bf16 rewrite would change nothing: a user error
    (predict.py prints it as one "Error: ..." line) instead of a float32 graph labelled bf16."""
    import tensorflow as tf

    import export
    from utils.training import UserInputError
    monkeypatch.setattr(export, 'onednn_enabled', lambda: False)
    with pytest.raises(UserInputError, match='TF_ENABLE_ONEDNN_OPTS=1'):
        export.bf16_graph_def(tf.compat.v1.GraphDef(), [])


def test_matching_order_swaps_only_tied_scores():
    """The comparison above forgives two detections whose scores tie swapping places, and
    nothing else: not a reorder of distinct scores, not a changed class or a moved box."""
    a, b = (1, [0, 0, 10, 10], 0.9), (3, [5, 5, 20, 20], 0.5)
    tied = (a[0], a[1], 0.5004)
    assert matching_order([b, tied], [tied, b], 0.5, 1e-3) == [1, 0]
    for got in ([b, a], [a, (2, b[1], b[2])], [a, (3, [5, 5, 21, 20], 0.5)]):
        with pytest.raises(AssertionError):
            matching_order(got, [a, b], 0.5, 1e-3)
