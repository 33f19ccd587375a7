"""``siasam-fast runs``: one table of training runs, for comparing them (a baseline against
SiaSamRea, an ablation, seeds).

Each run folder (``train.out_dir``) is read from what training writes there: ``config.json``
(task, siamese alpha, clips), ``metrics_epochs.csv`` (the evaluation after each epoch),
``summary.json`` (written when the run ends: steps, speed, the test evaluation) and the
checkpoints' ``latest``. A run that has not ended (still training, or stopped by a signal) is
shown with the epochs it has evaluated so far. Nothing is written into the run folders.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

COLUMNS = ("run", "task", "alpha", "clips", "status", "epochs", "best_split", "best_metric",
           "best", "best_epoch", "last", "test", "steps_per_s")  # best_split / _metric: headers


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_folders(paths: list[str | Path]) -> list[Path]:
    """The run folders among ``paths``: a folder with a ``config.json`` is a run; another folder
    stands for the runs directly inside it (``runs/``), sorted by name."""
    found = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise ValueError(f"{str(given)!r} is not a folder: give run folders (train.out_dir) or "
                             "a folder of them, e.g. runs/")
        if (path / "config.json").is_file():
            found.append(path)
            continue
        inner = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
        if not inner:
            raise ValueError(f"{str(given)!r} is neither a run folder (no config.json) nor a "
                             "folder of runs")
        found += inner
    return found


def summarize_run(path: Path) -> dict:
    """One row of the table (``COLUMNS``) for the run folder ``path``."""
    from siasam_fast.training import best_epoch

    config = _read_json(path / "config.json") or {}
    task = config.get("task", "?")
    metric = "mse" if task == "count" else "accuracy"
    split = config.get("eval", {}).get("split", "val")
    history = []
    if (path / "metrics_epochs.csv").is_file():
        with (path / "metrics_epochs.csv").open() as fh:
            history = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    summary = _read_json(path / "summary.json")
    latest = path / "checkpoints" / "latest"
    saved_step = None
    if latest.is_file():
        tag = latest.read_text().strip()
        saved_step = int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None
    if summary is not None and (saved_step is None or summary.get("steps", 0) >= saved_step):
        status = "done"
    elif saved_step is not None:
        status = f"saved at step {saved_step}"
    else:
        status = "no checkpoint"
    best = best_epoch(history, split, metric, path / "checkpoints")
    key = f"{split}_{metric}"
    last = next((r[key] for r in reversed(history) if isinstance(r.get(key), (int, float))), None)
    test = (summary or {}).get("test", {}).get(metric)
    return {
        "run": str(path), "task": task,
        "alpha": config.get("siamese", {}).get("alpha"),
        "clips": config.get("sampling", {}).get("num_clips"),
        "status": status, "epochs": len(history),
        "best_split": split, "best_metric": metric,  # the run's evaluation, best or not
        "best": best[metric] if best else None, "best_epoch": best["epoch"] if best else None,
        "last": last, "test": test, "steps_per_s": (summary or {}).get("steps_per_s"),
    }


def _cell(value, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and column in ("best", "last", "test", "steps_per_s"):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (the metric's name in the best / last / test headers
    when every run has the same one)."""
    metrics = {r["best_metric"] for r in rows if r["best_metric"]}
    name = metrics.pop() if len(metrics) == 1 else "metric"
    splits = {r["best_split"] for r in rows if r["best_split"]}
    split = splits.pop() if len(splits) == 1 else "eval"
    headers = {"best": f"best {split} {name}", "best_epoch": "at epoch",
               "last": f"last {split} {name}", "test": f"test {name}", "steps_per_s": "steps/s"}
    shown = [c for c in COLUMNS if c not in ("best_split", "best_metric")]
    table = [[headers.get(c, c) for c in shown]]
    table += [[_cell(r[c], c) for c in shown] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(shown))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in table)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
