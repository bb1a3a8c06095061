#!/usr/bin/env python
"""Inference latency per image (preprocess / graph / postprocess), images/s and FLOPs.

    python bench/inference.py                              # R50-FPN Mask R-CNN, 800 x 1333
    python bench/inference.py --profile demo r50-fpn --repeat 3
    python bench/inference.py --onednn 1 --config TRAIN.PRECISION=bf16
    python bench/inference.py --intra 1 --inter 0          # tensorpack's default threads
    python bench/inference.py --profile demo --batch-size 1 2 4 --repeat 3

The config is the profile's plus TEST.RESULT_SCORE_THRESH=0 (`BENCH_OVERRIDES`: with
random weights nothing would pass the threshold). The image is a synthetic shapes scene of
exactly PREPROC.TEST_SHORT_EDGE_SIZE x PREPROC.MAX_SIZE (800 x 1333: the largest the R50
config feeds, padded to 800 x 1344), read with `common.read_image`. The predictor is predict.py's (`build_predictor`, random weights:
no pretrained weights here) with the session of `utils.precision` (TRAIN.PRECISION,
threads from --intra/--inter or RCNN_INTRA_OP_THREADS/RCNN_INTER_OP_THREADS). Each image
goes through `eval.predict_image(mask_format='rle', timings=...)` as in evaluation; with
--batch-size N, N copies of the image go through one `eval.predict_images` call of the
N-image predictor (``predict.py --batch-size N``) and its times count 1/N per image
(--images is rounded down to a multiple of N, at least N; the op trace and FLOP count stay
those of one image, batch 1).

FLOPs: the inference graph is built again on an input of FIXED shape (the resized image's)
and run once with grappler off and a full trace, so the heads' dynamic sizes (proposals,
detections) come from that run; TensorFlow's profiler (`float_operation()`) then counts
the ops that have registered FLOP statistics (Conv2D, Conv2DBackpropInput, MatMul,
BiasAdd, Add, Mul, ...; not CropAndResize, NMS, gathers). One multiply-add counts 2.
achieved_gflops = flops / median graph time; peak_fraction = achieved / this CPU's fp32
peak (`harness.cpu_facts`: the formula is in the record).

One JSON line per measurement (each in a fresh process):
    image_hw, padded_hw, detections   the image fed, its padded size, boxes returned
    preprocess_ms, graph_ms, postprocess_ms, total_ms   medians over --images images
    *_spread_ms                        [min, max] of each over those images
    images_per_s                       --images / their total wall time
    batch_size                         images per graph run
    cpu_ms                             CPU time (all threads) per image: on a loaded machine
                                       it shows the work done where wall time shows the wait
    flops, flops_by_op, flops_run_rois achieved_gflops, peak_fraction, peak_gflops
    gflops_per_cpu_s, core_peak_fraction  FLOPs per CPU-second of the process (cpu_ms) and
                                       its fraction of ONE core's peak: how well the
                                       kernels use the time they get, whatever the load
    op_time_share                      share of traced op time by op type (top 12)
    transposes, py_funcs               Transpose op names / py_func ops in the graph
    build_s                            seconds to build the predictor (graph + session)
    error                              set when the graph could not run (e.g. NCHW on CPU)
plus the config, precision, data format, threads, oneDNN state, load average, peak RSS.
"""
import collections
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import harness  # noqa: E402

NUM_OP_TYPES = 12  # op types listed in op_time_share / flops_by_op
# Random weights score every class about 1 / (C + 1) (0.012 with COCO's 80 classes), below
# the 0.05 threshold: with it the R50 graph would return no box, skipping the mask head and
# the mask pasting. Threshold 0 lets TEST.RESULTS_PER_IM boxes through, as a trained model
# does on a busy image. Applied before --config, which can set it back.
BENCH_OVERRIDES = ['TEST.RESULT_SCORE_THRESH=0.0']


def _op_time_share(step_stats):
    """{op type: share of the summed op time} of a traced run, the NUM_OP_TYPES largest."""
    totals = collections.Counter()
    for dev in step_stats.dev_stats:
        for node in dev.node_stats:
            if ' = ' in node.timeline_label:  # 'name = OpType(inputs)'
                op_type = node.timeline_label.split(' = ')[1].split('(')[0]
                totals[op_type] += node.all_end_rel_micros
    whole = sum(totals.values()) or 1
    return {k: round(v / whole, 4) for k, v in totals.most_common(NUM_OP_TYPES)}


