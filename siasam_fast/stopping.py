"""A graceful stop for training: on SIGTERM, SIGINT or SIGUSR1 the run finishes its current step,
saves a checkpoint and exits with status 128 + the signal's number (143 for SIGTERM, 130 for
Ctrl-C), so that ``--resume auto`` continues it exactly.

Cluster schedulers stop or pre-empt a job with SIGTERM (Slurm, Kubernetes), after a grace period
SIGKILL; ``#SBATCH --signal=TERM@120`` (or ``USR1@120``) asks Slurm to signal the job's ``srun``
steps two minutes before the time limit. ``torchrun`` passes SIGTERM, SIGINT, SIGHUP and SIGQUIT
on to every training process (other signals only when listed in its ``--signals-to-handle``) and
kills 30 s later. On one node the ``deepspeed`` command itself ends at once on SIGTERM, while its
child ``deepspeed.launcher.launch`` passes SIGINT and SIGTERM on, so under Slurm torchrun is the
launcher to use (README, "Stopping and pre-emption"). A second Ctrl-C (a second after the first
or later) stops at once with KeyboardInterrupt; a repeated SIGTERM or SIGUSR1 changes nothing (a
launcher passes on the signal its process group already got, and the scheduler's SIGKILL ends
the grace period).

Several processes must stop at the same step, since the checkpoint is a collective operation. So
they agree every ``CHECK_EVERY`` steps and at each epoch's end, with one all-reduce of one number
over a gloo (CPU) group: no GPU synchronisation, a few hundred microseconds on a node. A single
process checks its flag after every step.

Loader worker processes get the same signals when a scheduler signals the whole process group;
:func:`defer_stop_signals` (the PyAV loader's worker initialiser in training, and DALI's reader
processes) leaves them to the main process, which shuts its workers down as it always does.
Without that, the workers die on SIGTERM and the next batch fails before the checkpoint. While
their main process is in a graceful stop (it got the signal too), they stay as long as it lives;
otherwise (a SIGTERM that only the worker got) they leave ``WORKER_GRACE_S`` later.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
# Steps between the processes' agreement on stopping (several processes only), besides the last
# step of every epoch.
CHECK_EVERY = 10
# A second signal this soon after the first is the launcher passing on the same stop.
REPEAT_WINDOW_S = 1.0
# How long a loader worker outlives a SIGTERM that its main process did not take as a stop (its
# exit handler's, say): then nothing waits for its batches.
WORKER_GRACE_S = 30.0


def _shared_flag():
    try:
        return multiprocessing.RawValue("b", 0)
    except OSError:  # no shared memory to be had (a read-only /dev/shm and temp dir): workers
        return None  # then keep the grace period


# Set by a process that takes a stop signal as a graceful stop (StopRequest): shared memory made
# at import, so the loader workers it forks later read it. While it is set, a worker outlives a
# SIGTERM for as long as its main process lives: the step and the save may take longer than any
# fixed grace (a scheduler's 120 s, a slow disk), and the worker's batch may be needed first.
IN_GRACEFUL_STOP = _shared_flag()
# How often a worker that got a SIGTERM looks at its main process
WATCH_EVERY_S = 0.5


def defer_stop_signals(*_args) -> None:
    """In a loader worker: SIGINT and SIGUSR1 are ignored, and SIGTERM does not end the process
    at once. Its main process decides: training finishes its step (which may be waiting for this
    worker's batch) and saves a checkpoint, then shuts its workers down as it always does. After
    a SIGTERM the worker exits (status 0, so that PyTorch does not report a worker killed
    mid-epoch) when its main process is gone, or ``WORKER_GRACE_S`` later unless its main
    process is in a graceful stop (:data:`IN_GRACEFUL_STOP`: shared with the workers it forks;
    DALI's spawned readers, which get this function pickled by value, see no flag and keep the
    grace period), or at a second SIGTERM more than ``REPEAT_WINDOW_S`` after the first. The
    last two end a worker that nobody shuts down, e.g. when its main process fails and Python's
    exit handler SIGTERMs it and waits. Accepts and ignores arguments, so that it serves as a
    ``worker_init_fn``. Self-contained (DALI's reader processes cannot import this package)."""
    if getattr(defer_stop_signals, "installed_in", None) == os.getpid():
        return  # (DALI's readers call it for every batch)
    for name in ("SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    # looked up, not named: a copy pickled by value then finds none (and no module to import)
    flag = globals().get("IN_GRACEFUL_STOP")
    grace_s, every_s, window_s = WORKER_GRACE_S, WATCH_EVERY_S, REPEAT_WINDOW_S
    first: list[float] = []

    def leave_when_unneeded(parent: int, since: float) -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:  # (re-parented: its main process is gone)
                os._exit(0)
            if time.monotonic() - since >= grace_s and not (flag is not None and flag.value):
                os._exit(0)

    def on_sigterm(number, frame):
        now = time.monotonic()
        if first:  # the group's signal again (within the window), else its parent's exit
            if now - first[0] > window_s:
                os._exit(0)
            return
        first.append(now)
        threading.Thread(target=leave_when_unneeded, args=(os.getppid(), now),
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    defer_stop_signals.installed_in = os.getpid()


def _set_graceful(value: int) -> None:
    if IN_GRACEFUL_STOP is not None:
        IN_GRACEFUL_STOP.value = value


def _install(handler) -> dict[int, object]:
    """``handler`` for every stop signal (in the main thread only: elsewhere nothing); the
    previous handlers, by signal number."""
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                number = getattr(signal, name)
                previous[number] = signal.signal(number, handler)
    return previous


class StopRequest:
    """Within ``with StopRequest(world, group):``, the stop signals set a flag instead of ending
    the process; ``should_stop(step)`` says (the same on every process) when to stop. Outside the
    main thread it installs nothing and never asks to stop. The previous handlers come back on
    exit."""

    def __init__(self, world_size: int = 1, group=None, check_every: int = CHECK_EVERY,
                 announce: bool = True):
        self.world_size, self.group, self.check_every = int(world_size), group, int(check_every)
        self.announce = announce  # print the stop's line (one process of several: process 0)
        self.signal: str | None = None  # the first stop signal received here (or by a peer)
        self._since = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        self._previous = _install(self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        _set_graceful(0)  # (over: a worker's SIGTERM from an exit handler ends it)
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        name = signal.Signals(number).name
        now = time.monotonic()
        if self.signal is not None:
            # Launchers pass on the signal their process group also got (torchrun, deepspeed):
            # a repeat within REPEAT_WINDOW_S is that echo. A later Ctrl-C stops at once;
            # SIGTERM / SIGUSR1 repeats are left to the scheduler's own SIGKILL.
            if number == signal.SIGINT and now - self._since > REPEAT_WINDOW_S:
                self._restore()
                raise KeyboardInterrupt
            return
        self.signal, self._since = name, now
        _set_graceful(1)  # (its loader workers stay until it shuts them down)
        again = "; Ctrl-C again stops at once" if number == signal.SIGINT else ""
        if self.announce:
            print(f"\n{name}: stopping after this step with a checkpoint (resume with --resume "
                  f"auto){again}", file=sys.stderr, flush=True)

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, the shell's status for a process ended by it."""
        if self.signal is None or not hasattr(signal, self.signal):
            return 128 + int(signal.SIGTERM)  # a peer's signal (its name is not known here)
        return 128 + int(getattr(signal, self.signal))

    def should_stop(self, step: int, epoch_end: bool = False) -> bool:
        """Whether to stop after step ``step``: at once for one process; for several, at the
        next multiple of ``check_every`` or epoch end (``epoch_end``: every process passes the
        same) after any of them got a signal, all of them together."""
        if self.world_size <= 1:
            return self.signal is not None
        if step % self.check_every and not epoch_end:
            return False
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signal is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item() and self.signal is None:
            self.signal = "another process's stop signal"
        return bool(flag.item())


class Stopped(BaseException):
    """A stop signal received within :func:`stop_raises` (a BaseException, as KeyboardInterrupt:
    no ``except Exception`` swallows it)."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.name = signal.Signals(number).name
        self.exit_status = 128 + int(number)


class stop_raises:  # noqa: N801 - used as a context manager, like a function
    """Within ``with stop_raises():``, a stop signal raises :class:`Stopped` at once: for work that
    cannot stop halfway with a checkpoint but can be redone on resume (training's test evaluation,
    after its last checkpoint). Outside the main thread it installs nothing. The previous handlers
    come back on exit."""

    def __enter__(self) -> stop_raises:
        self._previous = _install(self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and issubclass(exc_type, Stopped):
            # The process is on its way out: the launcher's echo of the same stop (torchrun and
            # the deepspeed launcher pass on what their group also got; the demo and ablation
            # SIGTERM their training after a Ctrl-C) must not kill it (-15) or print a
            # KeyboardInterrupt traceback. A later Ctrl-C still stops at once.
            for number in self._previous:
                signal.signal(number, self._echo)
            self._previous = {}
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    _since = 0.0

    def _handle(self, number, frame) -> None:
        stop_raises._since = time.monotonic()
        for other in self._previous:  # a second signal while the first one unwinds: ignored
            signal.signal(other, self._echo)
        raise Stopped(number)

    @staticmethod
    def _echo(number, frame) -> None:
        if number == signal.SIGINT and time.monotonic() - stop_raises._since > REPEAT_WINDOW_S:
            raise KeyboardInterrupt
