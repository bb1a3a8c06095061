"""Annotation checker: what would make training fail, or silently learn from bad data.

    python -m dataset.check --config DATA.BASEDIR=... DATA.TRAIN=... [DATA.VAL=...] \\
        [--output-dir DIR] [--names NAME ...] [--decode]

Writes ``<output-dir>/<name>_warnings.json`` per split and prints one table row per problem
kind. Per-image problems are warnings (exit status 0); only a split that cannot be used
(annotation file missing or unparseable, no categories, no usable image) exits with 1.
COCO-json splits are checked on their raw json, to report what the loader silently drops
or repairs; other splits on their roidbs. Boxes are x1y1x2y2 in absolute pixels, pixel i
covering [i, i+1); a json ``bbox`` [x, y, w, h] is converted first. Image sizes come from
the PNG IHDR / JPEG SOFn header (cv2 decodes other formats, or all with ``--decode``), and
truncation from the end markers: truncated files often still decode, with a grey bottom.
"""
import argparse
import concurrent.futures
import json
import logging
import os
import sys

import cv2
import numpy as np

from config import ConfigError, config as cfg

from . import register_builtin_datasets
from .coco import COCODetection, unused_categories
from .dataset import DatasetRegistry

__all__ = ['KINDS', 'check_dataset', 'write_report', 'format_summary', 'check_and_report',
           'image_size_from_header', 'main']

# Problem kind -> what it means; the summary table shows them in this order.
KINDS = {
    'image_missing': 'image file does not exist',
    'image_unreadable': 'image file cannot be decoded (corrupt or not an image)',
    'image_truncated': 'image file lacks its end marker (PNG IEND / JPEG FFD9): cut short',
    'image_size_mismatch': 'height/width in the annotations differ from the image file',
    'image_no_annotations': 'image has no usable annotation (filtered from training)',
    'duplicate_image_id': 'image id used by more than one image (json)',
    'annotation_missing_image': "annotation's image_id is not in 'images' (json; dropped)",
    'duplicate_annotation_id': 'annotation id used more than once (json)',
    'annotation_malformed': 'bbox missing or not 4 numbers [x, y, w, h] (json)',
    'unknown_category': 'category id not in the categories (dropped by the loader)',
    'category_unused': 'category no annotation uses (DATA.DROP_UNUSED_CATEGORIES drops it)',
    'box_degenerate': 'box width or height under 1 pixel (dropped by the loader)',
    'box_outside_image': 'box entirely outside the image (dropped by the loader)',
    'box_partly_outside_image': 'box crosses the image border by over 1 pixel (clipped)',
    'polygon_malformed': 'polygon not a list of an even number of coordinates',
    'polygon_too_few_points': 'polygon with fewer than 3 points (dropped by the loader)',
    'polygon_zero_area': 'polygon with zero area (all points on a line)',
    'polygon_outside_box': 'polygon extends outside its box by over 1 pixel',
}

TOLERANCE = 1.0        # pixels a box may overrun the image, or a polygon its box
MIN_BOX_SIZE = 1.0     # the COCO loader drops boxes narrower or lower than this
MIN_POLYGON_AREA = 1e-2  # square pixels; below it a polygon has no interior
NUM_EXAMPLES = 3       # example images per kind in the printed summary
_TAIL_BYTES = 1024     # end markers are searched in this many trailing bytes
_IO_THREADS = 8        # image probing is I/O bound (network file systems)
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# JPEG start-of-frame markers (SOF0-15 minus DHT C4, JPG C8, DAC CC) hold the image size.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01} | set(range(0xD0, 0xD8))  # markers without a length field


# ---------------------------------------------------------------------------- images
def _jpeg_header_size(f):
    """Walk the JPEG marker segments of open file ``f`` (after SOI) to the first SOFn.
    Returns (height, width), or None if the segments are malformed or the height is 0
    (defined later by a DNL marker)."""
    while f.read(1) == b'\xff':  # segments follow each other: anything else is corruption
        marker = f.read(1)
        while marker == b'\xff':  # fill bytes
            marker = f.read(1)
        if not marker or marker[0] in (0xD8, 0xD9, 0xDA):  # SOI/EOI/scan before a frame
            return None
        if marker[0] in _JPEG_STANDALONE:
            continue
        length = int.from_bytes(f.read(2), 'big')
        if marker[0] in _JPEG_SOF:
            data = f.read(5)  # precision (1), height (2), width (2)
            h, w = int.from_bytes(data[1:3], 'big'), int.from_bytes(data[3:5], 'big')
            return (h, w) if len(data) == 5 and h and w else None
        if length < 2:
            return None
        f.seek(length - 2, os.SEEK_CUR)
    return None


