"""The crash-tolerant pool behind probing and transcoding: only the item that kills its process
fails, every other item still yields its result."""

import os

import pytest

from siasam_fast.pipeline import workpool
from siasam_fast.pipeline.workpool import imap_isolated


def square_or_die(x: int) -> int:
    if x == 3:
        os._exit(13)  # what a decoder segfault looks like to the pool
    return x * x


def test_a_crashing_item_fails_alone():
    out = list(imap_isolated(square_or_die, range(8), workers=2, on_crash=lambda x: ("crash", x)))
    assert sorted(o for o in out if isinstance(o, int)) == [x * x for x in range(8) if x != 3]
    assert [o for o in out if not isinstance(o, int)] == [("crash", 3)]


def own_pid(_item) -> int:
    return os.getpid()


def test_the_pool_keeps_its_workers_and_a_bounded_number_of_items_in_flight():
    """Without a crash every item runs in the pool's own workers (one process per item is the
    crash fallback only), and new items are taken one per finished item."""
    pids = list(imap_isolated(own_pid, range(12), workers=2, in_flight_per_worker=1,
                              on_crash=None))
    assert len(pids) == 12 and len(set(pids)) <= 2 and os.getpid() not in pids
    items = iter(range(5))
    assert workpool._take(items, 2) == [0, 1] and workpool._take(items, 1) == [2]
    assert workpool._take(items, 4) == [3, 4]


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


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux: PR_SET_PDEATHSIG, /proc")
def test_a_child_ends_when_its_parent_is_killed():
    """die_with_parent as a ``preexec_fn`` (given the parent's pid): the child runs while its
    parent lives, and ends when the parent is SIGKILLed (no orphan left running)."""
    import subprocess
    import sys
    import time

    code = ("import functools, os, subprocess, time\n"
            "from siasam_fast.pipeline.workpool import die_with_parent\n"
            "child = subprocess.Popen(['sleep', '30'], stdout=subprocess.DEVNULL,\n"
            "                         stderr=subprocess.DEVNULL,\n"
            "                         preexec_fn=functools.partial(die_with_parent, os.getpid()))\n"
            "time.sleep(0.2)\n"
            "print(child.pid, child.poll(), flush=True)\n"
            "os.kill(os.getpid(), 9)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid, status = out.stdout.split()
    try:
        assert status == "None", out  # running while its parent lives
        start = time.monotonic()
        while _running(int(pid)) and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert not _running(int(pid))
    finally:
        if _running(int(pid)):
            os.kill(int(pid), 9)
