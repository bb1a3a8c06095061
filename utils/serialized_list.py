"""A read-only list of picklable records kept as one byte buffer (e.g. a COCO-sized roidb).

Why: 118k roidbs as Python dicts of small arrays are millions of Python objects. Forked
data workers share them copy-on-write, but every reference-count change or garbage
collection pass in *any* process writes to the pages holding them, so the pages get
copied one by one and the workers' memory grows with time ("copy-on-read"). Here the
records live pickled, back to back, in one uint8 numpy array, with an int64 array of
their end offsets: two objects whose pages are only ever read, so they stay shared.
Indexing unpickles a fresh copy of one record (tens of microseconds for a roidb).
"""
import pickle

import numpy as np

__all__ = ['SerializedList']


class SerializedList:
    """An immutable sequence of records stored pickled in one buffer.

    ``len``, indexing (negative indices too) and iteration behave as on a list; every
    access returns a new, independent copy of the record.
    """

    def __init__(self, records):
        """records: an iterable of picklable objects (consumed once)."""
        chunks = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        ends = np.cumsum([len(c) for c in chunks], dtype=np.int64)
        self._ends = ends
        self._buffer = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
        start = 0
        for i, chunk in enumerate(chunks):
            self._buffer[start:start + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            start += len(chunk)
            chunks[i] = None  # free as we go: peak is about one copy of the data, not two

    def __len__(self):
        return len(self._ends)

    def __getitem__(self, index):
        """The record at ``index`` (an int; raises IndexError out of range)."""
        n = len(self._ends)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError('SerializedList index {} out of range for {} records'.format(
                index, n))
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._buffer[start:int(self._ends[index])]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self):
        """Bytes held: the pickled records plus the offsets."""
        return self._buffer.nbytes + self._ends.nbytes
