#!/usr/bin/env python
"""Run a trained model: predict on images, evaluate, benchmark, visualise, export.

    python predict.py --load train_log/maskrcnn --predict img.jpg photos/ 'more/*.png'
    python predict.py --load train_log/maskrcnn --evaluate results.json
    horovodrun -np 8 -H localhost:8 python predict.py --load train_log/maskrcnn --evaluate r.json
    python predict.py --load model.npz --benchmark 50
    python predict.py --load train_log/maskrcnn --visualize 10
    python predict.py --load train_log/maskrcnn --export-savedmodel export/ --export-pb model.pb
    python predict.py --load train_log/maskrcnn --precision auto --benchmark 20

--export-savedmodel / --export-pb write the model end to end (original images in,
detections in their pixels out, masks pasted): plain TensorFlow can serve them (export.py,
README "Serving"). --precision sets TRAIN.PRECISION for this run ('auto': bf16 where the CPU
has AMX or AVX512-BF16 units, else fp32; with bf16 the exports carry the bf16 rewrite).

--load takes a checkpoint directory (its latest checkpoint), a checkpoint prefix or an .npz.
The config is the training run's own (the config.yaml that train.py wrote next to the
checkpoint) unless --config-file is given; --config overrides apply on top. Keys that
run's config.yaml lacks (written before they existed) keep the behaviour it was trained
with (config.LEGACY_VALUES, e.g. the anchor layout). Images are read
exactly as in training (common.read_image), in the channel order the model was trained on.

Exit status: 1 with one "Error: ..." line (as train.py) for a bad config, --load path,
dataset name or existing --export-savedmodel folder; with --predict,
1 when no input could be processed and 0 otherwise (unreadable inputs are reported on the
way and listed again at the end).
"""
import utils.compat  # noqa: F401  (must come before TensorFlow)

import argparse
import glob
import json
import os
import sys

from cli import USER_ERRORS, add_config_arguments, setup_config, training_config_file
from config import config as cfg

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--load', required=True,
                   help='weights: a checkpoint directory or prefix, or an .npz file')
    add_config_arguments(p)
    p.add_argument('--predict', nargs='+', metavar='PATH',
                   help='image files, folders and globs; one overlay PNG each in --output')
    p.add_argument('--output', default='predictions', help='folder for --predict / --visualize')
    p.add_argument('--json', action='store_true',
                   help='with --predict, also write <name>.json with the detections')
    p.add_argument('--evaluate', metavar='OUT.json',
                   help='evaluate on cfg.DATA.VAL and write COCO-format results here')
    p.add_argument('--benchmark', type=int, metavar='N',
                   help='time N images (from --predict, else the first DATA.VAL set)')
    p.add_argument('--batch-size', type=int, default=1, metavar='N',
                   help='images per graph run for --predict, --evaluate and --benchmark '
                        '(results equal those of one image at a time)')
    p.add_argument('--visualize', type=int, metavar='N',
                   help='panels of ground truth | proposals | predictions for N training images')
    p.add_argument('--export-savedmodel', metavar='DIR', help='write a SavedModel to DIR')
    p.add_argument('--export-pb', metavar='FILE', help='write a frozen GraphDef to FILE')
    p.add_argument('--precision', choices=('fp32', 'bf16', 'fp16', 'auto'),
                   help='sets TRAIN.PRECISION for prediction (default: the config\'s); auto: '
                        'bf16 on CPUs with AMX / AVX512-BF16, else fp32')
    args = p.parse_args(argv)
    if not any([args.predict, args.evaluate, args.benchmark, args.visualize,
                args.export_savedmodel, args.export_pb]):
        p.error('nothing to do: give --predict, --evaluate, --benchmark, --visualize, '
                '--export-savedmodel or --export-pb')
    return args


def expand_inputs(patterns):
    """Files, folders (their images, sorted) and globs -> (existing paths, [(pattern, reason)])."""
    paths, seen, missing = [], set(), []
    for given in patterns:
        pattern = os.path.expanduser(given)  # a quoted glob keeps its '~' from the shell
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            reason = 'folder without images'
        elif os.path.isfile(pattern):
            found, reason = [pattern], None
        else:
            found = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
            reason = 'no such file'
        if found:
            paths.extend(f for f in found if f not in seen)
            seen.update(found)
        else:
            missing.append((given, reason))
    return paths, missing


def output_stems(paths):
    """A distinct output name per input: its file stem, with -2, -3 ... on collisions."""
    stems, used = [], set()
    for path in paths:
        base = stem = os.path.splitext(os.path.basename(path))[0]
        k = 1
        while stem in used:
            k += 1
            stem = '{}-{}'.format(base, k)
        used.add(stem)
        stems.append(stem)
    return stems


