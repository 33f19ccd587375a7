"""Shared plumbing of the benchmark scripts: environment record, table printing, CSV and plots,
and the argparse ``type=`` checks of their options."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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
    """Write rows (each merged with ``env``) to ``path``; columns are the union of the keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = [{**(env or {}), **r} for r in rows]
    columns: list[str] = []
    for r in merged:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(merged)
    return path


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
