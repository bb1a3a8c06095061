"""Helpers shared by the bench/ scripts: config profiles, a synthetic scene, the CPU's
peak FLOP/s, machine load, and running one measurement per fresh process.

Named harness.py, not common.py: the bench/ folder is first on sys.path when a script runs,
so a bench/common.py would shadow the repository's common.py.

Every script prints one JSON line per measurement. A measurement runs in its own Python
process (`run_isolated`) so that its peak resident memory is its own and environment
variables read once at TensorFlow start-up (``TF_ENABLE_ONEDNN_OPTS``) can differ between
measurements.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserError(Exception):
    """A measurement's child process ended with one "Error: ..." line (a user error)."""

# Named starting points; --config-file and --config apply on top.
#   r50-fpn: the config defaults, i.e. the COCO R50-FPN Mask R-CNN 1x recipe with COCO's 80
#            classes (only the class names are read: no COCO file is needed), 800 x 1333.
#   demo:    configs/shapes_demo.yaml (ResNet-18, GroupNorm, narrow heads, 256 x 512).
PROFILES = {'r50-fpn': None, 'demo': os.path.join(ROOT, 'configs', 'shapes_demo.yaml')}


def add_config_arguments(parser):
    """--profile, --config-file, --config, --onednn, --intra, --inter, --precision."""
    parser.add_argument('--profile', nargs='+', choices=sorted(PROFILES), default=['r50-fpn'],
                        help='model profiles, one measurement each (default r50-fpn)')
    from cli import add_config_arguments as add_cli_config_arguments
    add_cli_config_arguments(parser)  # the YAML applies after the profile
    parser.add_argument('--onednn', choices=['default', '0', '1'], default='default',
                        help='TF_ENABLE_ONEDNN_OPTS for the measuring process (default: '
                             'inherited, else TensorFlow decides by CPU features)')
    parser.add_argument('--intra', type=int, help='intra-op threads (default: utils.precision)')
    parser.add_argument('--inter', type=int, help='inter-op threads (default: utils.precision)')
    parser.add_argument('--repeat', type=int, default=1,
                        help='measurements per profile, each in a fresh process')


