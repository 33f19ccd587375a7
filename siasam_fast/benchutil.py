"""Shared plumbing of the benchmark scripts: environment record, table printing, CSV and plots,
and the argparse ``type=`` checks of their options."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from siasam_fast.paths import write_text_atomic

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def environment() -> dict:
    """Device and library versions, recorded beside every benchmark row."""
    import numpy
    import torch

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        major, minor = torch.cuda.get_device_capability(0)
        env["capability"] = f"{major}.{minor}"
    else:
        env["device"] = "cpu"
    for name in ("triton", "transformers", "deepspeed", "av"):
        env[name] = _version(name)
    env["dali"] = _version("nvidia.dali")
    return env


def environment_isolated(timeout: float = 120.0) -> dict:
    """:func:`environment`, gathered in a child process: its imports (transformers, DeepSpeed,
    Triton, ...) stay out of this process, so that DataLoader workers forked later do not inherit
    them. Falls back to :func:`environment` here when the child fails."""
    code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
            "from siasam_fast.benchutil import environment; print(json.dumps(environment()))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(sys.path)],
                              capture_output=True, text=True, timeout=timeout, check=True)
        env = json.loads(proc.stdout.strip().splitlines()[-1])
        if isinstance(env, dict):
            return env
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        pass
    return environment()


def _version(module: str) -> str:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - any import failure means "not installed" here
        return "not installed"


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A fixed-width text table (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """The same table in Markdown, for the README."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def write_csv(rows: Sequence[dict], path: str | os.PathLike, env: dict | None = None) -> Path:
    """Write rows (each merged with ``env``) to ``path``; columns are the union of the keys.

    Atomic: written to a temporary file beside ``path``, then renamed over it, so a run killed
    while writing (benchmarks rewrite their CSV after every measurement) leaves the previous
    complete version, never a torn file."""
    merged = [{**(env or {}), **r} for r in rows]
    columns: list[str] = []
    for r in merged:
        columns += [k for k in r if k not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(merged)
    return write_text_atomic(path, text.getvalue())


def partial_path(path: str | os.PathLike) -> Path:
    """Where a run still in progress keeps ``path``'s rows: NAME.partial.csv beside NAME.csv."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def finish_csv(rows: Sequence[dict], path: str | os.PathLike, env: dict | None = None) -> Path:
    """Write a finished run's rows to ``path`` and drop its partial file (:func:`partial_path`,
    rewritten after each measurement while the run went on): a run stopped early leaves its rows
    in the partial file and an earlier finished run's ``path`` as it was."""
    written = write_csv(rows, path, env)
    partial_path(path).unlink(missing_ok=True)
    return written


def report_interrupted(path: str | os.PathLike, wrote_partial: bool) -> int:
    """Say where a run stopped by Ctrl-C left its rows; the exit status (130, as for SIGINT)."""
    print(f"\ninterrupted: the rows measured so far are in {partial_path(path)}; "
          f"{Path(path).name} is as it was" if wrote_partial else
          f"\ninterrupted before the first measurement: {Path(path).name} is as it was",
          file=sys.stderr)
    return 130