def predict_config(weights, extra_outputs=(), batch_size=1):
    """The PredictConfig of the configured model for ``batch_size`` images per run (its
    outputs `eval_batch.batch_output_names` when more than one); ``weights``: a
    utils.training.WeightsLoader (None: freshly initialised weights, e.g. for
    benchmarks). Its session comes from
    `utils.precision.session_creator` (threads, TRAIN.PRECISION's graph rewrite); under
    horovodrun each rank takes its share of the cores and its local GPU."""
    from tensorpack import PredictConfig

    from eval import get_inference_output_names
    from eval_batch import batch_output_names
    from modeling.generalized_rcnn import build_model, model_input_names
    from utils.distributed import horovod_local_rank_size
    from utils.precision import session_creator
    model = build_model(images=batch_size)
    names = get_inference_output_names() + list(extra_outputs)
    if batch_size > 1:
        names = batch_output_names(names, batch_size)
    local_rank, local_size = horovod_local_rank_size()
    # all cores (tensorpack's default is 1 intra-op thread) and TRAIN.PRECISION's rewrite
    creator = session_creator(cfg.TRAIN.PRECISION, processes_per_machine=local_size)
    if local_size > 1 and cfg.TRAIN.NUM_GPUS > 0:  # one GPU per rank, as HorovodTrainer does
        creator.config.gpu_options.visible_device_list = str(local_rank)
    return PredictConfig(
        model=model, session_init=weights,
        input_names=model_input_names(False, batch_size), output_names=names,
        session_creator=creator)


def _batched(predictor, batch_size, num_outputs):
    from eval_batch import BatchModel
    return predictor if batch_size == 1 else BatchModel(predictor, batch_size, num_outputs)


def build_predictor(weights, extra_outputs=(), batch_size=1):
    """An OfflinePredictor of `predict_config`; with ``batch_size`` > 1 in a
    `eval_batch.BatchModel`.

    Raises:
        KeyError: an output name (e.g. of ``extra_outputs``) is not in the graph.
    """
    from tensorpack import OfflinePredictor

    from eval import get_inference_output_names
    predictor = OfflinePredictor(predict_config(weights, extra_outputs, batch_size))
    return _batched(predictor, batch_size,
                    len(get_inference_output_names()) + len(extra_outputs))


def build_gpu_predictors(weights, num_gpus, batch_size=1):
    """One predictor per GPU, sharing one set of weights (evaluation split over GPUs)."""
    from tensorpack.predict import MultiTowerOfflinePredictor

    from eval import get_inference_output_names
    towers = MultiTowerOfflinePredictor(predict_config(weights, batch_size=batch_size),
                                        list(range(num_gpus))).get_predictors()
    return [_batched(t, batch_size, len(get_inference_output_names())) for t in towers]


def class_category_ids():
    """The dataset's own category id of each class 1..C: the training json's ids (registered
    metadata ``category_ids``), else the class ids (datasets without ids of their own)."""
    from dataset import DatasetRegistry, DatasetRegistryError
    try:
        ids = list(DatasetRegistry.get_metadata(cfg.DATA.TRAIN[0], 'category_ids'))
    except DatasetRegistryError:
        ids = []
    return ids if len(ids) == cfg.DATA.NUM_CATEGORY else list(range(1, cfg.DATA.NUM_CATEGORY + 1))


def detections_json(path, img, results):
    """JSON-ready record of one image's detections (original-image pixels): per detection
    ``category_id`` (the dataset's own id), ``class_id`` (contiguous 1..C), ``class_name``."""
    from eval import detection_to_dict
    category_ids, dets = class_category_ids(), []
    for r in results:
        d = detection_to_dict(r, None)
        dets.append({'category_id': category_ids[r.class_id - 1], 'class_id': d['category_id'],
                     'class_name': cfg.DATA.CLASS_NAMES[r.class_id],
                     'score': d['score'], 'box_x1y1x2y2': d['bbox'],
                     **({'segmentation': d['segmentation']} if 'segmentation' in d else {})})
    return {'file': path, 'height': img.shape[0], 'width': img.shape[1], 'detections': dets}


def _readable_images(paths, stems, failures):
    """Yield (path, stem, image) of each readable path; the others go to ``failures``."""
    from common import ImageReadError, read_image
    for path, stem in zip(paths, stems):
        try:
            yield path, stem, read_image(path)
        except ImageReadError as e:
            print(e)
            failures.append((path, e.reason))