def bench_parser(doc, warmup, unit):
    """The argument parser of a profile script: `add_config_arguments`, ``--warmup``
    (untimed ``unit``s first) and the internal ``--job``."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument('--warmup', type=int, default=warmup, help='untimed {} first'.format(unit))
    p.add_argument('--job', help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    return p


def jobs_from_args(args, **extra):
    """One job dict per (profile, repeat) of parsed `add_config_arguments` arguments."""
    return [dict(profile=p, config_file=args.config_file, config=list(args.config),
                 intra=args.intra, inter=args.inter, onednn=args.onednn, **extra)
            for p in args.profile for _ in range(args.repeat)]


def setup_config(profile, config_file, config, is_training):
    """Profile YAML, then ``config_file``, then ``config`` overrides; finalised for the
    devices of this machine (`cli.setup_config`)."""
    from cli import setup_config as cli_setup_config
    from config import config as cfg
    if PROFILES[profile]:
        cfg.load_yaml(PROFILES[profile])
    cli_setup_config(argparse.Namespace(config_file=config_file, config=config),
                       is_training=is_training)


def run_isolated(script, job, timeout=3600):
    """Run ``script --job '<job as JSON>'`` in a fresh Python process; return the JSON dict
    it printed last. ``job['onednn']`` other than 'default' sets TF_ENABLE_ONEDNN_OPTS.

    Raises:
        RuntimeError: with the end of the child's output if it failed.
    """
    env = dict(os.environ, PYTHONPATH=ROOT)
    if job.get('onednn', 'default') != 'default':
        env['TF_ENABLE_ONEDNN_OPTS'] = job['onednn']
    proc = subprocess.run([sys.executable, os.path.abspath(script), '--job', json.dumps(job)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith('Error: ')]
    if proc.returncode == 1 and errors:
        raise UserError(errors[-1][len('Error: '):])
    if proc.returncode != 0 or not lines:
        raise RuntimeError('benchmark job {} failed (exit {}):\n{}'.format(
            job, proc.returncode, (proc.stdout + proc.stderr)[-4000:]))
    return json.loads(lines[-1])


def run_job(measure, job_json):
    """The child side of `run_isolated`: ``measure(**job)``, printed as one JSON line; a
    user error (bad config key or value, missing file, unknown dataset) as one line."""
    import utils.compat  # noqa: F401  (before utils.training imports TensorFlow)
    from cli import USER_ERRORS
    try:
        result = measure(**json.loads(job_json))
    except USER_ERRORS as e:
        sys.exit('Error: {}'.format(e))
    print(json.dumps(result), flush=True)


def run_main(main):
    """A script's ``main()``; a `UserError` of a measurement ends it with that one
    "Error: ..." line on stderr and exit status 1."""
    try:
        main()
    except UserError as e:
        sys.exit('Error: {}'.format(e))


def main_loop(script, args, **extra):
    """Run every job of `jobs_from_args` in its own process; print one JSON line each."""
    for job in jobs_from_args(args, **extra):
        print(json.dumps(run_isolated(script, job)), flush=True)


def peak_rss_mb():
    """Peak resident memory of this process so far, MB (``ru_maxrss`` is KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.


def load_average():
    """The 1, 5 and 15-minute load averages (other users' work on a shared machine)."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu_facts(fma_units=2):
    """This CPU and its float32 peak, from /proc/cpuinfo.

    peak = cores x FMA units per core x float32 lanes per FMA (16 with AVX-512, 8 with
    AVX2) x 2 FLOP per FMA x clock. ``fma_units`` is an assumption about the
    micro-architecture (2 on AMD Zen 2-4 and most Xeons); the clock is the one cpuinfo
    reports (nominal: a turbo clock would make the true peak higher).

    Returns:
        dict: model, cores, mhz, isa flags, peak_gflops, peak_formula.
    """
    with open('/proc/cpuinfo') as f:
        text = f.read()
    model = re.search(r'^model name\s*:\s*(.*)$', text, re.M).group(1).strip()
    mhz = float(re.search(r'^cpu MHz\s*:\s*([\d.]+)$', text, re.M).group(1))
    flags = set(re.search(r'^flags\s*:\s*(.*)$', text, re.M).group(1).split())
    isa = sorted(f for f in flags if f in ('avx2', 'fma', 'avx512f', 'avx512_bf16',
                                            'avx512_vnni', 'amx_bf16', 'amx_tile'))
    lanes = 16 if 'avx512f' in flags else 8 if 'avx2' in flags else 4
    cores = len(os.sched_getaffinity(0))
    peak = cores * fma_units * lanes * 2 * mhz / 1e3
    return {'cpu': model, 'cores': cores, 'mhz': mhz, 'isa': isa,
            'peak_gflops': round(peak, 1),
            'peak_formula': '{} cores x {} FMA units x {} fp32 lanes x 2 FLOP x {:.3f} GHz'
                            .format(cores, fma_units, lanes, mhz / 1e3)}


def write_synthetic_scene(folder, height, width, seed=0):
    """A shapes image of exactly height x width with its annotations, written as PNG.

    `dataset.shapes.generate_image` draws a square scene of side max(H, W) which is
    resized (anisotropically) to H x W, boxes and polygons scaled alike.

    Returns:
        its roidb (dataset/dataset.py format): file_name, boxes float32 [N, 4] x1y1x2y2
        pixels, class, is_crowd, segmentation (polygons [K, 2] in pixels).
    """
    import cv2

    from common import scale_boxes, scale_polygons
    from dataset.shapes import generate_image
    side = max(height, width)
    img, roidb = generate_image(seed, 0, side, side)
    sy, sx = height / img.shape[0], width / img.shape[1]
    path = os.path.join(folder, 'scene_{}x{}.png'.format(height, width))
    cv2.imwrite(path, cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR))
    return {'file_name': path, 'image_id': 0, 'height': height, 'width': width,
            'boxes': scale_boxes(roidb['boxes'], sy, sx), 'class': roidb['class'],
            'is_crowd': roidb['is_crowd'],
            'segmentation': scale_polygons(roidb['segmentation'], sy, sx)}


def record(job, cfg, **values):
    """The JSON record of one measurement: the values plus what they were measured with."""
    from utils.precision import onednn_enabled, thread_counts
    intra, inter = thread_counts(job.get('intra'), job.get('inter'))
    return dict(values, profile=job['profile'], config=job['config'],
                config_file=job['config_file'], precision=cfg.TRAIN.PRECISION,
                data_format=cfg.BACKBONE.DATA_FORMAT, intra_op=intra, inter_op=inter,
                onednn=onednn_enabled(), load_avg=load_average(),
                peak_rss_mb=round(peak_rss_mb(), 1), **cpu_facts())