def count_flops(image_hw, seed=0):
    """FLOPs of the inference graph on a fixed-shape input (see the module docstring).

    Args:
        image_hw: (H, W) of the image fed to the graph (already resized).
    Returns:
        (total FLOPs, {op type: FLOPs} of the largest, {'proposals': P, 'detections': D}
        of the traced run).
    """
    import numpy as np
    import tensorflow.compat.v1 as tf
    from tensorflow.core.protobuf import rewriter_config_pb2
    from tensorpack.tfutils.tower import PredictTowerContext

    from config import config as cfg
    from eval import get_inference_output_names
    from modeling.generalized_rcnn import build_model
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(seed)
        image = tf.placeholder(tf.float32, list(image_hw) + [cfg.PREPROC.IMAGE_CHANNELS], 'image')
        with PredictTowerContext(''):
            build_model().build_graph(image)
        fetches = [graph.get_tensor_by_name(n + ':0')
                   for n in ['output/proposal_boxes'] + get_inference_output_names()]
        config = tf.ConfigProto()
        # grappler renames what it fuses (Conv2D+BiasAdd+Relu -> _FusedConv2D): keep the
        # graph's own nodes so the trace's run-time shapes fill in the heads' sizes.
        config.graph_options.rewrite_options.disable_meta_optimizer = True
        config.graph_options.rewrite_options.constant_folding = \
            rewriter_config_pb2.RewriterConfig.OFF
        with tf.Session(config=config) as sess:
            sess.run(tf.global_variables_initializer())
            meta = tf.RunMetadata()
            feed = {image: np.random.RandomState(seed).uniform(0, 255, image.shape.as_list())}
            proposals, boxes = sess.run(fetches, feed, run_metadata=meta, options=tf.RunOptions(
                trace_level=tf.RunOptions.FULL_TRACE))[:2]
        opts = tf.profiler.ProfileOptionBuilder.float_operation()
        opts['output'] = 'none'
        prof = tf.profiler.profile(graph, run_meta=meta, cmd='op', options=opts)
    by_op, node = [], prof
    while node.children:  # the 'op' view is a chain of op types, largest first
        node = node.children[0]
        by_op.append((node.name, int(node.float_ops)))
    return (int(prof.total_float_ops), dict(by_op[:NUM_OP_TYPES]),
            {'proposals': int(len(proposals)), 'detections': int(len(boxes))})


def _spread(values):
    return [round(1000 * min(values), 1), round(1000 * max(values), 1)]