def _write_prediction(args, path, stem, img, results):
    """The overlay PNG (and JSON) of one image's results; prints a line about it."""
    import cv2

    from viz import draw_predictions, to_display_bgr
    overlay = draw_predictions(to_display_bgr(img, cfg.PREPROC.CHANNEL_ORDER), results,
                               cfg.DATA.CLASS_NAMES, cfg.TEST.RESULT_SCORE_THRESH_VIS)
    out = os.path.join(args.output, stem + '.png')
    cv2.imwrite(out, overlay)
    if args.json:
        with open(os.path.join(args.output, stem + '.json'), 'w') as f:
            json.dump(detections_json(path, img, results), f)
    drawn = sum(r.score >= cfg.TEST.RESULT_SCORE_THRESH_VIS for r in results)
    print('{}: {} detections, {} drawn (score >= {}) -> {}'.format(
        path, len(results), drawn, cfg.TEST.RESULT_SCORE_THRESH_VIS, out))


def run_predict(args, predictor):
    """--predict: one overlay PNG (and JSON) per input, --batch-size images per graph run;
    returns the number that worked."""
    import itertools

    from eval import predict_images
    paths, failures = expand_inputs(args.predict)
    for pattern, reason in failures:
        print('{}: {}'.format(pattern, reason))
    os.makedirs(args.output, exist_ok=True)
    done = 0
    readable = _readable_images(paths, output_stems(paths), failures)
    while True:
        batch = list(itertools.islice(readable, args.batch_size))
        if not batch:
            break
        # masks as RLE: bounded memory for dense scenes
        all_results = predict_images([img for _, _, img in batch], predictor, 'rle')
        for (path, stem, img), results in zip(batch, all_results):
            _write_prediction(args, path, stem, img, results)
            done += 1
    if failures:
        print('{} of {} inputs failed:'.format(len(failures), len(failures) + done))
        for path, reason in failures:
            print('  {}: {}'.format(path, reason))
    return done


def run_evaluate(args, predictor, weights):
    """--evaluate: every DATA.VAL set; several sets get '-<name>' before the json suffix.
    Under horovodrun every rank predicts a share of the images and rank 0 reports; with
    several GPUs in this process each GPU predicts a share."""
    from eval import evaluate_on_dataset
    from utils.distributed import horovod_rank_size
    horovod = horovod_rank_size()[1] > 1
    if cfg.TRAIN.NUM_GPUS > 1 and not horovod:
        predictor = build_gpu_predictors(weights, cfg.TRAIN.NUM_GPUS, args.batch_size)
    root, ext = os.path.splitext(args.evaluate)
    for name in cfg.DATA.VAL:
        out = args.evaluate if len(cfg.DATA.VAL) == 1 else '{}-{}{}'.format(root, name, ext)
        metrics = evaluate_on_dataset(name, predictor, out, horovod=horovod)
        if metrics is None:  # a Horovod rank other than 0
            continue
        print('{} (results in {}):'.format(name, out))
        for key, value in metrics.items():
            print('  {:<40} {:.4f}'.format(key, value))


def run_benchmark(args, predictor):
    """--benchmark N: mean seconds per phase over N images (--batch-size per graph run)
    after 2 warm-up runs."""
    import itertools
    import time

    from common import ImageReadError, read_image
    from dataset import DatasetRegistry
    from eval import PHASES, predict_images
    if args.predict:
        paths = expand_inputs(args.predict)[0]
    else:
        paths = [r['file_name'] for r in DatasetRegistry.get(cfg.DATA.VAL[0]).inference_roidbs()]
    images = []
    for path in paths[:args.benchmark]:  # read outside the timed loop
        try:
            images.append(read_image(path))
        except ImageReadError as e:
            print(e)
    if not images:
        from utils.training import UserInputError
        raise UserInputError('--benchmark: no readable image.')
    stream = list(itertools.islice(itertools.cycle(images), args.benchmark))
    batches = [stream[i:i + args.batch_size] for i in range(0, len(stream), args.batch_size)]
    for _ in range(2):
        predict_images(batches[0], predictor, mask_format='rle')
    timings = {}
    start = time.perf_counter()
    for batch in batches:
        predict_images(batch, predictor, mask_format='rle', timings=timings)
    total = time.perf_counter() - start
    report = {'benchmark': 'predict_image', 'images': args.benchmark,
              'batch_size': args.batch_size,
              'distinct_images': len(images), 'images_per_s': args.benchmark / total}
    for phase in PHASES:
        report[phase + '_ms'] = 1000. * timings.get(phase, 0.) / args.benchmark
        print('{:<12} {:8.1f} ms/image'.format(phase, report[phase + '_ms']))
    print('{:<12} {:8.2f} images/s'.format('throughput', report['images_per_s']))
    print(json.dumps(report))