class RowLog:
    """The rows of a benchmark run in progress, kept on disk as it goes.

    ``add(row)`` keeps a row and, once any row holds a result (``has_result``), rewrites
    NAME.partial.csv (:func:`partial_path`) with every row so far; ``finish()`` writes NAME.csv
    and drops the partial file. A run stopped early (Ctrl-C, a time limit) thus keeps what it
    measured in the partial file, and an earlier finished run's NAME.csv stays as it was until
    this run finishes. ``env`` (the environment columns) is made on the first write, by
    ``make_env``."""

    def __init__(self, path: str | os.PathLike, make_env: Callable[[], dict],
                 has_result: Callable[[dict], bool]):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.env: dict = {}
        self.wrote_partial = False
        self._make_env = make_env
        self._has_result = has_result

    def measured(self) -> bool:
        return any(self._has_result(r) for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.measured():
            if not self.env:
                self.env.update(self._make_env())
            write_csv(self.rows, partial_path(self.path), self.env)
            self.wrote_partial = True

    def finish(self) -> Path:
        return finish_csv(self.rows, self.path, self.env)

    def interrupted(self) -> int:
        return report_interrupted(self.path, self.wrote_partial)


def results_path(name: str, out_dir: str | os.PathLike | None = None) -> Path:
    return Path(out_dir) / name if out_dir else RESULTS_DIR / name


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def report_no_rows(path: str | os.PathLike, why: str = "") -> int:
    """Say that a run measured nothing and that ``path`` was left as it was; the exit status (1).
    A run with no rows never writes its result file, so an earlier run's results survive."""
    kept = "the existing file is kept" if Path(path).exists() else "no file written"
    print(f"no rows measured{f' ({why})' if why else ''}: {path} not written ({kept})",
          file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------------------------
# argparse ``type=`` checks: a bad value is refused while parsing ("error: argument --batch-size:
# invalid value '0': must be an integer >= 1", exit status 2), before any work starts.


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (``high`` None: no upper bound)."""
    valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def check(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {valid}")
        return value

    check.__name__ = valid.removeprefix("an ")
    return check


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    return int_in_range(minimum)


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a number > 0")
    return value


def nonneg_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a number >= 0")
    return value


def existing_file(text: str) -> Path:
    """An argparse type: the path of a file that exists."""
    path = Path(text)
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {why}: give an existing file")
    return path


# --dali-trim of the pipeline benchmarks: which of whole files (False) and trimmed ones (True)
# DALI decodes, in the order measured.
DALI_TRIM_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


# ----------------------------------------------------------------------------------------------
# Loader throughput: warm-up, rounds and the steady rate (bench_pipeline, bench_transcode).
#
# A loader delivers batches in rounds: PyAV's DataLoader gives batch i to worker i mod W, and the
# W workers, started together, finish their batches at about the same time, so W batches arrive
# at once, then nothing for a batch's decode time. DALI delivers one decode group per iteration.
# A rate counted from one arrival to another inside a round counts a round's videos over almost
# no time; so the steady rate counts whole rounds only, from a round's end to a later round's end,
# after a warm-up of the batches the loader queues before the first one is taken (PyAV: W x
# prefetch_factor; DALI: its prefetch depth in iterations), which carry the start-up's skew.

MIN_STEADY_ROUNDS = 4  # whole rounds after the warm-up for a steady figure that is not "short"


@dataclass(frozen=True)
class Rounds:
    """How a loader's batches arrive: ``round_batches`` at a time (one round), the first
    ``warmup_batches`` (whole rounds) being start-up."""

    round_batches: int
    warmup_batches: int

    def __post_init__(self) -> None:
        if self.round_batches < 1 or self.warmup_batches < 1:
            raise ValueError(f"{self}: a round and the warm-up hold at least one batch")
        if self.warmup_batches % self.round_batches:
            raise ValueError(f"{self}: the warm-up must be whole rounds")

    def cell_batches(self, steady_rounds: int = MIN_STEADY_ROUNDS) -> int:
        """Batches of a cell sized for ``steady_rounds`` whole rounds after the warm-up."""
        return self.warmup_batches + steady_rounds * self.round_batches


def pyav_rounds(workers: int, prefetch_factor: int = 2) -> Rounds:
    """PyAV's DataLoader: a round is one batch per worker; the warm-up is the
    ``workers x prefetch_factor`` batches queued at the start (in this process, workers=0: the
    first batch)."""
    if workers <= 0:
        return Rounds(1, 1)
    return Rounds(workers, workers * prefetch_factor)


def dali_rounds(decode_group: int = 1, prefetch_depth: int = 2) -> Rounds:
    """DALI: a round is one iteration (a decode group of batches); the warm-up is its prefetch
    queue's depth in iterations."""
    return Rounds(decode_group, decode_group * prefetch_depth)


@dataclass(frozen=True)
class Steady:
    """The steady part of a timeline: ``videos_per_s`` (None: no whole round after the warm-up),
    the whole ``rounds`` counted, their ``videos`` and ``seconds``."""

    videos_per_s: float | None
    rounds: int
    videos: int
    seconds: float


def steady_rate(arrivals: Sequence[float], videos: Sequence[int], rounds: Rounds) -> Steady:
    """Videos per second over the whole rounds after the warm-up.

    ``arrivals[i]``: when batch i arrived (seconds, any origin); ``videos[i]``: its videos. The
    clock starts at the arrival of the warm-up's last batch and stops at the arrival of the last
    batch of the last whole round; the videos counted are those of the batches in between (after
    the warm-up, up to that batch). A partial last round is left out."""
    if len(arrivals) != len(videos):
        raise ValueError(f"{len(arrivals)} arrival times for {len(videos)} batch sizes")
    warm, per = max(1, rounds.warmup_batches), rounds.round_batches  # the clock starts at a batch
    whole = max(0, (len(arrivals) - warm) // per)
    if whole == 0:
        return Steady(None, 0, 0, 0.0)
    end = warm + whole * per  # one past the last batch counted
    counted = int(sum(videos[warm:end]))
    seconds = float(arrivals[end - 1] - arrivals[warm - 1])
    return Steady(counted / seconds if seconds > 0 else None, whole, counted, seconds)


def stop_now(arrivals: Sequence[float], rounds: Rounds, *, max_seconds: float | None = None,
             hard_max_seconds: float | None = None,
             min_steady_rounds: int = MIN_STEADY_ROUNDS) -> bool:
    """Whether a cell stops after its latest batch (``arrivals``: seconds since the cell began).

    - ``hard_max_seconds``: the cell stops at the first arrival at or past it, and at a round's
      end when the next round, as long as the last one (the first: as long as the start-up and
      that round), would end past it;
    - ``max_seconds``: once the cell holds ``min_steady_rounds`` whole rounds after the warm-up,
      it stops at a round's end when the next round would end past ``max_seconds``.

    Checked only when a batch arrives (a batch cannot be cut), so a cell may overrun the hard cap
    by one batch interval at most, and its first batch (the start-up) is never cut."""
    n = len(arrivals)
    if n == 0:
        return False
    now = arrivals[-1]
    if hard_max_seconds is not None and now >= hard_max_seconds:
        return True
    per = rounds.round_batches
    if n % per:  # inside a round: its other batches are on their way
        return False
    period = now - (arrivals[n - 1 - per] if n > per else 0.0)
    if hard_max_seconds is not None and now + period > hard_max_seconds:
        return True
    steady = max(0, (n - rounds.warmup_batches) // per)
    return (max_seconds is not None and steady >= min_steady_rounds
            and now + period > max_seconds)