def _time_runs(img, predictor, batch_size, images):
    """``images`` predictions of ``img`` (rounded down to whole runs of ``batch_size``)
    -> the per-phase medians and spreads (per image), images/s and CPU ms per image."""
    from eval import PHASES, predict_images
    rows, detections = [], 0
    runs = max(1, images // batch_size)
    images = runs * batch_size
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(runs):
        timings = {}
        results = predict_images([img] * batch_size, predictor, 'rle', timings)
        detections = len(results[0])
        rows.append({k: v / batch_size for k, v in timings.items()})
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ret = {}
    for phase in PHASES + ('total',):
        values = [sum(r.values()) if phase == 'total' else r[phase] for r in rows]
        ret[phase + '_ms'] = round(1000 * statistics.median(values), 1)
        ret[phase + '_spread_ms'] = _spread(values)
    ret.update(detections=detections, images=images, images_per_s=round(images / wall, 3),
               batch_size=batch_size, cpu_ms=round(1000 * cpu / images, 1))
    return ret


def measure(profile, config_file, config, intra, inter, onednn, images, warmup, flops,
            batch_size=1):
    """In this process: build the predictor, time ``images`` predictions after ``warmup``.

    ``onednn`` was applied by `harness.run_isolated` (TF_ENABLE_ONEDNN_OPTS); the record
    states what TensorFlow actually did.

    Returns:
        dict: the JSON record of the module docstring.
    """
    import utils.compat  # noqa: F401  (before TensorFlow)

    from utils.precision import INTER_OP_THREADS_ENV, INTRA_OP_THREADS_ENV
    # build_predictor takes its threads from the environment, like predict.py's users.
    for name, value in ((INTRA_OP_THREADS_ENV, intra), (INTER_OP_THREADS_ENV, inter)):
        if value is not None:
            os.environ[name] = str(value)
    import tensorflow.compat.v1 as tf

    from common import read_image, resize_shortest_edge
    from config import config as cfg
    from eval import predict_image, predict_images
    from predict import build_predictor
    job = dict(profile=profile, config_file=config_file, config=config, intra=intra,
               inter=inter)
    harness.setup_config(profile, config_file, BENCH_OVERRIDES + list(config), is_training=False)
    tf.set_random_seed(0)
    height, width = cfg.PREPROC.TEST_SHORT_EDGE_SIZE, cfg.PREPROC.MAX_SIZE
    with tempfile.TemporaryDirectory() as tmp:
        img = read_image(harness.write_synthetic_scene(tmp, height, width)['file_name'])
    resized_hw = resize_shortest_edge(img, height, width)[0].shape[:2]
    start = time.perf_counter()
    predictor = build_predictor(None)  # None: random weights (tensorpack initialises them)
    build_s = time.perf_counter() - start
    batched = build_predictor(None, batch_size=batch_size) if batch_size > 1 else None
    graph_ops = predictor.graph.get_operations()
    ret = {'image_hw': list(img.shape[:2]), 'build_s': round(build_s, 1),
           'transposes': sorted(op.name for op in graph_ops if op.type == 'Transpose'),
           'py_funcs': sum(op.type in ('PyFunc', 'PyFuncStateless', 'EagerPyFunc')
                           for op in graph_ops)}
    try:
        for _ in range(warmup):
            predict_image(img, predictor, mask_format='rle')
    except tf.errors.OpError as e:  # e.g. an NCHW kernel this CPU build does not have
        # the message ends with "Node: 'name'", the reason, and "[[{{node name}}]]"
        lines = [ln.strip() for ln in e.message.splitlines() if ln.strip()]
        ret['error'] = '{}: {}'.format(type(e).__name__, ' '.join(
            ln for ln in lines[-3:] if not ln.startswith('[[')))
        return harness.record(job, cfg, **ret)
    if batched is not None:
        predict_images([img] * batch_size, batched, mask_format='rle')  # its own warm-up
    ret.update(_time_runs(img, batched or predictor, batch_size, images))

    meta = tf.RunMetadata()
    predictor.sess.run(predictor.output_tensors, {predictor.input_tensors[0]: resize_shortest_edge(
        img, height, width)[0]}, options=tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE),
        run_metadata=meta)
    ret['op_time_share'] = _op_time_share(meta.step_stats)
    if flops:
        mult = 32 if cfg.MODE_FPN else 16
        ret['padded_hw'] = [-(-s // mult) * mult for s in resized_hw]
        total, by_op, sizes = count_flops(resized_hw)
        achieved = total / (ret['graph_ms'] / 1000.) / 1e9
        per_cpu_s = total / (ret['cpu_ms'] / 1000.) / 1e9
        cores = harness.cpu_facts()
        ret.update(flops=total, flops_by_op=by_op, flops_run_rois=sizes,
                   achieved_gflops=round(achieved, 1),
                   peak_fraction=round(achieved / cores['peak_gflops'], 3),
                   gflops_per_cpu_s=round(per_cpu_s, 1),
                   core_peak_fraction=round(per_cpu_s * cores['cores'] / cores['peak_gflops'], 3))
    return harness.record(job, cfg, **ret)


def main(argv=None):
    p = harness.bench_parser(__doc__, warmup=2, unit='images')
    p.add_argument('--images', type=int, default=5, help='timed images (medians reported)')
    p.add_argument('--no-flops', dest='flops', action='store_false',
                   help='skip the FLOP count (it builds and runs the graph once more)')
    p.add_argument('--batch-size', type=int, nargs='+', default=[1], metavar='N',
                   help='images per graph run, one measurement each (default 1)')
    args = p.parse_args(argv)
    if args.job:
        return harness.run_job(measure, args.job)
    if min(args.batch_size) < 1:
        raise harness.UserError('--batch-size must be >= 1, got {}.'.format(args.batch_size))
    # N interleaved within each repeat: a drifting load hits every N alike
    for job in harness.jobs_from_args(args, images=args.images, warmup=args.warmup,
                                      flops=args.flops):
        for n in args.batch_size:
            print(json.dumps(harness.run_isolated(__file__, dict(job, batch_size=n))),
                  flush=True)


if __name__ == '__main__':
    harness.run_main(main)