def run_visualize(args, weights):
    """--visualize N: [ground truth | proposals | predictions] for N training images."""
    import cv2

    from common import ImageReadError, read_image
    from dataset import DatasetRegistry
    from eval import predict_image, predict_image_with_proposals
    from viz import draw_final_outputs_panel, to_display_bgr
    try:
        predictor = build_predictor(weights, ['output/proposal_boxes'])
    except KeyError:
        print('The model has no output/proposal_boxes tensor: panels show no proposals.')
        predictor = None
    plain = predictor or build_predictor(weights)
    os.makedirs(args.output, exist_ok=True)
    roidbs = DatasetRegistry.get(cfg.DATA.TRAIN[0]).training_roidbs()[:args.visualize]
    for i, roidb in enumerate(roidbs):
        try:
            img = read_image(roidb['file_name'])
        except ImageReadError as e:
            print(e)
            continue
        if predictor is not None:
            results, proposals = predict_image_with_proposals(img, predictor)
        else:
            results, proposals = predict_image(img, plain, mask_format='rle'), None
        panel = draw_final_outputs_panel(
            to_display_bgr(img, cfg.PREPROC.CHANNEL_ORDER), roidb['boxes'], roidb['class'],
            proposals, results, cfg.DATA.CLASS_NAMES, cfg.TEST.RESULT_SCORE_THRESH_VIS)
        out = os.path.join(args.output, 'viz-{:03d}.png'.format(i))
        cv2.imwrite(out, panel)
        print('{} -> {}'.format(roidb['file_name'], out))


def main(args):
    """Run; a user error (config, path, dataset) ends with one "Error: ..." line, status 1."""
    from utils.distributed import init_horovod_if_launched
    from utils.training import UserInputError, WeightsLoader
    init_horovod_if_launched()  # under horovodrun: --evaluate shared by the ranks
    run_config = training_config_file(args.load)
    if args.config_file is None:
        # The training run's own config: same channels, channel order and model shape
        # (a model trained on BGR must never be fed RGB by a forgotten flag).
        args.config_file = run_config
        if args.config_file:
            print('predict.py: using the training config {}'.format(args.config_file))
    if args.precision:
        from utils.precision import auto_precision
        chosen = auto_precision() if args.precision == 'auto' else args.precision
        print('predict.py: precision {} (--precision {})'.format(chosen, args.precision))
        args.config = list(args.config) + ['TRAIN.PRECISION=' + chosen]
    try:
        if args.batch_size < 1:
            raise UserInputError('--batch-size must be >= 1, got {}.'.format(args.batch_size))
        setup_config(args, is_training=False, run_config=run_config)
        weights = WeightsLoader(args.load)  # reads the file now: a bad path fails here
        return run(args, weights)
    except USER_ERRORS as e:  # the user can fix these: one line, no traceback
        print('Error: {}'.format(e), file=sys.stderr)
        return 1


def run(args, weights):
    """Every action asked for, in a fixed order; returns the exit status."""
    from utils.distributed import horovod_rank_size
    from utils.training import UserInputError
    if horovod_rank_size()[0] > 0:  # under horovodrun the other ranks only share --evaluate
        if args.evaluate:
            run_evaluate(args, build_predictor(weights, batch_size=args.batch_size), weights)
        return 0
    if args.export_savedmodel and os.path.exists(args.export_savedmodel):
        raise UserInputError('--export-savedmodel: "{}" already exists.'.format(
            args.export_savedmodel))
    if args.visualize:
        run_visualize(args, weights)
    if not any([args.predict, args.evaluate, args.benchmark, args.export_savedmodel,
                args.export_pb]):
        return 0
    predictor = None
    if args.export_savedmodel or args.export_pb:
        import export
        predictor = build_predictor(weights)  # export writes the single-image graph
        meta = export.serving_metadata(class_category_ids())
        if args.export_savedmodel:
            export.export_savedmodel(predictor, args.export_savedmodel, meta)
        if args.export_pb:
            export.export_frozen_graph(predictor, args.export_pb, meta)
    needs = any([args.evaluate, args.benchmark, args.predict])
    if needs and (predictor is None or args.batch_size > 1):
        predictor = build_predictor(weights, batch_size=args.batch_size)
    if args.evaluate:
        run_evaluate(args, predictor, weights)
    if args.benchmark:
        run_benchmark(args, predictor)
    if args.predict and run_predict(args, predictor) == 0:
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(parse_args()))
