"""Stale build locks of torch's JIT extensions (DeepSpeed's FusedAdam, its CPU shared-memory op).

torch builds a JIT extension under a lock file (``<build dir>/lock``, the build dir being
``~/.cache/torch_extensions/<python>_<accelerator>/<name>`` or under ``TORCH_EXTENSIONS_DIR``) and
every other process that needs the extension waits while that file exists, silently and without
end. A build that is killed outright (SIGKILL, out of memory, a job's time limit) leaves the file
behind, and from then on every run on the machine hangs where it loads the extension.

:func:`watch_build_lock` says so, once, when a block that may build or load an extension has
waited ``after_s`` seconds and the lock is still there (a real build takes about a minute).
:func:`remove_lock_of_killed_build` removes the lock a build this program killed left behind.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

FUSED_ADAM = "fused_adam"  # DeepSpeed's FusedAdamBuilder.NAME, the extension's build folder
WATCH_AFTER_S = 300.0  # FusedAdam's first build takes about a minute, the CPU comm op about one


def build_lock(name: str) -> Path | None:
    """The lock file torch's JIT build of extension ``name`` uses; None where torch's layout
    cannot be read (the watch is then off)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, False)) / "lock"
    except Exception:  # noqa: BLE001 - a private torch helper: its signature may change
        return None


def stale_lock_message(lock: Path, name: str, waited_s: float) -> str:
    try:
        age = f", made {(time.time() - lock.stat().st_mtime) / 60:.0f} min ago"
    except OSError:
        age = ""
    return (f"warning: waited {waited_s:.0f} s for {name}'s build lock {lock}{age}: torch waits "
            "while that file exists. A build that was killed (SIGKILL, out of memory, a job's time "
            f"limit) leaves it behind; if no other process is building {name}, remove it: "
            f"rm {lock}")


def held_here(lock: Path) -> bool:
    """Whether this process has ``lock`` open: torch's build (``FileBaton``) keeps the lock file
    it made open until the build ends, so this process is the one building (a slow build, not a
    killed one's lock). False where ``/proc/self/fd`` cannot be read (not Linux)."""
    try:
        target = lock.resolve()
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if Path(os.readlink(f"/proc/self/fd/{fd}")) == target:
                return True
        except OSError:  # closed since listed (the listing's own descriptor among them)
            continue
    return False


@contextlib.contextmanager
def watch_build_lock(name: str, after_s: float = WATCH_AFTER_S, stream=None):
    """While the block runs, say once on ``stream`` (default stderr) if it has taken ``after_s``
    seconds and extension ``name``'s build lock is still there."""
    lock = build_lock(name)
    if lock is None:
        yield
        return
    started = time.monotonic()

    def check() -> None:
        if lock.exists() and not held_here(lock):
            print(stale_lock_message(lock, name, time.monotonic() - started),
                  file=stream or sys.stderr, flush=True)

    timer = threading.Timer(after_s, check)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def remove_lock_of_killed_build(name: str, build_started: float) -> Path | None:
    """After killing a build of extension ``name`` begun at ``build_started`` (``time.time()``):
    remove its lock when the lock was made since then (by the killed build: another process's
    lock made before it would be older). Returns the lock removed, else None."""
    lock = build_lock(name)
    if lock is None:
        return None
    try:
        if lock.stat().st_mtime < build_started - 1.0:  # 1 s: file-system timestamp rounding
            return None
        lock.unlink()
    except OSError:
        return None
    return lock
