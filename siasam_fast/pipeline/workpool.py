"""A crash-tolerant process pool for per-video work (probing, transcoding).

Video decoders and encoders can kill the process they run in on a bad file. ``imap_isolated`` runs
a function over items in spawned processes with bounded in-flight work (progress bars stay honest,
memory flat) and yields results in completion order; when a worker dies, the pool is abandoned and
the remaining items run one per fresh process, so only the item that crashes fails.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool


def imap_isolated(fn: Callable, items: Iterable, workers: int, on_crash: Callable,
                  in_flight_per_worker: int = 2) -> Iterator:
    """``fn(item)`` for every item, in completion order; ``on_crash(item)`` for an item whose
    process died. ``fn`` must be picklable (a module-level function)."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    # spawn: the parent may hold torch / CUDA state that must not be forked.
    context = multiprocessing.get_context("spawn")
    crashed: list = []
    queue = iter(items)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                             initializer=die_with_parent) as pool:
        try:
            yield from _run_pool(pool, fn, queue, workers * in_flight_per_worker, crashed)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM, the consumer stopped): the work in
            _abandon(pool)  # flight is dropped at once, not waited for, and no worker outlives us
            raise
        crashed += list(queue)
    for item in crashed:
        yield _run_alone(fn, item, on_crash, context)


def _run_pool(pool, fn: Callable, queue: Iterator, in_flight: int, crashed: list) -> Iterator:
    pending = {pool.submit(fn, item): item for item in _take(queue, in_flight)}
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            item = pending.pop(future)
            try:
                yield future.result()
            except BrokenProcessPool:
                crashed.append(item)
                continue
            if not crashed:
                for nxt in _take(queue, 1):
                    try:
                        pending[pool.submit(fn, nxt)] = nxt
                    except BrokenProcessPool:  # a worker died since this future finished
                        crashed.append(nxt)


def _abandon(pool: ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()


def die_with_parent(parent: int | None = None) -> None:
    """A worker ends when its parent does (Linux), even one killed with SIGKILL: no orphans.

    Also a ``preexec_fn`` for ``subprocess.Popen``; given the parent's pid (taken before the
    fork), a child whose parent died before this call ends at once too."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if parent is not None and os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)


def _run_alone(fn: Callable, item, on_crash: Callable, context):
    with ProcessPoolExecutor(max_workers=1, mp_context=context,
                             initializer=die_with_parent) as pool:
        try:
            pool.submit(os.getpid).result()
        except BrokenProcessPool as err:
            raise RuntimeError(
                "worker processes die before doing any work (is the main module importable by "
                "a spawned process? run with workers=1)"
            ) from err
        try:
            return pool.submit(fn, item).result()
        except BrokenProcessPool:
            pass
    return on_crash(item)


def _take(iterator: Iterator, n: int) -> list:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) == n:
            break
    return out
