"""Keep memory-hungry set-up out of a process that forks long-lived workers.

A forked worker shares its parent's pages until either process writes to them. Pages the
parent only *freed* (a parsed json, millions of temporary objects) stay in its heap and are
reused, i.e. written, by later allocations: each such write turns a shared page into a
private copy in every worker, so the workers' memory grows with time although they never
use that data. `run_in_forked_process` does the set-up in a short-lived child that returns
only its compact result; `release_freed_memory` gives freed heap back to the OS.
"""
import ctypes
import gc
import multiprocessing
import pickle
import traceback

__all__ = ['run_in_forked_process', 'release_freed_memory']


def _child(conn, func, args):
    try:
        message = ('ok', func(*args))
    except BaseException as e:  # noqa: B902  (the parent re-raises it)
        message = ('error', e, traceback.format_exc())
    try:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an unpicklable result or exception: say what it was
        data = pickle.dumps(('error', RuntimeError(repr(message[1])), traceback.format_exc()))
    conn.send_bytes(data)
    conn.close()


def run_in_forked_process(func, *args):
    """``func(*args)`` in a forked child (it sees this process's state: config, registered
    datasets, logging); returns its result or raises its exception here.

    The result travels pickled through a pipe, so it should be compact (e.g. numpy arrays).
    The child's traceback is attached to a re-raised exception as a note.

    Raises:
        RuntimeError: the child died without an answer (e.g. killed for lack of memory).
    """
    ctx = multiprocessing.get_context('fork')
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, func, args), daemon=True)
    proc.start()
    sender.close()
    try:
        data = receiver.recv_bytes()
    except EOFError:
        proc.join()
        raise RuntimeError('{} died in a child process (exit code {}; -9 usually means the OS '
                           'killed it for lack of memory).'.format(func.__name__, proc.exitcode)
                           ) from None
    finally:
        receiver.close()
    proc.join()
    message = pickle.loads(data)
    if message[0] == 'error':
        message[1].add_note('(raised in the child process of run_in_forked_process)\n'
                            + message[2])
        raise message[1]
    return message[1]


def release_freed_memory():
    """Collect garbage and return the freed heap to the OS (glibc's ``malloc_trim``), so
    that workers forked next do not inherit it."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