def image_size_from_header(path):
    """(height, width) of a PNG or JPEG file from its header only, or None (another format
    or an unparseable header). EXIF orientation is ignored, as by the training reader
    (cv2.IMREAD_UNCHANGED)."""
    with open(path, 'rb') as f:
        head = f.read(24)
        if head.startswith(_PNG_SIGNATURE) and head[12:16] == b'IHDR':
            return int.from_bytes(head[20:24], 'big'), int.from_bytes(head[16:20], 'big')
        if head.startswith(b'\xff\xd8'):
            f.seek(2)
            return _jpeg_header_size(f)
    return None


def _truncation(path):
    """Detail string if a PNG / JPEG file lacks its end marker near its end, else None."""
    with open(path, 'rb') as f:
        head = f.read(8)
        f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL_BYTES))
        tail = f.read()
    if head.startswith(_PNG_SIGNATURE) and b'IEND' not in tail:
        return f'no PNG IEND chunk in the last {_TAIL_BYTES} bytes'
    if head.startswith(b'\xff\xd8') and b'\xff\xd9' not in tail:
        return f'no JPEG end-of-image marker (FFD9) in the last {_TAIL_BYTES} bytes'
    return None


def _probe_image(path, decode):
    """Check one image file. Returns ((height, width) or None, None or (kind, detail))."""
    if not os.path.isfile(path):
        return None, ('image_missing', 'no such file')
    if os.path.getsize(path) == 0:
        return None, ('image_unreadable', 'empty file')
    try:
        size = None if decode else image_size_from_header(path)
        truncated = _truncation(path)
    except OSError as e:  # e.g. no permission
        return None, ('image_unreadable', str(e))
    if size is None:
        try:
            img = cv2.imread(path, cv2.IMREAD_UNCHANGED)  # the training reader's flags
        except cv2.error:  # some decoders raise instead of returning None
            img = None
        if img is None or img.size == 0:  # name the cause when it is known
            return None, (('image_truncated', truncated + '; cv2.imread cannot decode it')
                          if truncated else ('image_unreadable', 'cv2.imread cannot decode it'))
        size = (int(img.shape[0]), int(img.shape[1]))
    return size, (('image_truncated', truncated) if truncated else None)


# ---------------------------------------------------------------------------- records
# A record is one image to check: image_id, file, height/width (annotated, or None),
# ann_ids (N), boxes float64 [N, 4] x1y1x2y2, polygons (N lists of (K, 2) arrays; an
# RLE or missing mask gives []), num_raw (annotations before loading) and num_usable
# (non-crowd instances the loader keeps).

def _add(report, kind, image_id, file, detail, annotation=None):
    assert kind in KINDS, kind
    report['problems'].setdefault(kind, []).append(
        {'image_id': image_id, 'file': file, 'annotation': annotation, 'detail': detail})


