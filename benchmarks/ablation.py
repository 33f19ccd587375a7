"""The paper's ablations (SiaSamRea, NeurIPS 2021, section 4.3) on the synthetic VideoQA set, CPU.

    python benchmarks/ablation.py                      # every variant, seeds 0 1 2
    python benchmarks/ablation.py --seeds 0 1 2 3 4 --variants baseline skg_skr
    python benchmarks/ablation.py --quick              # smoke run: tiny set, one epoch, one seed
    python benchmarks/ablation.py --jobs 2             # two trainings at a time (one thread each)

Every variant trains with the demo's settings (configs/demo.yaml and the synthetic set of
siasam_fast.demo; the same set for every seed), changing only the switches in :data:`VARIANTS`,
and is evaluated on the test split with the anchor clip only. Per variant: mean and std over seeds
of the test accuracy, overall, per question type, and on the questions whose evidence is visible /
hidden in the evaluation clip. A table is printed; CSV (one row per run, and the summary) and a PNG
go to benchmarks/results/ (``--out`` elsewhere). Runs already finished under ``--runs`` with the
same command and the same synthetic set are reused, so an interrupted sweep continues where it
stopped; also only runs made on the same device, precision and data backend (a GPU sweep never
counts a CPU sweep's runs among its seeds). Finished runs made otherwise (another ``--set``, seed,
data set or device) are never replaced silently: the sweep refuses to start unless ``--replace``
says to retrain them. A failed training leaves the others' results: the table and files cover the
runs that finished, and the exit status is 1.

Paper rows -> variants: Table 1 baseline / w/ SKR / w/ SKG + SKR -> baseline, skr_only, skg_skr;
"without W1 / W2 / both" -> no_w1, no_w2, no_w1_w2; Table 2, 1 / 2 / 4 / 8 siamese clips ->
clips_1, clips_2, clips_4, skg_skr (N = 9); "8 copies of the anchor" -> anchor_copies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from siasam_fast import demo  # noqa: E402
from siasam_fast.benchutil import (  # noqa: E402
    environment,
    format_table,
    markdown_table,
    positive_int,
    results_path,
    save_figure,
    write_csv,
)
from siasam_fast.data.synthetic import load_meta  # noqa: E402

SIAMESE = ["siamese.alpha=1", "siamese.skg=true", "sampling.num_clips=9"]
# name -> (paper row, overrides on top of configs/demo.yaml). Only the method switches differ.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("baseline (alpha = 0, anchor only)", ["siamese.alpha=0", "sampling.num_clips=1"]),
    "skr_only": ("w/ SKR (uniform A)", [*SIAMESE, "siamese.skg=false"]),
    "skg_skr": ("w/ SKG + SKR (8 siamese clips)", SIAMESE),
    "no_w1": ("without W1", [*SIAMESE, "siamese.learn_w1=false"]),
    "no_w2": ("without W2", [*SIAMESE, "siamese.learn_w2=false"]),
    "no_w1_w2": (
        "without W1 and W2",
        [*SIAMESE, "siamese.learn_w1=false", "siamese.learn_w2=false"],
    ),
    "clips_1": ("1 siamese clip", [*SIAMESE, "sampling.num_clips=2"]),
    "clips_2": ("2 siamese clips", [*SIAMESE, "sampling.num_clips=3"]),
    "clips_4": ("4 siamese clips", [*SIAMESE, "sampling.num_clips=5"]),
    "anchor_copies": ("8 copies of the anchor", [*SIAMESE, "sampling.anchor_copies=true"]),
}
# Not in the default sweep (the paper's 12 clips; the stop-gradient, L_gt-on-every-clip and
# alpha warm-up probes of docs/experiments.md). Ask for them by name with --variants.
EXTRA_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "clips_12": ("12 siamese clips", [*SIAMESE, "sampling.num_clips=13"]),
    "detach": (
        "w/ SKG + SKR, stop-gradient through Q",
        [*SIAMESE, "siamese.detach_soft_label=true"],
    ),
    "gt_all": ("w/ SKG + SKR, L_gt on every clip", [*SIAMESE, "siamese.gt_clips=all"]),
    "alpha_warmup": (
        "w/ SKG + SKR, alpha ramped up over the first half of training",
        [*SIAMESE, "siamese.alpha_warmup=0.5"],
    ),
    "baseline_gt_all": (
        "alpha = 0, 9 clips, L_gt on every clip",
        ["siamese.alpha=0", "sampling.num_clips=9", "siamese.gt_clips=all"],
    ),
    # The paper's Figure 1 (b) against (c): the same reasoning over 8 clips drawn independently
    # anywhere in the video (ClipBERT's sparse sampling) instead of 8 siamese clips
    "sparse": ("w/ SKG + SKR over 8 sparse clips (not siamese)",
               [*SIAMESE, "sampling.placement=sparse"]),
    # ClipBERT's own multi-clip training: 9 sparse clips, their scores pooled (lse) before L_gt,
    # no siamese term (evaluated, like every variant, on the anchor clip alone)
    "clipbert": ("ClipBERT-style: 9 sparse clips, L_gt on their pooled scores, alpha = 0",
                 ["siamese.alpha=0", "sampling.num_clips=9", "sampling.placement=sparse",
                  "siamese.gt_clips=pooled", "siamese.gt_pool=logsumexp"]),
}
# Fine-tuning from the trained baseline of the same seed (the paper fine-tunes a pretrained
# ClipBERT rather than training from scratch): 4 more epochs at a lower learning rate, without
# (the control) and with the siamese loss. They need the baseline runs of the same --runs folder.
FINETUNE = ["train.init_from={runs}/baseline-seed{seed}", "train.epochs=4", "train.lr=0.0003"]
EXTRA_VARIANTS.update(
    {
        "ft_baseline": (
            "baseline, then 4 more epochs (control)",
            ["siamese.alpha=0", "sampling.num_clips=1", *FINETUNE],
        ),
        "ft_skg_skr": ("baseline, then 4 epochs of SKG + SKR", [*SIAMESE, *FINETUNE]),
        "ft_detach": (
            "baseline, then 4 epochs of SKG + SKR, stop-gradient through Q",
            [*SIAMESE, "siamese.detach_soft_label=true", *FINETUNE],
        ),
    }
)
ALL_VARIANTS = {**VARIANTS, **EXTRA_VARIANTS}
DEFAULT_SEEDS = (0, 1, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="variants: " + ", ".join(ALL_VARIANTS),
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help=f"training seeds (default {' '.join(map(str, DEFAULT_SEEDS))}; --quick: 0)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help="variants to run (default: the paper's, " + ", ".join(VARIANTS) + ")",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: the demo's quick set and one epoch (not a measurement)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trainings at a time (default 1; each gets cores / jobs threads)",
    )
    p.add_argument(
        "--out",
        "--out-dir",
        default=None,
        help="folder of the CSV / PNG (default benchmarks/results/)",
    )
    p.add_argument(
        "--runs",
        default=None,
        help="folder of the runs and the synthetic set (default runs/ablation, "
        "runs/ablation-quick with --quick)",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic set (>= 0)")
    p.add_argument(
        "--replace",
        action="store_true",
        help="retrain the finished runs under --runs that were made with another command, "
        "synthetic set or device / precision / data backend (their results are deleted), and "
        "regenerate the synthetic set if this command asks for another; without it the sweep "
        "refuses to start",
    )
    p.add_argument(
        "--train-label-noise",
        type=float,
        default=0.0,
        metavar="P",
        help="give this fraction of the training questions another answer, drawn uniformly from "
        "the training answers (val and test stay clean); use its own --runs folder",
    )
    p.add_argument(
        "--videos", type=positive_int, default=None, help="synthetic videos (default: the demo's)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run (recorded in the CSV)",
    )
    args = p.parse_args(argv)
    args.variants = args.variants or list(VARIANTS)
    unknown = [v for v in args.variants if v not in ALL_VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; valid: {', '.join(ALL_VARIANTS)}")
    if args.seeds is None:
        args.seeds = [0] if args.quick else list(DEFAULT_SEEDS)
    negative = [s for s in [*args.seeds, args.data_seed] if s < 0]
    if negative:
        p.error(f"seed {negative[0]}: seeds (--seeds, --data-seed) must be >= 0")
    # A name given twice would train twice into one folder at once: each run once, in order.
    for key in ("variants", "seeds"):
        values = getattr(args, key)
        if len(set(values)) < len(values):
            setattr(args, key, list(dict.fromkeys(values)))
            print(f"note: --{key} repeats values; each runs once: "
                  f"{' '.join(map(str, getattr(args, key)))}", file=sys.stderr)
    if args.jobs < 1:
        p.error(f"--jobs={args.jobs}: must be >= 1")
    if not 0.0 <= args.train_label_noise < 1.0:
        p.error(f"--train-label-noise={args.train_label_noise}: must be in [0, 1)")
    args.runs = Path(args.runs or ROOT / "runs" / ("ablation-quick" if args.quick else "ablation"))
    return args


def noisy_train_split(data_dir: Path, fraction: float, seed: int) -> Path:
    """A copy of the training annotations (MSRVTT-QA JSON) in which ``fraction`` of the questions,
    chosen at random, carry another answer drawn uniformly from the training answers: symmetric
    label noise, the setting where soft labels from several clips could act as a regulariser."""
    src = data_dir / "annotations" / "train_qa.json"
    items = json.loads(src.read_text())
    answers = sorted({x["answer"] for x in items})
    if len(answers) < 2:
        raise ValueError(f"{src}: label noise needs at least 2 distinct answers")
    rng = random.Random(seed)
    for i in rng.sample(range(len(items)), round(fraction * len(items))):
        items[i] = {
            **items[i],
            "answer": rng.choice([a for a in answers if a != items[i]["answer"]]),
        }
    dst = src.with_name(f"train_qa_noise{fraction:g}_seed{seed}.json")
    text = json.dumps(items)
    if not dst.is_file() or dst.read_text() != text:
        dst.write_text(text)
    return dst


def data_fingerprint(data_dir: Path) -> str | None:
    """Which synthetic set ``data_dir`` holds (generator version, seed, size, options: what decides
    its content); None when it holds none."""
    try:
        meta = load_meta(data_dir)
    except (OSError, ValueError):
        return None
    key = {k: meta.get(k) for k in ("version", "seed", "num_videos", "params")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def plan_runs(args: argparse.Namespace, data_dir: Path) -> list[dict]:
    """One entry per (variant, seed): its run folder and training command."""
    common = [
        *demo.data_overrides(data_dir),
        *(demo.QUICK_OVERRIDES if args.quick else []),
        *args.set,
    ]
    runs = []
    data = data_fingerprint(data_dir)
    # What the runs train on here (device, precision, data backend): a run made elsewhere is
    # not one of this sweep's seeds
    setup = demo.training_setup(demo.DEMO_CONFIG, args.set, data_dir / "manifest.jsonl")
    for variant in args.variants:
        for seed in args.seeds:
            run_dir = args.runs / f"{variant}-seed{seed}"
            own = [o.replace("{runs}", str(args.runs)).replace("{seed}", str(seed))
                   for o in ALL_VARIANTS[variant][1]]  # fmt: skip
            overrides = [*common, f"train.seed={seed}", *own]
            needs = [Path(o.split("=", 1)[1]) for o in own if o.startswith("train.init_from=")]
            runs.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "run_dir": run_dir,
                    "cmd": demo.train_command(demo.DEMO_CONFIG, run_dir, overrides),
                    "needs": needs[0] if needs else None,  # a run that must finish first
                    "data": data,
                    "data_dir": data_dir,
                    "setup": setup,
                }
            )
    return runs


def _finished(run: dict) -> bool:
    """A finished run made by the same command on the same synthetic set (so its results can be
    reused)."""
    return not_reusable(run) is None


def not_reusable(run: dict) -> str | None:
    """Why ``run``'s folder holds no result this sweep can reuse (None: it does)."""
    d = run["run_dir"]
    summary = d / "summary.json"
    if not (summary.is_file() and (d / "predictions_test.jsonl").is_file()):
        return "not finished"
    cmd_file = d / "command.json"
    started = d / STARTED
    if not cmd_file.is_file() and started.is_file() and (
            summary.stat().st_mtime_ns >= started.stat().st_mtime_ns):
        # Started by this script, finished after that (the sweep was stopped or killed while
        # the training ended): the summary is that training's own (train.overwrite moved any
        # older one aside when it started).
        cmd_file = started
    try:
        saved = json.loads(cmd_file.read_text())
    except (OSError, ValueError):
        return "not made by this script (no readable command.json)"
    if isinstance(saved, list):  # written before the data set was recorded: trusted if the set
        meta = run["data_dir"] / "meta.json"  # has not been generated again since the run ended
        cmd = saved
        same_data = meta.is_file() and meta.stat().st_mtime <= summary.stat().st_mtime
    else:
        cmd = saved.get("command", []) if isinstance(saved, dict) else []
        same_data = isinstance(saved, dict) and saved.get("data") == run["data"]
    if not _same(cmd, run["cmd"][1:]):
        return "made with another command (--set, seed or variant switches)"
    if not same_data:
        return "trained on another synthetic set (--data-seed, --videos or --quick)"
    made_on = saved.get("setup", CPU_SETUP) if isinstance(saved, dict) else CPU_SETUP
    here = run.get("setup", CPU_SETUP)
    if made_on != here:
        return (f"trained on {demo.describe_setup(made_on)}; this sweep trains on "
                f"{demo.describe_setup(here)}")
    return None


