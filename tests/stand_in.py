"""A stand-in model for evaluation tests: images of two pure-colour rectangles, a
"model" that finds them with TensorFlow ops, and a COCO split of such images (fixtures
`coco_split` and `stand_in_cfg` in tests/conftest.py)."""
import json

import cv2
import numpy as np
import tensorflow as tf
from tensorpack import ModelDesc

from dataset import register_coco_json

tf1 = tf.compat.v1

# Images: black, one pure red rectangle (class 1) and one pure green rectangle (class 2).
RECTS = {1: (2, 'red'), 2: (1, 'green')}  # class -> (BGR channel, name)


class StandInModel(ModelDesc):
    """The inference interface of NOTES.md, computed from the image with tf ops: each
    class's box is the bounding box of the pixels of its pure colour; masks are all ones."""

    def inputs(self):
        return [tf.TensorSpec([None, None, 3], tf.float32, 'image')]

    def build_graph(self, image):
        w = tf1.get_variable('w', [], initializer=tf1.zeros_initializer())
        boxes = []
        for ch, _ in RECTS.values():
            others = [c for c in range(3) if c != ch]
            fg = (image[:, :, ch] > 200) & tf.reduce_all(
                tf.gather(image, others, axis=2) < 50, axis=2)
            cols = tf.where(tf.reduce_any(fg, axis=0))[:, 0]
            rows = tf.where(tf.reduce_any(fg, axis=1))[:, 0]
            boxes.append(tf.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]))
        boxes = tf.cast(tf.stack(boxes), tf.float32) + 0. * w
        tf.identity(boxes, name='output/boxes')
        tf.identity(tf.ones([2]) * 0.9, name='output/scores')
        tf.constant(list(RECTS), dtype=tf.int32, name='output/labels')
        tf.ones([2, 28, 28], name='output/masks')
        return tf.square(w - 1., name='cost')

    def optimizer(self):
        return tf1.train.GradientDescentOptimizer(0.1)


def make_image(rs, h=48, w=64):
    """uint8 [h, w, 3] BGR image with the two rectangles (red left, green right, never
    overlapping) and their boxes {class: [x1, y1, x2, y2]}."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    boxes = {}
    for cls, (ch, _) in RECTS.items():
        x1 = int(rs.randint(0, w // 2 - 20)) + (cls - 1) * (w // 2)
        y1 = int(rs.randint(0, h - 20))
        x2, y2 = x1 + int(rs.randint(8, 20)), y1 + int(rs.randint(8, 20))
        img[y1:y2, x1:x2, ch] = 255
        boxes[cls] = [x1, y1, x2, y2]
    return img, boxes


def add_corrupt_image(tmp_path, json_file):
    """Append an unreadable image (id 99) to the split's json: it must be skipped."""
    with open(json_file) as f:
        gt = json.load(f)
    gt['images'].append({'id': 99, 'file_name': 'corrupt.png', 'height': 48, 'width': 64})
    (tmp_path / 'corrupt.png').write_bytes(b'not a png')
    with open(json_file, 'w') as f:
        json.dump(gt, f)


def write_coco_split(tmp_path):
    """Four `make_image` images in ``tmp_path`` and their COCO json, registered, with
    non-contiguous category ids 3 (red) and 7 (green).

    Returns:
        (dataset name, json path)
    """
    rs = np.random.RandomState(3)
    images, anns = [], []
    for i in range(4):
        img, boxes = make_image(rs)
        cv2.imwrite(str(tmp_path / 'im{}.png'.format(i)), img)
        images.append({'id': i + 10, 'file_name': 'im{}.png'.format(i), 'height': 48,
                       'width': 64})
        for cls, cat in ((1, 3), (2, 7)):
            x1, y1, x2, y2 = boxes[cls]
            anns.append({'id': len(anns) + 1, 'image_id': i + 10, 'category_id': cat,
                         'bbox': [x1, y1, x2 - x1, y2 - y1], 'iscrowd': 0,
                         'area': (x2 - x1) * (y2 - y1),
                         'segmentation': [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    cats = [{'id': 7, 'name': 'green'}, {'id': 3, 'name': 'red'}]
    json_file = tmp_path / 'instances.json'
    json_file.write_text(json.dumps({'images': images, 'annotations': anns,
                                     'categories': cats}))
    name = 'test_eval_{}'.format(tmp_path.name)
    register_coco_json(name, str(json_file), str(tmp_path))
    return name, str(json_file)