def _json_polygons(segm, add):
    """A json segmentation -> list of (K, 2) float64 arrays; RLE or none gives []."""
    if not isinstance(segm, list):
        return []
    if not all(isinstance(p, list) for p in segm):
        add('polygon_malformed', 'segmentation is not a list of [x1, y1, x2, y2, ...] lists')
        return []
    polys = []
    for j, p in enumerate(segm):
        try:
            arr = np.asarray(p, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.size % 2:
            add('polygon_malformed', f'polygon {j} is not a flat list of x, y numbers')
            continue
        polys.append(arr.reshape(-1, 2))
    return polys


def _coco_records(split, report):
    """Records from the raw json of a COCODetection (json-level checks done here)."""
    with open(split.json_file) as f:
        data = json.load(f)
    category_ids = {c.get('id') for c in data.get('categories', [])}
    for c in unused_categories(data):
        _add(report, 'category_unused', None, split.json_file,
             f"category {c['id']} {c.get('name')!r} has no annotation")
    records, by_id = [], {}
    for img in data.get('images', []):
        file = os.path.join(split.image_dir, str(img.get('file_name', '')))
        if img.get('id') in by_id:
            _add(report, 'duplicate_image_id', img.get('id'), file,
                 f"also used by {by_id[img.get('id')]['file']}; this image gets no annotation")
            continue
        rec = {'image_id': img.get('id'), 'file': file, 'height': img.get('height'),
               'width': img.get('width'), 'ann_ids': [], 'boxes': [], 'polygons': [],
               'num_raw': 0, 'num_usable': 0}
        by_id[rec['image_id']] = rec
        records.append(rec)
    seen_ann_ids = set()
    for k, ann in enumerate(data.get('annotations', [])):
        ann_id = ann.get('id', f'index {k}')
        rec = by_id.get(ann.get('image_id'))
        file = rec['file'] if rec else None
        if ann_id in seen_ann_ids:
            _add(report, 'duplicate_annotation_id', ann.get('image_id'), file,
                 f'annotation id {ann_id} (index {k}) was used before', ann_id)
        seen_ann_ids.add(ann_id)
        if rec is None:
            _add(report, 'annotation_missing_image', ann.get('image_id'), None,
                 f"image_id {ann.get('image_id')!r} is not in 'images'", ann_id)
            continue
        rec['num_raw'] += 1
        if ann.get('category_id') not in category_ids:
            _add(report, 'unknown_category', rec['image_id'], file, f'category_id '
                 f"{ann.get('category_id')!r} is none of the {len(category_ids)} categories",
                 ann_id)
        try:
            x, y, w, h = (float(v) for v in ann['bbox'])
        except (KeyError, TypeError, ValueError):
            _add(report, 'annotation_malformed', rec['image_id'], file,
                 f"bbox {ann.get('bbox')!r} is not [x, y, w, h]", ann_id)
            continue
        rec['ann_ids'].append(ann_id)
        rec['boxes'].append([x, y, x + w, y + h])
        rec['polygons'].append(_json_polygons(ann.get('segmentation'), lambda kind, d: _add(
            report, kind, rec['image_id'], file, d, ann_id)))
    usable = {}
    try:
        for r in split.training_roidbs():  # a duplicate image id: the first image has anns
            usable.setdefault(r['image_id'], int(np.sum(np.asarray(r['is_crowd']) == 0)))
    except (KeyError, TypeError, ValueError, IndexError) as e:  # keep the findings above
        report['fatal'].append(f'the loader fails on {split.json_file}: '
                               f'{type(e).__name__}: {e}')
        usable = {r['image_id']: r['num_raw'] for r in records}
    for rec in records:
        rec['num_usable'] = usable.get(rec['image_id'], 0)
    report['num_annotations'] = len(data.get('annotations', []))
    return records


def _roidb_records(split, num_classes, report):
    """Records from the roidbs of any other split (class ids checked against 1..C)."""
    records, seen = [], {}
    for rdb in split.training_roidbs():
        image_id, file = rdb['image_id'], rdb['file_name']
        if isinstance(image_id, np.generic):  # json cannot hold NumPy scalars
            image_id = image_id.item()
        if image_id in seen:
            _add(report, 'duplicate_image_id', image_id, file, f'also used by {seen[image_id]}')
        seen[image_id] = file
        boxes = np.asarray(rdb['boxes'], dtype=np.float64).reshape(-1, 4)
        classes = np.asarray(rdb['class']).reshape(-1)
        for i in np.flatnonzero((classes < 1) | (classes > num_classes)):
            _add(report, 'unknown_category', image_id, file,
                 f'class {int(classes[i])} not in 1..{num_classes}', int(i))
        segms = rdb.get('segmentation') or [[] for _ in boxes]
        crowd = np.asarray(rdb.get('is_crowd', np.zeros(len(boxes)))).reshape(-1)
        records.append({
            'image_id': image_id, 'file': file, 'height': rdb.get('height'),
            'width': rdb.get('width'), 'ann_ids': list(range(len(boxes))), 'boxes': boxes,
            'polygons': [[] if isinstance(s, dict) else
                         [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in s]
                         for s in segms],
            'num_raw': len(boxes), 'num_usable': int(np.sum(crowd == 0))})
    report['num_annotations'] = sum(r['num_raw'] for r in records)
    return records


# ---------------------------------------------------------------------------- checks
def _check_boxes(report, rec, size):
    """Box checks of one image, vectorised over its N boxes. Returns bool [N]: degenerate."""
    boxes = np.asarray(rec['boxes'], dtype=np.float64).reshape(-1, 4)
    ids, img_id, file = rec['ann_ids'], rec['image_id'], rec['file']
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    degenerate = (w < MIN_BOX_SIZE) | (h < MIN_BOX_SIZE)
    for i in np.flatnonzero(degenerate):
        _add(report, 'box_degenerate', img_id, file,
             f'box {boxes[i].round(2).tolist()} is {w[i]:g} x {h[i]:g} pixels', ids[i])
    if size is not None:
        height, width = size
        x1, y1, x2, y2 = boxes.T
        outside = (x1 >= width) | (x2 <= 0) | (y1 >= height) | (y2 <= 0)
        partly = ~outside & ((x1 < -TOLERANCE) | (y1 < -TOLERANCE) |
                             (x2 > width + TOLERANCE) | (y2 > height + TOLERANCE))
        for kind, mask in (('box_outside_image', outside), ('box_partly_outside_image', partly)):
            for i in np.flatnonzero(mask & ~degenerate):
                _add(report, kind, img_id, file, f'box {boxes[i].round(2).tolist()} in a '
                     f'{width} x {height} image (x1y1x2y2)', ids[i])
    return degenerate


def _check_polygons(report, rec, degenerate):
    """Polygon checks of one image, vectorised over all its polygons' points."""
    ids, img_id, file = rec['ann_ids'], rec['image_id'], rec['file']
    pts, owner, lengths = [], [], []
    for i, polys in enumerate(rec['polygons']):
        for j, p in enumerate(polys):
            if len(p) < 3:
                _add(report, 'polygon_too_few_points', img_id, file,
                     f'polygon {j} has {len(p)} point(s)', ids[i])
                continue
            pts.append(p)
            owner.append(np.full(len(p), i))
            lengths.append(len(p))
    if not pts:
        return
    pts, owner, lengths = np.concatenate(pts), np.concatenate(owner), np.asarray(lengths)
    starts = np.cumsum(lengths) - lengths
    # Shoelace over all polygons at once: each point's successor, wrapping per polygon.
    nxt = np.arange(1, len(pts) + 1)
    nxt[starts + lengths - 1] = starts
    cross = pts[:, 0] * pts[nxt, 1] - pts[nxt, 0] * pts[:, 1]
    areas = 0.5 * np.abs(np.add.reduceat(cross, starts))
    for k in np.flatnonzero(areas < MIN_POLYGON_AREA):
        _add(report, 'polygon_zero_area', img_id, file,
             f'polygon of {lengths[k]} points has area {areas[k]:.3g}', ids[owner[starts[k]]])
    boxes = np.asarray(rec['boxes'], dtype=np.float64).reshape(-1, 4)
    # how far each point lies outside its own box (<= 0 inside)
    excess = np.maximum(boxes[owner, :2] - pts, pts - boxes[owner, 2:]).max(axis=1)
    worst = np.zeros(len(boxes))
    np.maximum.at(worst, owner, excess)
    for i in np.flatnonzero((worst > TOLERANCE) & ~degenerate):
        _add(report, 'polygon_outside_box', img_id, file, f'a point lies {worst[i]:.1f} '
             f'pixels outside box {boxes[i].round(2).tolist()} (x1y1x2y2)', ids[i])


def _check_record(report, rec, probe):
    """All checks of one image; returns True if it can be trained on."""
    size, problem = probe
    img_id, file = rec['image_id'], rec['file']
    if problem:
        _add(report, problem[0], img_id, file, problem[1])
    annotated = (rec['height'], rec['width'])
    if size is not None and None not in annotated and tuple(map(int, annotated)) != size:
        _add(report, 'image_size_mismatch', img_id, file,
             f'annotated {annotated[0]} x {annotated[1]} (h x w), file is {size[0]} x {size[1]}')
    if size is None and None not in annotated:
        size = tuple(map(int, annotated))
    degenerate = _check_boxes(report, rec, size)
    _check_polygons(report, rec, degenerate)
    if rec['num_usable'] == 0:
        _add(report, 'image_no_annotations', img_id, file, 'no annotation' if not rec['num_raw']
             else f"none of its {rec['num_raw']} annotations is usable (dropped or crowd)")
    return problem is None and rec['num_usable'] > 0


def check_dataset(name, decode=False):
    """Check one registered split.

    Args:
        name (str): a name registered in `DatasetRegistry`.
        decode (bool): decode every image with cv2 (slow; also finds corruption inside
            files) instead of reading PNG / JPEG headers and end markers only.
    Returns:
        dict: ``dataset``, ``num_images``, ``num_annotations``, ``fatal`` (messages; any
        means the split cannot be used), ``problems`` (kind in `KINDS` -> list of ``{"image_id",
        "file", "annotation", "detail"}``; ``annotation``: the json annotation id (COCO), the
        instance index (roidb), None for image- and category-level problems) and ``meaning``.
    """
    report = {'dataset': name, 'num_images': 0, 'num_annotations': 0, 'fatal': [],
              'problems': {}, 'meaning': {}}
    try:
        split = DatasetRegistry.get(name)
        class_names = DatasetRegistry.get_metadata(name, 'class_names')
        if isinstance(split, COCODetection):
            records = _coco_records(split, report)
        else:
            records = _roidb_records(split, len(class_names), report)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        # a user-caused problem (path, json, registry): one line, no traceback
        report['fatal'].append(f'cannot load dataset {name!r}: {e}')
        return report
    if not class_names:
        report['fatal'].append(f'dataset {name!r} has no categories')
    report['num_images'] = len(records)
    if not records:
        report['fatal'].append(f'dataset {name!r} has no images')
        return report
    with concurrent.futures.ThreadPoolExecutor(_IO_THREADS) as pool:
        probes = pool.map(lambda r: _probe_image(r['file'], decode), records)
        usable = sum(_check_record(report, rec, p) for rec, p in zip(records, probes))
    if not usable:
        report['fatal'].append(f'dataset {name!r}: no usable image (none of {len(records)} '
                               'images is a readable file with a usable annotation)')
    report['problems'] = {k: report['problems'][k] for k in KINDS if k in report['problems']}
    report['meaning'] = {k: KINDS[k] for k in report['problems']}  # a self-describing file
    return report


# ---------------------------------------------------------------------------- output
def write_report(report, path):
    """Write a `check_dataset` report as json (folders created as needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(report, f, indent=1)


def format_summary(report):
    """A text table: one row per problem kind found, with its count and a few examples."""
    lines = [f"== {report['dataset']}: {report['num_images']} images, "
             f"{report['num_annotations']} annotations"]
    lines += [f'FATAL: {m}' for m in report['fatal']]
    if not report['problems']:
        return '\n'.join(lines + ([] if report['fatal'] else ['no problems found']))
    width = max(len(k) for k in report['problems'])
    lines.append(f"{'kind':<{width}}  {'count':>6}  examples (image id: file)")
    for kind, entries in report['problems'].items():
        examples = ', '.join(e['detail'] if e['image_id'] is None else  # category-level
                             f"{e['image_id']}: {os.path.basename(e['file'] or '-')}"
                             for e in entries[:NUM_EXAMPLES])
        lines.append(f'{kind:<{width}}  {len(entries):>6}  {examples}')
    return '\n'.join(lines)


def check_and_report(names, output_dir, decode=False):
    """Check ``names``, write ``<output_dir>/<name>_warnings.json``, print the summaries;
    return the exit status: 1 if any split has a fatal problem, else 0. For splits
    registered in your own code, call this after registering them."""
    status = 0
    for name in names:
        report = check_dataset(name, decode=decode)
        path = os.path.join(output_dir, f'{name}_warnings.json')
        write_report(report, path)
        print(format_summary(report))
        print(f'details: {path}\n')
        for msg in report['fatal']:
            print(f'Error: {msg}', file=sys.stderr)
            status = 1
    return status


def main(argv=None):
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog='python -m dataset.check', description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. DATA.BASEDIR=~/coco DATA.TRAIN=coco_val2017')
    parser.add_argument('--names', nargs='+', help='datasets (default: DATA.TRAIN, DATA.VAL)')
    parser.add_argument('--output-dir', default='.', help='where <name>_warnings.json go')
    parser.add_argument('--decode', action='store_true', help='decode every image (slow)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    try:
        cfg.update_args(args.config)
        register_builtin_datasets(os.path.expanduser(cfg.DATA.BASEDIR), cfg.DATA.COCO_JSON_SPLITS,
                                  cfg.DATA.TRAIN, cfg.DATA.DROP_UNUSED_CATEGORIES)
    except (ConfigError, OSError, ValueError) as e:  # DatasetError and the registry's too
        print(f'Error: {e}', file=sys.stderr)
        return 1
    names = args.names or list(dict.fromkeys(list(cfg.DATA.TRAIN) + list(cfg.DATA.VAL)))
    return check_and_report(names, args.output_dir, decode=args.decode)


if __name__ == '__main__':
    sys.exit(main())
