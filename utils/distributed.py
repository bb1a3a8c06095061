"""Evaluation shared by devices and Horovod ranks: shards, the gather, the merge.

Shards are contiguous and taken in order, so the merged results are in image order,
exactly the list one process produces: COCOeval breaks score ties by that order, so the
AP of N ranks is identical to one process's, not merely close. Results travel with
Horovod's allgather (no shared filesystem needed across machines).
"""
import concurrent.futures
import os
import pickle
import sys

import numpy as np

__all__ = ['shard_bounds', 'merge_shards', 'predict_on_devices', 'predict_on_ranks',
           'horovod_rank_size',
           'horovod_local_rank_size', 'horovod_allgather', 'init_horovod_if_launched']

# Variables a Horovod launcher sets to the number of processes (Gloo, Open MPI, MPICH).
_SIZE_VARIABLES = ('HOROVOD_SIZE', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE')


def shard_bounds(num_items, num_shards):
    """Split range(num_items) into ``num_shards`` contiguous, ordered shards.

    Every item is in exactly one shard; sizes differ by at most one (the first
    ``num_items % num_shards`` shards take one more); shards may be empty.

    Returns:
        list of num_shards (start, end) pairs, shard k = items start..end-1.
    """
    if num_shards < 1:
        raise ValueError('num_shards must be >= 1, got {}.'.format(num_shards))
    base, extra = divmod(num_items, num_shards)
    bounds, start = [], 0
    for k in range(num_shards):
        end = start + base + (1 if k < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def merge_shards(shards, num_items):
    """Concatenate gathered shards in item order, checking that they tile the items.

    Args:
        shards: dicts with ``bounds`` (start, end), ``results`` and ``failures`` (lists),
            one per shard, in any order.
        num_items (int): how many items the shards must cover, each exactly once.
    Returns:
        (results, failures): the shards' lists concatenated in the order of ``bounds``.
    Raises:
        ValueError: a shard is missing, overlaps another or lies outside range(num_items).
    """
    shards = sorted(shards, key=lambda s: tuple(s['bounds']))
    covered = 0
    for s in shards:
        start, end = s['bounds']
        if start != covered or end < start:
            raise ValueError('Shards do not tile the {} images: {} after image {}.'.format(
                num_items, (start, end), covered))
        covered = end
    if covered != num_items:
        raise ValueError('Shards cover {} of {} images.'.format(covered, num_items))
    results = [r for s in shards for r in s['results']]
    failures = [f for s in shards for f in s['failures']]
    return results, failures


def predict_on_devices(items, model_funcs, predict):
    """Split ``items`` in contiguous parts over ``model_funcs`` (one per device of this
    process); ``predict(part, model_func)`` -> (results, failures) runs each part in its own
    thread (TensorFlow releases the GIL).

    Returns:
        (results, failures), each concatenated in item order.
    """
    parts = list(zip(shard_bounds(len(items), len(model_funcs)), model_funcs))
    with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
        outputs = list(pool.map(lambda p: predict(items[p[0][0]:p[0][1]], p[1]), parts))
    return [r for out in outputs for r in out[0]], [f for out in outputs for f in out[1]]


def predict_on_ranks(items, predict, horovod, desc):
    """Predict ``items`` shared by the Horovod ranks; every rank must call this.

    Args:
        items: a list (e.g. inference roidbs), the same on every rank.
        predict: callable(items[start:end], tqdm bar) -> (results list, failures list).
        horovod (bool): False: this process predicts everything.
        desc (str): progress-bar label.
    Returns:
        on rank 0, (results, failures) of all ranks, in item order (`merge_shards`);
        None on the other ranks.
    """
    from tensorpack.utils.utils import get_tqdm
    rank, size = horovod_rank_size() if horovod else (0, 1)
    start, end = shard_bounds(len(items), size)[rank]
    if horovod:
        desc += ' (rank {} of {})'.format(rank, size)
    with get_tqdm(total=end - start, desc=desc) as bar:
        results, failures = predict(items[start:end], bar)
    shards = [{'bounds': (start, end), 'results': results, 'failures': failures}]
    if size > 1:
        shards = horovod_allgather(shards[0])
    return merge_shards(shards, len(items)) if rank == 0 else None


def _initialised_horovod():
    hvd = sys.modules.get('horovod.tensorflow')
    return hvd if hvd is not None and hvd.is_initialized() else None


def horovod_rank_size():
    """(rank, size) of Horovod if this process initialised it, else (0, 1)."""
    hvd = _initialised_horovod()
    return (hvd.rank(), hvd.size()) if hvd else (0, 1)


def horovod_local_rank_size():
    """(rank, size) among the Horovod processes of this machine, else (0, 1)."""
    hvd = _initialised_horovod()
    return (hvd.local_rank(), hvd.local_size()) if hvd else (0, 1)


def horovod_allgather(obj, name='rcnn_allgather'):
    """Every Horovod rank's ``obj`` (picklable), in rank order, on every rank.

    Runs in a private graph and a CPU-only session: it works while the training graph is
    finalised, and takes no GPU memory. Every rank must call it, in the same order.
    """
    import horovod.tensorflow as hvd
    import tensorflow as tf
    tf1 = tf.compat.v1
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
    with tf.Graph().as_default():
        data_in = tf1.placeholder(tf.uint8, [None])
        size_in = tf1.placeholder(tf.int64, [1])
        sizes_op = hvd.allgather(size_in, name=name + '_sizes')
        data_op = hvd.allgather(data_in, name=name + '_data')
        with tf1.Session(config=tf1.ConfigProto(device_count={'GPU': 0})) as sess:
            sizes = sess.run(sizes_op, {size_in: [len(data)]})
            gathered = sess.run(data_op, {data_in: data})
    ends = np.cumsum(sizes)
    return [pickle.loads(gathered[end - size:end].tobytes()) for size, end in zip(sizes, ends)]


def init_horovod_if_launched():
    """Initialise Horovod when a Horovod launcher (horovodrun, mpirun) started this process
    as one of several; a rank's GPU is then chosen by its session (`visible_device_list`).

    Returns:
        (rank, size); (0, 1) when not launched by Horovod (nothing is done).
    """
    sizes = [os.environ.get(name, '').strip() for name in _SIZE_VARIABLES]
    if not any(v.isdigit() and int(v) > 1 for v in sizes):
        return 0, 1
    import horovod.tensorflow as hvd
    hvd.init()
    return hvd.rank(), hvd.size()
