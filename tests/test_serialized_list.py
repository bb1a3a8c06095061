"""utils.serialized_list.SerializedList: records round-trip, list semantics, one buffer."""
import numpy as np
import pytest

from utils.serialized_list import SerializedList


def roidb(i):
    """A roidb-like record: arrays, polygons, a crowd RLE dict, strings."""
    rng = np.random.default_rng(i)
    n = int(rng.integers(0, 5))
    return {'file_name': '/data/{}.jpg'.format(i), 'image_id': i, 'height': 480,
            'width': 640, 'boxes': rng.uniform(0, 400, (n, 4)).astype(np.float32),
            'class': rng.integers(1, 81, n).astype(np.int32),
            'is_crowd': np.zeros(n, dtype=np.int8),
            'segmentation': [[rng.uniform(0, 400, (k + 3, 2)).astype(np.float32)]
                             for k in range(n)] + [{'size': [480, 640], 'counts': [5, 7, 9]}]}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
    assert len(a['segmentation']) == len(b['segmentation'])
    for sa, sb in zip(a['segmentation'], b['segmentation']):
        if isinstance(sa, dict):
            assert sa == sb
        else:
            for pa, pb in zip(sa, sb):
                np.testing.assert_array_equal(pa, pb)


def test_round_trip_and_list_semantics():
    records = [roidb(i) for i in range(50)]
    lst = SerializedList(iter(records))  # any iterable, consumed once
    assert len(lst) == 50
    for i in (0, 1, 17, 49):
        assert_same(lst[i], records[i])
    assert_same(lst[-1], records[49])
    assert_same(lst[np.int64(3)], records[3])  # DataFromList indexes with numpy ints
    for got, want in zip(lst, records):
        assert_same(got, want)
    assert sum(1 for _ in lst) == 50
    for bad in (50, -51):
        with pytest.raises(IndexError):
            lst[bad]


def test_items_are_writable_independent_copies():
    lst = SerializedList([roidb(3)])
    first = lst[0]
    first['boxes'][:] = -1  # the preprocessor may write to what it gets
    first['segmentation'][0][0][:] = -1
    again = lst[0]
    assert_same(again, roidb(3))
    assert again['boxes'] is not first['boxes']


def test_one_buffer_not_python_objects_per_record():
    records = [roidb(i) for i in range(200)]
    lst = SerializedList(records)
    # Its whole state: one uint8 buffer and one offsets array, whatever the record count.
    state = vars(lst)
    assert len(state) == 2 and all(isinstance(v, np.ndarray) for v in state.values())
    assert {v.dtype for v in state.values()} == {np.dtype(np.uint8), np.dtype(np.int64)}
    raw = sum(r['boxes'].nbytes + sum(p.nbytes for s in r['segmentation'] if isinstance(s, list)
                                      for p in s) for r in records)
    assert raw < lst.nbytes < raw + 1000 * len(records)  # bounded per-record overhead


def test_empty():
    lst = SerializedList([])
    assert len(lst) == 0 and list(lst) == [] and lst.nbytes == 0
    with pytest.raises(IndexError):
        lst[0]
