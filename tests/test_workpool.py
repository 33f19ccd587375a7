"""The crash-tolerant pool behind probing and transcoding: only the item that kills its process
fails, every other item still yields its result."""

import os

import pytest

from siasam_fast.pipeline.workpool import imap_isolated


def square_or_die(x: int) -> int:
    if x == 3:
        os._exit(13)  # what a decoder segfault looks like to the pool
    return x * x


def test_a_crashing_item_fails_alone():
    out = list(imap_isolated(square_or_die, range(8), workers=2, on_crash=lambda x: ("crash", x)))
    assert sorted(o for o in out if isinstance(o, int)) == [x * x for x in range(8) if x != 3]
    assert [o for o in out if not isinstance(o, int)] == [("crash", 3)]


def test_serial_when_one_worker():
    assert list(imap_isolated(abs, [-1, -2], workers=1, on_crash=None)) == [1, 2]


def test_a_crash_seen_while_submitting_loses_no_item():
    """A worker can die between one future finishing and the next submit (the pool is then
    broken and refuses it): that item runs alone like the others. Many rounds make the race
    likely; every item must come back once."""
    for _ in range(3):
        out = list(imap_isolated(square_or_die, range(24), workers=2, in_flight_per_worker=1,
                                 on_crash=lambda x: ("crash", x)))
        assert sorted(o for o in out if isinstance(o, int)) == [
            x * x for x in range(24) if x != 3]
        assert [o for o in out if not isinstance(o, int)] == [("crash", 3)]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_an_interrupted_pool_leaves_no_worker_behind():
    """Ctrl-C, SIGTERM or a consumer that stops: the work in flight is dropped at once, not
    waited for, and no worker process outlives the pool (they were left sleeping, orphaned)."""
    import multiprocessing
    import time

    before = set(multiprocessing.active_children())  # other tests' processes are not ours
    results = imap_isolated(time.sleep, [0, 30, 30, 30], workers=2, on_crash=None)
    assert next(results) is None
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert workers
    pids = [process.pid for process in workers]
    start = time.monotonic()
    results.close()
    assert time.monotonic() - start < 10
    # By pid, not Process.is_alive(): the pool's own thread reaps them, and a second waitpid on
    # a reaped pid reads as "still running" there.
    while any(map(_running, pids)) and time.monotonic() - start < 20:
        time.sleep(0.1)
    assert not any(map(_running, pids))


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:  # gone (FileNotFoundError, or ProcessLookupError while reading)
        return False