# The set-up of the runs recorded before command.json named one: every sweep so far ran on CPUs.
CPU_SETUP = {"device": "cpu", "precision": "fp32", "backend": "pyav"}


def _same(saved: list[str], cmd: list[str]) -> bool:
    """The same training, whether or not the command says ``train.overwrite=true`` (runs made
    before that switch existed are still reused)."""

    def strip(args: list[str]) -> list[str]:
        out, i = [], 0
        while i < len(args):
            if args[i] == "--set" and i + 1 < len(args) and args[i + 1] == "train.overwrite=true":
                i += 2
                continue
            out.append(args[i])
            i += 1
        return out

    return strip(saved) == strip(cmd)


# The command a run was started with, written before it starts (command.json, which says a run's
# results are reusable, is removed then and written once it has finished).
STARTED = "command.started.json"


def _record(run: dict) -> str:
    return json.dumps({"command": run["cmd"][1:], "data": run["data"],
                       "setup": run.get("setup", CPU_SETUP)})


def _finish(run: dict, proc: subprocess.Popen, log, t0: float, failed: list,
            stopped: bool = False) -> None:
    log.close()
    secs = time.perf_counter() - t0
    if stopped and proc.returncode != 0:
        print(f"  stopped {run['variant']} seed {run['seed']} (exit {proc.returncode}): the next "
              "sweep trains it again", flush=True)
    elif proc.returncode == 0:
        (run["run_dir"] / "command.json").write_text(_record(run))
        (run["run_dir"] / STARTED).unlink(missing_ok=True)
        print(f"  done {run['variant']} seed {run['seed']} in {secs:.0f} s", flush=True)
    else:
        failed.append(run)
        print(
            f"  FAILED {run['variant']} seed {run['seed']} (exit {proc.returncode}); "
            f"log {run['run_dir'].with_suffix('.log')}",
            flush=True,
        )


