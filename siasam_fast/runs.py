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

from siasam_fast.paths import folder_holder

COLUMNS = ("run", "task", "alpha", "clips", "status", "epochs", "best_split", "best_metric",
           "best", "best_epoch", "last", "test", "steps_per_s")  # best_split / _metric: headers


# The files training writes in a run folder (its own, which --csv must not replace)
RUN_OUTPUTS = ("config.json", "ans2label.json", "metrics_epochs.csv", "metrics_steps.csv",
               "summary.json", "predictions_test.jsonl")


def _number(text: str):
    """A CSV cell back as the int or float it was written from (text if it is neither)."""
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


def task_metric(task: str) -> str:
    """The metric a task is evaluated by: MSE for count (lower is better), accuracy otherwise."""
    return "mse" if task == "count" else "accuracy"


# Each run's best epoch (summary.json's "best", train.keep_best, train.early_stop)


def best_epoch(history: list[dict], split: str, metric: str, ckpt_dir: Path) -> dict | None:
    """The epoch whose ``split`` evaluation was best (highest accuracy, lowest MSE; the earliest
    of equals), as the paper reports its results ("validate ... after each epoch ... report the
    best metrics"): ``{"split", "epoch", "step", <the split's metrics>, "checkpoint"}`` (the
    checkpoint saved at that epoch's end while ``train.keep_checkpoints`` keeps it, else None)."""
    key = f"{split}_{metric}"
    rows = [r for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not rows:
        return None
    sign = -1 if metric == "mse" else 1
    row = max(rows, key=lambda r: (sign * r[key], -r["epoch"]))
    tag = ckpt_dir / f"step{int(row['step'])}"
    return {"split": split, "epoch": int(row["epoch"]), "step": int(row["step"]),
            **{k[len(split) + 1:]: v for k, v in row.items() if k.startswith(split + "_")},
            "checkpoint": str(tag) if tag.is_dir() else None}


def early_stop_reason(history: list[dict], split: str | None, metric: str,
                      patience: int) -> str | None:
    """Why training stops here (``train.early_stop``): the last ``patience`` evaluated epochs gave
    no better ``split`` metric than the best before them; None to go on."""
    if not patience or not split:
        return None
    best = best_epoch(history, split, metric, Path("/nonexistent"))
    evaluated = [int(r["epoch"]) for r in history if f"{split}_{metric}" in r]
    if best is None or not evaluated or max(evaluated) - best["epoch"] < patience:
        return None
    return (f"early stop (train.early_stop={patience}): {split} {metric} has not improved for "
            f"{max(evaluated) - best['epoch']} epochs since epoch {best['epoch']} "
            f"({best[metric]:.4f})")


def best_line(best: dict) -> str:
    metric = "mse" if "mse" in best else "accuracy"
    where = (f"checkpoint {best['checkpoint']}" if best["checkpoint"] else
             "its checkpoint is no longer kept (train.keep_checkpoints)")
    return (f"best {best['split']} {metric} {best[metric]:.4f} at epoch {best['epoch']} "
            f"(step {best['step']}; {where})")


def kept_best_tag(history: list[dict], cfg, split: str | None, ckpt_dir: Path) -> str | None:
    """The tag ``train.keep_best`` keeps from pruning: the best ``split`` epoch's so far (None
    with keep_best off, no evaluation during training, or no finite metric yet)."""
    if not (cfg.train.keep_best and split):
        return None
    best = best_epoch(history, split, task_metric(cfg.task), ckpt_dir)
    return f"step{best['step']}" if best else None


RUN_SEARCH_DEPTH = 3  # folders below a given one searched for runs (runs/demo/baseline: 2)


def _runs_below(path: Path, depth: int) -> list[Path]:
    """The run folders under ``path`` (not itself), at most ``depth`` levels down, sorted by
    path; a run's own subfolders and hidden folders (a demo's unfinished .NAME.partial) are not
    searched."""
    found = []
    for inner in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (inner / "config.json").is_file():
            found.append(inner)
        elif depth > 1:
            found += _runs_below(inner, depth - 1)
    return found


def run_folders(paths: list[str | Path]) -> list[Path]:
    """The run folders among ``paths``: a folder with a ``config.json`` is a run; another folder
    stands for the runs under it (``runs/``; up to :data:`RUN_SEARCH_DEPTH` levels down, so a
    demo's two runs in ``runs/demo/`` too), sorted by path."""
    found = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise ValueError(f"{str(given)!r} is not a folder: give run folders (train.out_dir) or "
                             "a folder of them, e.g. runs/")
        if (path / "config.json").is_file():
            found.append(path)
            continue
        inner = _runs_below(path, RUN_SEARCH_DEPTH)
        if not inner:
            raise ValueError(f"{str(given)!r} is neither a run folder (no config.json) nor a "
                             f"folder of runs (none within {RUN_SEARCH_DEPTH} levels)")
        found += inner
    seen: set[Path] = set()  # each run once (runs/a runs/: a is in both)
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


def summarize_run(path: Path) -> dict:
    """One row of the table (``COLUMNS``) for the run folder ``path``."""
    config = _read_json(path / "config.json") or {}
    task = config.get("task", "?")
    metric = task_metric(task)
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
    # summary.json of an earlier end (a finished run resumed with more train.epochs) is not the
    # last model's: its test metric is left out
    current = summary is not None and (saved_step is None or summary.get("steps", 0) >= saved_step)
    if current:
        # a run train.max_steps stopped is saved, not done: --resume auto continues it
        status = (f"max_steps at step {summary.get('steps')}"
                  if summary.get("ended") == "max_steps" else "done")
    elif saved_step is not None:
        status = f"saved at step {saved_step}"
    else:
        status = "no checkpoint"
    holder = folder_holder(path)
    if holder is not None:  # training now (a resumed run too): not stopped where it saved
        where = f" on {holder['host']}" if holder.get("host") else ""
        status = f"training{where}" + (f", saved at step {saved_step}" if saved_step else "")
    best = best_epoch(history, split, metric, path / "checkpoints")
    key = f"{split}_{metric}"
    last = next((r[key] for r in reversed(history) if isinstance(r.get(key), (int, float))), None)
    test = summary.get("test", {}).get(metric) if current else None
    sampling = config.get("sampling", {})
    clips = sampling.get("num_clips")
    if clips is not None and sampling.get("placement", "siamese") != "siamese":
        clips = f"{clips} {sampling['placement']}"  # e.g. "8 sparse": not a siamese group
    return {
        "run": str(path), "task": task,
        "alpha": config.get("siamese", {}).get("alpha"),
        "clips": clips,
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
    mixed = name == "metric"  # (count's MSE, lower is better, beside accuracies): each value
    table += [[_cell(r[c], c) + (f" {r['best_metric']}" if mixed and c in ("best", "last", "test")
                                  and _cell(r[c], c) != "-" else "")
               for c in shown] for r in rows]  # names its metric
    widths = [max(len(line[i]) for line in table) for i in range(len(shown))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in table)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
