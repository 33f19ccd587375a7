"""``siasam-fast demo`` / ``make demo``: one-clip baseline vs SiaSamRea on synthetic VideoQA, CPU.

Steps: (1) generate the embedded synthetic set (:mod:`siasam_fast.data.synthetic`) under
``<out>/data``, or reuse it when its meta.json says it was made with the same seed, size and knobs;
(2) train the baseline (alpha = 0, the anchor clip only: ``sampling.num_clips=1``) and SiaSamRea
(SKG + SKR, alpha = 1, N = 9 clips) one after the other, each in its own
``python -m siasam_fast.training`` process (a clean DeepSpeed process, its progress bars streamed);
(3) both are evaluated on the test split with the anchor clip only (middle placement), as the paper
does; (4) a comparison table (overall, per synthetic question type, and split by whether the
question's evidence shows on a frame of the evaluation clip), ``<out>/summary.json`` and
``<out>/learning_curves.png``.

The run settings are ``configs/demo.yaml`` (same hyper-parameters for both models; only the method
switches differ, :data:`METHODS`); the synthetic-set knobs are :data:`SYNTHETIC`. Why these values,
and what every measured experiment behind them gave, is in docs/experiments.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from siasam_fast.paths import packaged_config

DEMO_CONFIG = packaged_config("demo.yaml")  # installed with the package, or the checkout's

# The synthetic set of the demo (SynthConfig knobs; docs/experiments.md says why). Only the two
# colour questions are written: "color" (the big object, visible in every frame: the control) and
# "flash" (the border blinks on 1-2 frames of every 4: a stride-4 clip sees it all or not at all,
# the case where siamese clips see what the anchor misses). Every event is still rendered.
SYNTHETIC = {
    "num_videos": 800,
    "size": 48,
    "question_types": ["color", "flash"],
}
# quick=True: a smoke test of the whole path (~20 s on 2 cores), not a measurement.
QUICK_SYNTHETIC = {"num_videos": 24}
QUICK_OVERRIDES = ["train.epochs=1", "train.batch_size=4", "eval.batch_size=8"]

# The only differences between the two runs: the method switches.
METHODS = {
    "baseline": ["siamese.alpha=0", "sampling.num_clips=1"],
    "siasamrea": ["siamese.alpha=1", "sampling.num_clips=9", "siamese.skg=true"],
}


# ------------------------------------------------------------------------------------------------
# Data


def synthetic_options(videos: int | None, quick: bool) -> dict:
    opts = {**SYNTHETIC, **(QUICK_SYNTHETIC if quick else {})}
    if videos is not None:
        opts["num_videos"] = int(videos)
    return opts


def _normalised(value):
    return json.loads(json.dumps(value))


def dataset_matches(data_dir: Path, seed: int, options: dict) -> bool:
    """Whether ``data_dir`` already holds the set :func:`ensure_dataset` would generate."""
    from siasam_fast.data.synthetic import GENERATOR_VERSION, SynthConfig
    from siasam_fast.pipeline.manifest import load_manifest

    meta_file, manifest = data_dir / "meta.json", data_dir / "manifest.jsonl"
    if not (meta_file.is_file() and manifest.is_file()):
        return False
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    knobs = {k: v for k, v in options.items() if k != "num_videos"}
    wanted = _normalised(asdict(SynthConfig.from_dict(knobs)))
    if (meta.get("version"), meta.get("seed"), meta.get("num_videos"), meta.get("params")) != (
        GENERATOR_VERSION,
        seed,
        options["num_videos"],
        wanted,
    ):
        return False
    try:
        records = load_manifest(manifest)
    except ValueError:  # a truncated or foreign manifest: generate again
        return False
    return sum(r.ok for r in records.values()) == options["num_videos"]


def ensure_dataset(data_dir: str | os.PathLike, seed: int, options: dict, workers: int = 2) -> Path:
    """Generate the synthetic set and its manifest, unless ``data_dir`` already holds it.

    ``data_dir`` must be new, empty or a synthetic set (regenerated when it does not match):
    a folder holding anything else is refused with a ValueError before anything is written."""
    from siasam_fast.data.synthetic import check_output_dir, generate
    from siasam_fast.pipeline.manifest import build_manifest

    data_dir = Path(data_dir)
    if dataset_matches(data_dir, seed, options):
        print(f"demo: reusing the synthetic set in {data_dir}")
        return data_dir
    check_output_dir(data_dir, "the demo's data folder")
    opts = dict(options)
    n = opts.pop("num_videos")
    manifest = data_dir / "manifest.jsonl"
    # The videos are about to be rewritten: the old manifest goes first, so a generation cut short
    # is never reused with it (generate also removes meta.json until it completes).
    manifest.unlink(missing_ok=True)
    result = generate(data_dir, n, seed=seed, workers=workers, **opts)
    build_manifest(data_dir / "videos", manifest, workers=workers)
    print(f"demo: synthetic set: {result}")
    return data_dir


# ------------------------------------------------------------------------------------------------
# Training (one subprocess per run)


def data_overrides(data_dir: Path) -> list[str]:
    ann = data_dir / "annotations"
    return [
        f"data.train={ann / 'train_qa.json'}",
        f"data.val={ann / 'val_qa.json'}",
        f"data.test={ann / 'test_qa.json'}",
        f"data.manifest={data_dir / 'manifest.jsonl'}",
    ]


def train_command(config: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    """A fresh training run into ``run_dir``, replacing what an earlier demo (or a run cut short)
    left there: the demo owns its output folder."""
    cmd = [sys.executable, "-m", "siasam_fast.training", "--config", str(config)]
    for item in [*overrides, f"train.out_dir={run_dir}", "train.overwrite=true"]:
        cmd += ["--set", item]
    return cmd


def training_setup(config: str | os.PathLike, overrides: list[str] | tuple = (),
                   manifest: str | os.PathLike | None = None) -> dict:
    """What a training of ``config`` with ``overrides`` runs on here, as the training picks it
    (one process, no DeepSpeed config): the device (the GPU's name, or "cpu"), the precision
    (train.precision, "auto": :func:`ds_config.default_precision`) and the data backend
    (data.backend through :func:`loaders.resolve_backend` for ``manifest``'s codecs). The demo
    reports it (a GPU gives other numbers than the CPU); the ablation reuses only runs made on
    the same."""
    import torch

    from siasam_fast import ds_config
    from siasam_fast.config import load_config
    from siasam_fast.pipeline.loaders import resolve_backend
    from siasam_fast.pipeline.manifest import load_manifest

    try:
        cfg = load_config(config, list(overrides))
        precision, backend = cfg.train.precision, cfg.data.backend
    except (OSError, ValueError):  # the training itself refuses it, with its own message
        precision, backend = "auto", "auto"
    if precision == "auto":
        precision = ds_config.default_precision()
    records = None
    if manifest is not None and Path(manifest).is_file():
        try:
            records = load_manifest(manifest)
        except ValueError:
            records = None
    try:
        backend = resolve_backend(backend, records)
    except ValueError:  # (data.backend=dali without DALI: the training says why)
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": device, "precision": precision, "backend": backend}


def describe_setup(setup: dict) -> str:
    return f"{setup['device']}, {setup['precision']}, data backend {setup['backend']}"


# Exit statuses of a training stopped by SIGINT, SIGTERM or SIGUSR1 (siasam_fast.stopping).
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGUSR1)


class TrainingFailed(RuntimeError):
    """A training of the demo ended with an error (its log says why; the message names it)."""


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    lines = lines[1:] if lines and lines[0].startswith("$ ") else lines  # (the command)
    return lines[-1][:300] if lines else "(no output)"


def run_training(cmd: list[str], log: Path) -> float:
    """Run one training process, its output streamed to stdout and copied to ``log``; returns
    seconds. Raises :class:`TrainingFailed` if it fails."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a clean single-process run, whatever launched us
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                fh.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            proc.wait()
        except BaseException:  # the demo was stopped: the training stops too, not orphaned
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
    if proc.returncode in STOPPED:  # Ctrl-C or a scheduler's stop reached the training too
        raise KeyboardInterrupt
    if proc.returncode != 0:
        raise TrainingFailed(f"training failed with exit code {proc.returncode} (log: {log}, "
                             f"which starts with its command); its last line: {_last_line(log)}")
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------
# Evaluation read-out: test accuracy per synthetic question type and by evidence visibility


def eval_sampling(run_dir: Path):
    """The clip sampling a finished run was evaluated with (its config's ``sampling`` section with
    ``eval.num_clips`` clips per video, as training.py evaluates)."""
    from siasam_fast.sampling import SamplingConfig

    cfg = json.loads((run_dir / "config.json").read_text())
    return replace(SamplingConfig.from_dict(cfg["sampling"]), eval_clips=cfg["eval"]["num_clips"])


def _acc(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def analyse_run(run_dir: str | os.PathLike, meta: dict) -> dict:
    """Test accuracy of one finished run: overall, per question type, by evidence visibility in the
    evaluation clip, plus its per-epoch curves."""
    from siasam_fast.data.synthetic import eval_clip_sees_evidence

    run_dir = Path(run_dir)
    seen = eval_clip_sees_evidence(meta, eval_sampling(run_dir))
    groups: dict[str, list[float]] = defaultdict(list)
    with (run_dir / "predictions_test.jsonl").open() as fh:
        for line in fh:
            row = json.loads(line)
            info = seen[int(row["qid"])]
            value = float(row["accuracy"])
            vis = "visible" if info["visible"] else "hidden"
            groups["all"].append(value)
            groups[vis].append(value)
            groups[info["type"]].append(value)
            groups[f"{info['type']}/{vis}"].append(value)
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [
        {
            "epoch": int(r["epoch"]),
            "train_loss": float(r["train_loss"]),
            "train_loss_gt": float(r.get("train_loss_gt") or r["train_loss"]),
            "train_loss_siamese": float(r["train_loss_siamese"])
            if r.get("train_loss_siamese")
            else None,
            "val_accuracy": float(r["val_accuracy"]) if r.get("val_accuracy") else None,
        }
        for r in csv.DictReader((run_dir / "metrics_epochs.csv").open())
    ]
    types = [t for t in meta["params"]["question_types"] if groups[t]]
    return {
        "accuracy": _acc(groups["all"]),
        "num_test": len(groups["all"]),
        "by_type": {t: _acc(groups[t]) for t in types},
        "evidence_visible": _acc(groups["visible"]),
        "evidence_hidden": _acc(groups["hidden"]),
        "by_type_visibility": {
            t: {
                "visible": _acc(groups[f"{t}/visible"]),
                "hidden": _acc(groups[f"{t}/hidden"]),
                "num_visible": len(groups[f"{t}/visible"]),
                "num_hidden": len(groups[f"{t}/hidden"]),
            }
            for t in types
        },
        "val_accuracy": history[-1]["val_accuracy"] if history else None,
        "best_val_accuracy": max(
            (h["val_accuracy"] for h in history if h["val_accuracy"] is not None), default=None
        ),
        "train_seconds": summary.get("train_seconds"),
        "steps": summary.get("steps"),
        "history": history,
        "run_dir": str(run_dir),
    }


def comparison_rows(results: dict[str, dict]) -> list[dict]:
    """One row per metric, one column per method (+ delta of the last two)."""
    names = list(results)
    first = results[names[0]]
    metrics = [("overall", lambda r: r["accuracy"])]
    for t in first["by_type"]:
        metrics.append((t, lambda r, t=t: r["by_type"].get(t)))
    metrics += [
        ("evidence visible", lambda r: r["evidence_visible"]),
        ("evidence hidden", lambda r: r["evidence_hidden"]),
    ]
    for t, v in first["by_type_visibility"].items():
        if v["num_visible"] and v["num_hidden"]:  # only the types whose evidence can be missed
            metrics += [
                (
                    f"{t}, visible (n={v['num_visible']})",
                    lambda r, t=t: r["by_type_visibility"][t]["visible"],
                ),
                (
                    f"{t}, hidden (n={v['num_hidden']})",
                    lambda r, t=t: r["by_type_visibility"][t]["hidden"],
                ),
            ]
    metrics.append(("val accuracy (last epoch)", lambda r: r["val_accuracy"]))
    rows = []
    for label, get in metrics:
        row = {"test accuracy": label, **{n: get(results[n]) for n in names}}
        a, b = row[names[0]], row[names[-1]]
        row["delta"] = b - a if a is not None and b is not None else None
        rows.append(row)
    return rows


def _round3(value):
    """``value`` as a string with 3 decimals, halves rounded away from zero (the accuracies are
    ratios such as 42/160 = 0.2625, which binary floats hold as 0.26249999...)."""
    if not isinstance(value, float) or not math.isfinite(value):
        return value
    rounded = Decimal(repr(round(value, 9))).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP)
    return str(rounded if rounded else abs(rounded))  # no "-0.000"


def printed_rows(rows: list[dict]) -> list[dict]:
    """The comparison table as the demo prints it: every number rounded to 3 decimals
    (summary.json keeps the unrounded values)."""
    return [{k: _round3(v) for k, v in row.items()} for row in rows]


def plot_curves(results: dict[str, dict], path: Path, title: str = "") -> Path:
    """Train loss (total and L_gt) and val accuracy per epoch, one colour per method."""
    import matplotlib

    from siasam_fast.benchutil import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, res), color in zip(results.items(), ("tab:blue", "tab:red", "tab:green")):
        h = res["history"]
        epochs = [r["epoch"] for r in h]
        ax_loss.plot(epochs, [r["train_loss"] for r in h], "-o", color=color, label=f"{name}: L")
        if any(r["train_loss_siamese"] is not None for r in h):
            ax_loss.plot(
                epochs, [r["train_loss_gt"] for r in h], "--", color=color, label=f"{name}: L_gt"
            )
        ax_acc.plot(
            epochs,
            [math.nan if r["val_accuracy"] is None else r["val_accuracy"] for r in h],
            "-o",
            color=color,
            label=name,
        )
    ax_loss.set(xlabel="epoch", ylabel="train loss (epoch mean)", title="train loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="val accuracy (anchor clip only)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# The demo


PARTIAL = ".{}.partial"  # a run in training, until both runs have finished
# The previous demo's outputs while they are being replaced (from the start when a new synthetic
# set replaces its data, which its runs and summary would no longer match; else while the new runs
# are renamed into place): put back if the new demo stops or fails before its runs are in place,
# renamed to DISCARDED (then deleted) once they are.
PREVIOUS = ".previous"
DISCARDED = ".previous.discarded"


def demo_outputs() -> set[str]:
    """The names the demo writes in its folder: every one is rewritten by the next demo."""
    return {"data", "summary.json", "learning_curves.png"} | {
        n for name in METHODS for n in (name, f"{name}.log")}


def check_demo_dir(out: Path, given: str | os.PathLike) -> None:
    """Raise unless the demo may write into ``out``: a new or empty folder, or one holding only
    what a demo writes (``demo_outputs``; its data folder a synthetic set). ``given``: the folder
    as the user wrote it, for the message."""
    from siasam_fast.data.synthetic import check_output_dir
    from siasam_fast.paths import file_in_the_way

    blocker = file_in_the_way(out)
    if blocker is not None:
        where = "is a file" if blocker == out else f"is inside {str(blocker)!r}, a file"
        raise NotADirectoryError(
            f"{str(given)!r} {where}, not a folder: give --out a new folder or one an earlier "
            "demo wrote"
        )
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir()  # hidden files (.DS_Store) are not at risk
                         if p.name not in demo_outputs() and not p.name.startswith("."))
        # The demo's own names, when they hold something else: another run, another summary.
        foreign += [f"{name}/ (not a run of this demo)" for name in METHODS
                    if not _demo_run(out / name, out / "data")]
        if (out / "summary.json").exists() and not _demo_summary(out / "summary.json"):
            foreign.append("summary.json (not a demo's summary)")
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                              else "")
            raise ValueError(
                f"--out {str(given)!r} holds files the demo did not write ({shown}); the demo "
                f"rewrites {', '.join(sorted(demo_outputs()))} there: give --out a new folder or "
                "one an earlier demo wrote"
            )
    check_output_dir(out / "data", "the demo's data folder")


