"""common.py: image reading, resizing, flipping, box-frame masks."""
import cv2
import numpy as np
import pytest

import common
from common import ImageReadError, read_image
from tests.tiny import full_mask


# ---------------------------------------------------------------------------- read_image

def test_read_image_layouts(tmp_path):
    rs = np.random.RandomState(0)
    bgr = rs.randint(0, 256, (6, 5, 3)).astype(np.uint8)
    gray = rs.randint(0, 256, (6, 5)).astype(np.uint8)
    bgra = rs.randint(0, 256, (6, 5, 4)).astype(np.uint8)
    deep = rs.randint(0, 65536, (6, 5, 3)).astype(np.uint16)
    paths = {}
    for name, img in [('bgr', bgr), ('gray', gray), ('bgra', bgra), ('deep', deep)]:
        paths[name] = str(tmp_path / (name + '.png'))
        assert cv2.imwrite(paths[name], img)

    out = read_image(paths['bgr'], 3, 'BGR')
    assert out.dtype == np.float32 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, bgr)
    np.testing.assert_array_equal(read_image(paths['bgr'], 3, 'RGB'), bgr[:, :, ::-1])
    np.testing.assert_array_equal(read_image(paths['gray'], 3, 'BGR'),
                                  np.repeat(gray[:, :, None], 3, 2))
    np.testing.assert_array_equal(read_image(paths['gray'], 1, 'BGR'), gray[:, :, None])
    np.testing.assert_allclose(read_image(paths['bgr'], 1, 'BGR')[:, :, 0],
                               cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), atol=0.5)
    np.testing.assert_array_equal(read_image(paths['bgra'], 3, 'BGR'), bgra[:, :, :3])
    rgbd = read_image(paths['bgra'], 4, 'RGB')
    assert rgbd.shape == (6, 5, 4)
    np.testing.assert_array_equal(rgbd[:, :, :3], bgra[:, :, 2::-1])
    np.testing.assert_array_equal(rgbd[:, :, 3], bgra[:, :, 3])
    out16 = read_image(paths['deep'], 3, 'BGR')
    np.testing.assert_allclose(out16, deep / 257., rtol=1e-6)
    assert out16.max() <= 255.


def test_read_image_errors(tmp_path):
    missing = str(tmp_path / 'missing.png')
    with pytest.raises(ImageReadError, match='missing.png.*no such file'):
        read_image(missing, 3, 'BGR')
    corrupt = tmp_path / 'corrupt.png'
    corrupt.write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    with pytest.raises(ImageReadError, match='corrupt.png'):
        read_image(str(corrupt), 3, 'BGR')
    three = str(tmp_path / 'three.png')
    cv2.imwrite(three, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageReadError, match='three.png.*expects 4'):
        read_image(three, 4, 'BGR')


# ---------------------------------------------------------------------------- geometry

def test_resize_shortest_edge_and_box_scale():
    img = np.zeros((100, 300, 3), np.float32)
    out, (sy, sx) = common.resize_shortest_edge(img, 50, 1000)
    assert out.shape == (50, 150, 3) and (sy, sx) == (0.5, 0.5)
    out, (sy, sx) = common.resize_shortest_edge(img, 80, 200)  # long edge capped
    assert out.shape == (67, 200, 3)
    assert (sy, sx) == (67 / 100, 200 / 300)
    np.testing.assert_allclose(common.scale_boxes(np.float32([[0, 0, 300, 100]]), sy, sx),
                               [[0, 0, 200, 67]], rtol=1e-6)
    gray, _ = common.resize_shortest_edge(np.zeros((10, 20, 1), np.float32), 5, 100)
    assert gray.shape == (5, 10, 1)


def test_flip_boxes_polygons_match_flipped_mask():
    h, w = 40, 50
    polys = [np.float32([[3, 4], [30, 4], [20, 33], [3, 20]])]
    fpolys = common.flip_polygons([polys], w)[0]
    np.testing.assert_array_equal(full_mask(fpolys, h, w), full_mask(polys, h, w)[:, ::-1])
    box = np.float32([[3, 4, 30, 33]])
    fbox = common.flip_boxes(box, w)
    np.testing.assert_array_equal(fbox, [[w - 30, 4, w - 3, 33]])
    np.testing.assert_array_equal(fbox[0, [0, 2]], [fpolys[0][:, 0].min(), fpolys[0][:, 0].max()])


def test_box_frame_mask_matches_croppedfull_mask():
    # Integer box and M = box size: the box-frame bitmap IS the crop of the full mask.
    poly = np.float32([[12, 10], [40, 16], [30, 38], [14, 30]])
    box = np.float32([12, 10, 40, 38])
    full = full_mask([poly], 60, 60)
    exact = common.polygons_to_box_frame_mask([poly], box, 28)
    assert exact.dtype == np.uint8 and exact.shape == (28, 28)
    np.testing.assert_array_equal(exact, full[10:38, 12:40])
    # Fractional box, different resolution: agrees with the full mask sampled at each bitmap
    # pixel's centre up to boundary pixels.
    poly = np.float32([[10.3, 7.6], [57.2, 20.1], [33.7, 51.9], [12.8, 40.4]])
    box = np.float32([10.3, 7.6, 57.2, 51.9])
    full = full_mask([poly], 60, 60)
    m = 20
    xs = (box[0] + (np.arange(m) + 0.5) * (box[2] - box[0]) / m).astype(int)
    ys = (box[1] + (np.arange(m) + 0.5) * (box[3] - box[1]) / m).astype(int)
    sampled = full[ys[:, None], xs[None, :]]
    mask = common.polygons_to_box_frame_mask([poly], box, m)
    assert mask.sum() > 0.4 * m * m
    assert (mask == sampled).mean() > 0.93
    # No polygon (detection-only data): the whole box; 2-point polygons are ignored.
    assert common.polygons_to_box_frame_mask([], box, 4).all()
    assert common.polygons_to_box_frame_mask([np.float32([[0, 0], [5, 5]])], box, 4).all()
