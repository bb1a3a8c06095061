"""utils.forked: a function run in a forked child returns its result or raises its error."""
import os
import signal

import numpy as np
import pytest

from dataset import DatasetError
from utils.forked import run_in_forked_process
from utils.serialized_list import SerializedList

STATE = {'value': 0}  # module state the child must see (it is forked, not spawned)


def build(n):
    STATE['pid'] = os.getpid()
    return SerializedList({'i': i, 'a': np.arange(i, dtype=np.float32), 'seen': STATE['value']}
                          for i in range(n))


def fail(message):
    raise DatasetError(message)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_result_comes_back_from_a_child_that_sees_our_state():
    STATE['value'] = 7
    lst = run_in_forked_process(build, 5)
    assert len(lst) == 5 and lst[3]['seen'] == 7
    np.testing.assert_array_equal(lst[4]['a'], np.arange(4, dtype=np.float32))
    assert 'pid' not in STATE  # built in another process, not here


def test_child_exception_is_raised_here_with_its_traceback():
    with pytest.raises(DatasetError, match='no images left') as info:
        run_in_forked_process(fail, 'no images left')
    assert str(info.value) == 'no images left'  # entry scripts print just this line
    assert any('in fail' in note for note in info.value.__notes__)


def test_child_killed_gives_a_clear_error():
    with pytest.raises(RuntimeError, match=r'die died in a child process \(exit code -9'):
        run_in_forked_process(die)