def execute(runs: list[dict], jobs: int) -> list[dict]:
    """Run the unfinished trainings, ``jobs`` at a time, each logging to <run_dir>.log; returns
    the runs that failed (a fine-tuning run whose baseline failed among them)."""
    todo = [r for r in runs if not _finished(r)]
    print(
        f"ablation: {len(runs)} runs, {len(runs) - len(todo)} already done, "
        f"{len(todo)} to train, {jobs} at a time"
    )
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    running: list[tuple[dict, subprocess.Popen, float, object]] = []
    queue = list(todo)
    failed = []
    try:
        _execute(queue, running, failed, jobs, env)
    except BaseException:  # stopped: the trainings stop too, none is orphaned
        for _, proc, _, _ in running:  # every training first, then wait for them together
            if proc.poll() is None:
                proc.terminate()  # after the group's Ctrl-C: an echo the training ignores
        deadline = time.monotonic() + 120
        for run, proc, t0, log in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _finish(run, proc, log, t0, [], stopped=True)
        raise
    return failed


def _execute(queue: list[dict], running: list, failed: list[dict], jobs: int, env: dict) -> None:
    def ready(run):  # its baseline finished: not waiting, running or failed in this sweep
        pending = {r["run_dir"] for r in queue} | {item[0]["run_dir"] for item in running}
        return run["needs"] is None or (run["needs"] not in pending
                                        and (run["needs"] / "summary.json").is_file())

    while queue or running:
        failed_dirs = {r["run_dir"] for r in failed}
        for r in [r for r in queue if r["needs"] in failed_dirs]:
            queue.remove(r)
            failed.append(r)
            print(f"  SKIPPED {r['variant']} seed {r['seed']}: its baseline failed", flush=True)
        if queue and not running and not any(ready(r) for r in queue):
            r = queue[0]
            raise RuntimeError(
                f"{r['variant']} seed {r['seed']} starts from {r['needs']}, which has no finished "
                "run: train the baseline variant with the same seeds and --runs first"
            )
        while len(running) < jobs and any(ready(r) for r in queue):
            run = next(r for r in queue if ready(r))
            queue.remove(run)
            run["run_dir"].mkdir(parents=True, exist_ok=True)
            # Retrained: its folder's results are no longer those of command.json's command.
            (run["run_dir"] / "command.json").unlink(missing_ok=True)
            (run["run_dir"] / STARTED).write_text(_record(run))
            log = open(run["run_dir"].with_suffix(".log"), "wb")
            proc = subprocess.Popen(run["cmd"], env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((run, proc, time.perf_counter(), log))
            print(f"  started {run['variant']} seed {run['seed']}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            run, proc, t0, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            _finish(run, proc, log, t0, failed)


def run_rows(runs: list[dict], meta: dict) -> list[dict]:
    """One row per finished run: accuracies and seconds."""
    rows = []
    for run in runs:
        res = demo.analyse_run(run["run_dir"], meta)
        row = {
            "variant": run["variant"],
            "seed": run["seed"],
            "accuracy": res["accuracy"],
            "evidence_visible": res["evidence_visible"],
            "evidence_hidden": res["evidence_hidden"],
        }
        for t, acc in res["by_type"].items():
            row[t] = acc
            vis = res["by_type_visibility"][t]
            if vis["num_visible"] and vis["num_hidden"]:
                row[f"{t}_visible"], row[f"{t}_hidden"] = vis["visible"], vis["hidden"]
        row["best_val_accuracy"] = res["best_val_accuracy"]
        row["train_seconds"] = res["train_seconds"]
        row["num_test"] = res["num_test"]
        rows.append(row)
    return rows


def _keys(rows: list[dict]) -> list[str]:
    """The union of the rows' keys, in first-seen order (a run may lack a split, e.g. a type
    whose evidence every evaluation clip sees has no visible / hidden columns)."""
    return list(dict.fromkeys(k for r in rows for k in r))


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
    """Mean and std over seeds per variant (std is the sample std; 0 with one seed)."""
    skip = ("variant", "seed", "num_test", "train_seconds")
    metrics = [k for k in _keys(rows) if k not in skip]
    out = []
    base = {r["seed"]: r["accuracy"] for r in rows if r["variant"] == "baseline"}
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        if not mine:
            continue
        row = {"variant": v, "paper row": ALL_VARIANTS[v][0], "seeds": len(mine)}
        for m in metrics:
            vals = [r[m] for r in mine if r.get(m) is not None]
            if not vals:
                continue
            row[f"{m}_mean"] = statistics.fmean(vals)
            row[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        # Paired by seed (the same seed gives both runs the same initialisation and data order):
        # a variant missing a seed the baseline has, or the other way round, is compared on the
        # seeds both have, not with the mean of other seeds.
        paired = sorted(r["seed"] for r in mine if r["seed"] in base)
        diffs = [r["accuracy"] - base[r["seed"]] for r in mine if r["seed"] in base]
        if diffs:
            row["delta_vs_baseline"] = statistics.fmean(diffs)
            row["delta_vs_baseline_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            row["delta_seeds"] = " ".join(map(str, paired))
        row["train_seconds_mean"] = statistics.fmean(r["train_seconds"] for r in mine)
        out.append(row)
    return out


def display_rows(summary: list[dict]) -> list[dict]:
    """The printed table: mean +- std in percent."""

    def pm(row, key):
        if f"{key}_mean" not in row:
            return ""
        return f"{100 * row[f'{key}_mean']:.1f} +- {100 * row[f'{key}_std']:.1f}"

    keys = [k[:-5] for k in _keys(summary) if k.endswith("_mean") and k != "train_seconds_mean"]
    out = []
    for row in summary:
        d = {"variant": row["variant"], "seeds": row["seeds"]}
        for k in keys:
            d[k] = pm(row, k)
        if "delta_vs_baseline" in row:
            d["delta"] = f"{100 * row['delta_vs_baseline']:+.1f}"
            paired = row["delta_seeds"].split()
            if len(paired) != row["seeds"]:
                d["delta"] += f" (seed{'s' if len(paired) > 1 else ''} {', '.join(paired)} only)"
        d["train s"] = f"{row['train_seconds_mean']:.0f}"
        out.append(d)
    return out


def plot(summary: list[dict], rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in summary]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    x = range(len(names))
    ax.bar(
        x,
        [100 * r["accuracy_mean"] for r in summary],
        yerr=[100 * r["accuracy_std"] for r in summary],
        capsize=4,
        color="tab:blue",
        alpha=0.7,
        label="test accuracy (mean +- std)",
    )
    for i, name in enumerate(names):
        pts = [100 * r["accuracy"] for r in rows if r["variant"] == name]
        ax.plot([i] * len(pts), pts, "k.", ms=5)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%), anchor clip only")
    # Bars start at zero: a cut axis makes small differences look large.
    ax.set_ylim(0, min(100, max(100 * r["accuracy"] for r in rows) + 5))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def finished_runs(runs_dir: Path) -> list[Path]:
    """The run folders under ``runs_dir`` that hold a finished run (any variant or seed)."""
    return sorted(p.parent for p in runs_dir.glob("*-seed*/summary.json"))


def _stop(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _stop)  # a scheduler's stop takes the Ctrl-C path
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("ablation: interrupted; the finished runs are kept (the stopped trainings are "
              "trained again by the next sweep) and the result files are as they were: run the "
              "same command again to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    options = demo.synthetic_options(args.videos, args.quick)
    data_dir = args.runs / "data"
    done = finished_runs(args.runs)
    if (data_fingerprint(data_dir) is not None and done and not args.replace
            and not demo.dataset_matches(data_dir, args.data_seed, options)):
        old = load_meta(data_dir)
        print(f"ablation: error: {args.runs} holds {len(done)} finished run(s) trained on its "
              f"synthetic set (data seed {old.get('seed')}, {old.get('num_videos')} videos); this "
              f"command asks for another (data seed {args.data_seed}, {options['num_videos']} "
              "videos): use another --runs folder, or --replace to generate the new set there and "
              "retrain", file=sys.stderr)
        return 2
    data_dir = demo.ensure_dataset(data_dir, args.data_seed, options)
    meta = load_meta(data_dir)
    if args.train_label_noise:
        noisy = noisy_train_split(data_dir, args.train_label_noise, args.data_seed)
        args.set = [f"data.train={noisy}", *args.set]
    runs = plan_runs(args, data_dir)
    replaced = [(r, not_reusable(r)) for r in runs if (r["run_dir"] / "summary.json").is_file()
                and not _finished(r)]
    if replaced and not args.replace:
        shown = "; ".join(f"{r['run_dir'].name}: {why}" for r, why in replaced[:5])
        more = f" and {len(replaced) - 5} more" if len(replaced) > 5 else ""
        print(f"ablation: error: {len(replaced)} finished run(s) under {args.runs} would be "
              f"retrained and their results deleted ({shown}{more}): use another --runs folder "
              "for this command, or --replace to retrain them", file=sys.stderr)
        return 2
    try:
        failed = execute(runs, args.jobs)
    except RuntimeError as err:  # a fine-tuning run without its baseline: nothing was trained
        print(f"ablation: {err}", file=sys.stderr)
        return 1
    finished = [r for r in runs if _finished(r)]
    failure = ("; failed: " + ", ".join(f"{r['variant']}/seed{r['seed']}" for r in failed)
               if failed else "")
    if not finished:
        print(f"ablation: no run finished{failure}; no result file written", file=sys.stderr)
        return 1
    rows = run_rows(finished, meta)
    summary = summarise(rows, args.variants)
    env = environment()
    tag = "ablation_quick" if args.quick else "ablation"
    extra = {
        "data_seed": args.data_seed,
        "videos": options["num_videos"],
        "question_types": " ".join(options["question_types"]),
        "size": options["size"],
        "config": str(demo.DEMO_CONFIG.relative_to(ROOT)),
        "overrides": " ".join(args.set),
        "train_label_noise": args.train_label_noise,
        "failed_runs": " ".join(f"{r['variant']}/seed{r['seed']}" for r in failed),
    }
    # Every result file is written under a hidden name first and renamed into place together at
    # the end: a stop while they are made leaves the previous sweep's files as they were, never
    # new CSVs beside an old table and plot.
    made: list[tuple[Path, Path]] = []

    def staged(name: str) -> Path:
        final = results_path(name, args.out)
        made.append((final.with_name(f".{final.stem}.partial{final.suffix}"), final))
        return made[-1][0]

    csv_runs = write_csv(rows, staged(f"{tag}_runs.csv"), {**env, **extra})
    csv_sum = write_csv(summary, staged(f"{tag}.csv"), {**env, **extra})
    title = (
        f"SiaSamRea ablations, synthetic VideoQA ({options['num_videos']} videos, "
        f"{'/'.join(options['question_types'])}"
        + (f", {args.train_label_noise:.0%} train label noise" if args.train_label_noise else "")
        + f"), seeds {args.seeds}"
    )
    png = plot(summary, rows, staged(f"{tag}.png"), title)
    table = display_rows(summary)
    legend = ("test accuracy (%) with the anchor clip only, mean +- std over seeds "
              "(best_val_accuracy: the val split at its best epoch); delta: accuracy minus the "
              "baseline's of the same seed, averaged over the seeds both have")
    print(f"\n{title}\n{legend}")
    print(format_table(table))
    staged(f"{tag}.md").write_text(f"{title}\n\n{legend}{failure}\n\n{markdown_table(table)}\n")
    for tmp, final in made:
        os.replace(tmp, final)
    csv_runs, csv_sum, png, md = (final for _, final in made)
    print(f"\n{time.perf_counter() - started:.0f} s; {csv_runs}, {csv_sum}, {png}, {md}")
    if failed:
        print(f"ablation: {len(failed)} training(s) did not finish{failure}: the results above "
              "cover the others; run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
