"""Stale torch-extension build locks: a killed build's lock makes every later load wait for ever;
the package says so (and removes the lock of a build it killed itself)."""

import io
import os
import re
import time

from siasam_fast import extlock


def test_the_lock_is_where_torch_builds_the_extension(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extlock.build_lock("fused_adam") == tmp_path / "fused_adam" / "lock"


def test_a_lock_still_there_after_the_wait_is_said_once_with_how_to_remove_it(tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "fused_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    out = io.StringIO()
    with extlock.watch_build_lock("fused_adam", after_s=0.2, stream=out):
        time.sleep(0.8)
    said = out.getvalue()
    assert said.count("warning:") == 1, said
    assert f"rm {lock}" in said and "made 60 min ago" in said and "killed" in said
    assert re.search(r"waited \d s for fused_adam's build lock", said), said  # ~0.2 s


def test_nothing_is_said_without_a_lock_or_when_the_block_ends_first(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    out = io.StringIO()
    with extlock.watch_build_lock("fused_adam", after_s=0.2, stream=out):
        time.sleep(0.5)  # no lock: a build that finished (or none was needed)
    lock = tmp_path / "fused_adam" / "lock"
    lock.touch()
    with extlock.watch_build_lock("fused_adam", after_s=0.3, stream=out):
        pass  # done before the wait: the watch is cancelled
    time.sleep(0.6)
    assert out.getvalue() == ""


def test_nothing_is_said_while_this_process_builds_the_extension_itself(tmp_path, monkeypatch):
    """torch's build keeps the lock file it made open while it builds: a slow build of this
    process's own (nvcc on a busy machine) is not a killed build's lock, and telling the user to
    remove it would make torch's release of the lock fail when the build ends."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "fused_adam" / "lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton.try_acquire
    out = io.StringIO()
    try:
        assert extlock.held_here(lock)
        with extlock.watch_build_lock("fused_adam", after_s=0.2, stream=out):
            time.sleep(0.6)
    finally:
        os.close(fd)
    assert out.getvalue() == ""
    assert not extlock.held_here(lock)  # another process's (or a killed build's) lock
    with extlock.watch_build_lock("fused_adam", after_s=0.2, stream=out):
        time.sleep(0.6)
    assert out.getvalue().count("warning:") == 1


def test_only_the_lock_made_by_the_killed_build_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "fused_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - 600
    os.utime(lock, (old, old))  # another process's, older than the build we started
    assert extlock.remove_lock_of_killed_build("fused_adam", time.time() - 5) is None
    assert lock.exists()
    started = time.time()
    lock.touch()  # made by our build
    assert extlock.remove_lock_of_killed_build("fused_adam", started) == lock
    assert not lock.exists()
    assert extlock.remove_lock_of_killed_build("fused_adam", started) is None  # none left