def _set_aside_previous(out: Path, names: set[str] | None = None) -> bool:
    """Move the previous demo's outputs (``names``, default all: data, runs, logs, summary, plot)
    into ``out/.previous``; whether there were any."""
    names = sorted(n for n in (demo_outputs() if names is None else names)
                   if (out / n).exists() or (out / n).is_symlink())
    if not names:
        return False
    keep = out / PREVIOUS
    keep.mkdir()
    for name in names:
        (out / name).rename(keep / name)
    return True


def _repoint_run(partial: Path, final: Path) -> None:
    """Make a run trained in ``partial`` name ``final``, the folder it is about to be renamed to:
    its summary.json's best checkpoint (for ``siasam-fast eval --checkpoint``) and its
    config.json's train.out_dir (which ``--resume auto`` with that config continues)."""
    from siasam_fast.paths import write_text_atomic

    old, new = str(partial.resolve()), str(final.resolve())

    def moved(path):
        if isinstance(path, str) and (path == old or path.startswith(old + os.sep)):
            return new + path[len(old):]
        return path

    for name, keys in (("summary.json", ("best", "checkpoint")),
                       ("config.json", ("train", "out_dir"))):
        file = partial / name
        try:
            data = json.loads(file.read_text())
            section = data[keys[0]]
            value = section[keys[1]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if moved(value) != value:
            section[keys[1]] = moved(value)
            write_text_atomic(file, json.dumps(data, indent=2 if name == "config.json" else None))


def _repoint_log(log: Path, partial: Path, final: Path) -> None:
    """The training's log with the paths in ``partial`` (a checkpoint, the run folder) named as
    in ``final``, the folder the run now has."""
    old, new = str(partial.resolve()).encode(), str(final.resolve()).encode()
    try:
        data = log.read_bytes()
        if old in data:
            tmp = log.with_name(f".{log.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data.replace(old, new))
            os.replace(tmp, log)
    except OSError:  # the log keeps the training's own paths
        pass


def _restore_previous(out: Path) -> bool:
    """Put back what :func:`_set_aside_previous` moved, replacing what a new demo had written in
    its place (a new data set); whether there was anything to put back."""
    keep = out / PREVIOUS
    if not keep.is_dir():
        return False
    for item in sorted(keep.iterdir()):
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        item.rename(target)
    keep.rmdir()
    return True


def _demo_run(run_dir: Path, data_dir: Path) -> bool:
    """Whether ``run_dir`` may be replaced by a demo run: absent, empty, or a run that trained on
    the demo's data folder (its config.json says so)."""
    if not run_dir.exists():
        return True
    if not run_dir.is_dir():
        return False
    if not any(run_dir.iterdir()):
        return True
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        manifest = Path(saved["data"]["manifest"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return manifest.resolve() == (data_dir / "manifest.jsonl").resolve()


def _demo_summary(path: Path) -> bool:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"baseline", "siasamrea", "delta"} <= summary.keys()


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    videos: int | None = None,
    seed: int = 0,
    quick: bool = False,
    config: str | os.PathLike | None = None,
) -> dict:
    """Generate (or reuse) the synthetic set, train the baseline and SiaSamRea, compare them.

    ``seed`` seeds both the synthetic set and the training runs; ``videos`` overrides the number of
    synthetic videos; ``quick`` is a smoke test of the whole path (tiny set, one epoch). Returns
    what it writes to ``<out_dir>/summary.json``."""
    from siasam_fast.benchutil import environment, format_table
    from siasam_fast.data.synthetic import eval_clip_sees_evidence, load_meta

    started = time.perf_counter()
    out = Path(out_dir).resolve()
    # Arguments first, then the folder is written.
    config = Path(config or DEMO_CONFIG)
    if not config.is_file():
        raise FileNotFoundError(
            f"demo config {str(config)!r} does not exist (siasam-fast installs configs/demo.yaml "
            "with the package: reinstall it)"
        )
    if videos is not None and int(videos) < 3:
        raise ValueError(f"--videos {videos}: the demo needs at least 3 videos (train, val and "
                         "test get one each)")
    if int(seed) < 0:
        raise ValueError(f"seed={seed}: must be >= 0")
    options = synthetic_options(videos, quick)
    check_demo_dir(out, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A demo killed (SIGKILL, a power cut) while it replaced the data set left the previous
    # demo's outputs aside: they are the last complete demo.
    shutil.rmtree(out / DISCARDED, ignore_errors=True)
    if _restore_previous(out):
        print("demo: put back the previous demo's data, runs and summary, set aside by a demo "
              "that did not finish")
    seconds: dict[str, float] = {}

    # The new runs train in hidden folders and replace the previous demo's runs (and summary)
    # only once both have finished: a demo stopped or failing midway leaves the previous one's
    # results as they were. A new synthetic set (another seed or size) would leave those results
    # describing data that is no longer there, so the previous outputs, data included, are set
    # aside first and put back if this demo does not finish.
    set_aside = False
    try:
        if not dataset_matches(out / "data", seed, options):
            set_aside = _set_aside_previous(out)
        t = time.perf_counter()
        data_dir = ensure_dataset(out / "data", seed, options)
        seconds["data"] = time.perf_counter() - t
        meta = load_meta(data_dir)

        common = [*data_overrides(data_dir), f"train.seed={seed}",
                  *(QUICK_OVERRIDES if quick else [])]
        # A CUDA torch and a GPU: both runs train there (bf16 or fp16, DALI when installed), with
        # other numbers than the README's CPU table
        setup = training_setup(config, common, data_dir / "manifest.jsonl")
        print(f"demo: both runs train on {describe_setup(setup)}; each in "
              f"{out / PARTIAL.format('NAME')}, which becomes {out / 'NAME'} once both have "
              "finished (the paths the trainings print are the first)", flush=True)
        for name, switches in METHODS.items():
            partial = out / PARTIAL.format(name)
            shutil.rmtree(partial, ignore_errors=True)  # left by a demo stopped before
            print(f"\ndemo: training {name} ({', '.join(switches)})", flush=True)
            seconds[name] = run_training(
                train_command(config, partial, [*common, *switches]),
                log=partial.with_name(partial.name + ".log"),
            )
        # Both runs finished: they replace the previous demo's (renamed first, then analysed, so
        # that an error in the analysis cannot leave one new run beside an old one). The previous
        # runs, logs, summary and plot are set aside too (with the data, if it was replaced) and
        # given up only once both new runs are in place: never half a deleted run.
        if not set_aside:
            set_aside = _set_aside_previous(out, demo_outputs() - {"data"})
        for name in METHODS:
            _repoint_run(out / PARTIAL.format(name), out / name)
        for name in METHODS:
            partial = out / PARTIAL.format(name)
            partial.rename(out / name)
            _repoint_log(partial.with_name(partial.name + ".log"), partial, out / name)
            partial.with_name(partial.name + ".log").replace(out / f"{name}.log")
    except BaseException:  # a stop or a failure: the previous demo's outputs come back
        if set_aside:
            _restore_previous(out)
        raise
    if set_aside:
        (out / PREVIOUS).rename(out / DISCARDED)
    shutil.rmtree(out / DISCARDED, ignore_errors=True)
    results = {name: analyse_run(out / name, meta) for name in METHODS}

    # What the evaluation clip can see, per question type of the test split (both runs are
    # evaluated with the same sampling: only the method switches differ).
    seen = [
        v
        for v in eval_clip_sees_evidence(meta, eval_sampling(out / "baseline")).values()
        if v["split"] == "test"
    ]
    visibility = {
        t: _acc([float(v["visible"]) for v in seen if v["type"] == t])
        for t in meta["params"]["question_types"]
    }

    rows = comparison_rows(results)
    base, sia = results["baseline"], results["siasamrea"]
    title = (
        f"synthetic VideoQA, {options['num_videos']} videos ({options['size']} px, "
        f"questions: {', '.join(options['question_types'])}), seed {seed}"
    )
    plot = plot_curves(results, out / "learning_curves.png", title)
    seconds["total"] = time.perf_counter() - started
    summary = {
        "baseline": base,
        "siasamrea": sia,
        "delta": sia["accuracy"] - base["accuracy"],
        "config": {
            "train_config": str(config),
            "synthetic": {**options, "seed": seed, "dir": str(data_dir)},
            "common_overrides": common,
            "methods": METHODS,
            "evaluation": "test split, one clip per video (eval.num_clips=1), placed by "
            "sampling.eval_placement",
            "quick": quick,
            "setup": setup,
        },
        "eval_clip_evidence_visibility": visibility,
        "table": rows,
        "plot": str(plot),
        "seconds": seconds["total"],
        "seconds_by_stage": seconds,
        "environment": environment(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\n{title}; test split ({base['num_test']} questions), anchor clip only; trained on "
          f"{describe_setup(setup)}")
    print(format_table(printed_rows(rows)))
    print(
        "evidence on a frame of the eval clip (test split): "
        + ", ".join(f"{t} {v:.2f}" for t, v in visibility.items() if v is not None)
    )
    print(
        f"delta (SiaSamRea - baseline) = {summary['delta']:+.4f}; "
        f"{seconds['total']:.0f} s in total ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
        + f"); {out / 'summary.json'}, {plot}"
    )
    return summary
