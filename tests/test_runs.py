"""``siasam-fast runs``: the table of run folders, from hand-made run folders (what training
writes: config.json, metrics_epochs.csv, summary.json, checkpoints/latest)."""

import csv
import json
from pathlib import Path

import pytest

from siasam_fast.cli import main
from siasam_fast.config import Config


def make_run(path: Path, alpha: float, accuracies: list[float], summary: dict | None = None,
             latest: int | None = None, task: str = "open") -> Path:
    path.mkdir(parents=True)
    cfg = Config.from_dict({"task": task, "siamese": {"alpha": alpha}}).to_dict()
    (path / "config.json").write_text(json.dumps(cfg))
    metric = "mse" if task == "count" else "accuracy"
    with (path / "metrics_epochs.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "epoch", "train_loss", f"val_{metric}"])
        writer.writeheader()
        for e, value in enumerate(accuracies, 1):
            writer.writerow({"step": 10 * e, "epoch": e, "train_loss": 1.0 / e,
                             f"val_{metric}": value})
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if latest is not None:
        (path / "checkpoints" / f"step{latest}").mkdir(parents=True)
        (path / "checkpoints" / "latest").write_text(f"step{latest}")
    return path


def test_runs_table_compares_finished_and_unfinished_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs / "baseline", 0.0, [0.40, 0.45, 0.44],
             {"steps": 30, "steps_per_s": 2.5, "test": {"accuracy": 0.43}}, latest=30)
    make_run(runs / "siasamrea", 1.0, [0.42, 0.47], latest=20)  # stopped by a signal
    (runs / "notes").mkdir()  # not a run: passed over inside a folder of runs
    csv_file = tmp_path / "out" / "runs.csv"
    assert main(["runs", str(runs), "--csv", str(csv_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "task", "alpha", "clips", "status", "epochs", "best", "val",
                                "accuracy", "at", "epoch", "last", "val", "accuracy", "test",
                                "accuracy", "steps/s"]
    assert lines[1].split() == [str(runs / "baseline"), "open", "0", "9", "done", "3",
                                "0.4500", "2", "0.4400", "0.4300", "2.5000"]
    assert lines[2].split() == [str(runs / "siasamrea"), "open", "1", "9", "saved", "at",
                                "step", "20", "2", "0.4700", "2", "0.4700", "-", "-"]
    assert lines[3] == f"wrote {csv_file}"
    rows = list(csv.DictReader(csv_file.open()))
    assert [r["best"] for r in rows] == ["0.45", "0.47"] and rows[0]["best_metric"] == "accuracy"


def test_runs_reads_count_runs_and_names_bad_folders(tmp_path, capsys):
    run = make_run(tmp_path / "count", 1.0, [4.2, 3.9, 4.0], task="count")
    assert main(["runs", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "best val mse" in out[0] and out[1].split()[7:9] == ["3.9000", "2"]
    assert out[1].split()[4:6] == ["no", "checkpoint"]  # and no summary
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "is not a folder: give run folders" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["runs", str(tmp_path / "empty")]) == 2
    assert "is neither a run folder (no config.json) nor a folder of runs" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("values", [[], [float("nan")]])
def test_runs_without_an_evaluation_show_dashes(tmp_path, capsys, values):
    run = make_run(tmp_path / "r", 1.0, values)
    assert main(["runs", str(run)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[-4:] == ["-", "-", "-", "-"]


def test_runs_say_when_the_clips_are_not_a_siamese_group(tmp_path, capsys):
    run = make_run(tmp_path / "clipbert", 0.0, [0.40])
    cfg = Config.from_dict({"siamese": {"alpha": 0.0},
                            "sampling": {"placement": "sparse", "num_clips": 8}}).to_dict()
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["runs", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2:5] == ["0", "8", "sparse"]


def test_runs_status_reads_a_summary_without_checkpoints_and_an_odd_latest(tmp_path, capsys):
    """A run that ended without a checkpoint kept (summary.json, no checkpoints/latest) is done;
    a ``latest`` that names no step (an interrupted write, a hand edit) counts as no checkpoint;
    a folder of runs is read in name order; an empty metric cell (the column first written in a
    later epoch) is no evaluation."""
    runs = tmp_path / "runs"
    for name in ("a", "b", "c", "d", "e"):  # made in order: a folder listing need not be
        make_run(runs / name, 1.0, [0.5, "", 0.25] if name == "e" else [0.5])
    (runs / "a" / "summary.json").write_text(json.dumps({"steps": 10}))
    (runs / "b" / "checkpoints").mkdir()
    (runs / "b" / "checkpoints" / "latest").write_text("stepfinal")
    assert main(["runs", str(runs)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == [str(runs / name) for name in "abcde"]
    assert rows[0][4] == "done" and rows[1][4:6] == ["no", "checkpoint"]
    assert rows[4][6:10] == ["3", "0.5000", "1", "0.2500"]  # epochs, best at epoch 1, last


def test_a_run_train_max_steps_stopped_is_not_done(tmp_path, capsys):
    """A run stopped at train.max_steps writes summary.json (ended: max_steps) but is meant to be
    continued (--resume auto with a larger train.max_steps): not "done"."""
    runs = tmp_path / "runs"
    make_run(runs / "short", 1.0, [], {"steps": 40, "ended": "max_steps",
                                       "planned_steps": 1260}, latest=40)
    make_run(runs / "whole", 1.0, [0.5], {"steps": 1260, "ended": "complete"}, latest=1260)
    assert main(["runs", str(runs)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows[0][4:8] == ["max_steps", "at", "step", "40"] and rows[1][4] == "done"


def test_runs_of_different_tasks_or_splits_share_neutral_headers():
    from siasam_fast.runs import format_table

    def row(metric, split):
        return {c: None for c in ("run", "task", "alpha", "clips", "status", "epochs", "best",
                                  "best_epoch", "last", "test", "steps_per_s")} | {
            "best_metric": metric, "best_split": split}

    same = format_table([row("mse", "val"), row("mse", "val")]).splitlines()[0]
    assert "best val mse" in same and "test mse" in same
    mixed = format_table([row("accuracy", "val"), row("mse", "test")]).splitlines()[0]
    assert "best eval metric" in mixed and "last eval metric" in mixed and "test metric" in mixed
    # then each value names its metric (an MSE, lower is better, sat among accuracies)
    lines = format_table([row("accuracy", "val") | {"best": 0.25, "last": 0.25},
                          row("mse", "val") | {"best": 7.1875, "test": 8.0}]).splitlines()
    assert "0.2500 accuracy" in lines[1] and "7.1875 mse" in lines[2] and "8.0000 mse" in lines[2]
    assert "- accuracy" not in lines[1]


def test_early_stop_counts_only_the_evaluated_epochs():
    """Epochs without the split's metric (evaluation off, then on after a resume) are not
    epochs without improvement."""
    from siasam_fast.runs import early_stop_reason

    rows = [{"step": 2, "epoch": 1, "val_accuracy": 0.5}, {"step": 4, "epoch": 2},
            {"step": 6, "epoch": 3}]
    assert early_stop_reason(rows, "val", "accuracy", 2) is None


def test_a_folder_of_runs_includes_a_demos_runs_one_level_further(tmp_path, capsys):
    """`siasam-fast runs runs/` after `make demo` (runs/demo/baseline, runs/demo/siasamrea)
    found no run, or left the demo's out beside another run."""
    runs = tmp_path / "runs"
    make_run(runs / "syn1", 0.0, [0.4])
    make_run(runs / "demo" / "baseline", 0.0, [0.4])
    make_run(runs / "demo" / "siasamrea", 1.0, [0.4])
    make_run(runs / "demo" / ".baseline.partial", 0.0, [0.4])  # unfinished: hidden, passed over
    make_run(runs / "syn1" / "replaced-x", 0.0, [0.4])  # inside a run: not searched
    assert main(["runs", str(runs)]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == [str(runs / "demo" / "baseline"), str(runs / "demo" / "siasamrea"),
                     str(runs / "syn1")]
    assert main(["runs", str(runs / "demo")]) == 0


def test_a_finished_run_resumed_for_more_epochs_shows_no_earlier_models_test(tmp_path, capsys):
    """A finished run resumed with more train.epochs (then stopped, or still training) keeps the
    summary.json of its earlier end: its test metric is of that earlier model, not of the last
    one, which has no test evaluation yet (the table showed the old one beside the new epochs)."""
    run = make_run(tmp_path / "more", 1.0, [0.40, 0.45, 0.44, 0.50],
                   {"steps": 30, "steps_per_s": 2.5, "ended": "complete",
                    "test": {"accuracy": 0.43}}, latest=40)
    assert main(["runs", str(run)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[4:7] == ["saved", "at", "step"] and row[-2] == "-", row


def test_a_bad_csv_path_is_refused_before_the_table_and_never_a_runs_own_file(tmp_path, capsys):
    """--csv naming a folder failed after the table with a bare '[Errno 21] Is a directory'; one
    naming a run's own file (its metrics_epochs.csv) replaced it with the table."""
    run = make_run(tmp_path / "r", 1.0, [0.5])
    before = (run / "metrics_epochs.csv").read_text()
    assert main(["runs", str(run), "--csv", str(run)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"siasam-fast runs: error: --csv {str(run)!r} is a folder; give a file path\n"
    assert main(["runs", str(tmp_path), "--csv", str(run / "metrics_epochs.csv")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--csv" in err and "metrics_epochs.csv" in err and "run folder" in err
    assert (run / "metrics_epochs.csv").read_text() == before


def test_a_run_still_training_says_so(tmp_path, capsys):
    """A run whose training is going on (its folder's lock held) read "saved at step 51", as a
    stopped or killed one does; `runs` now tells them apart, and so does a lock left behind."""
    import subprocess
    import sys

    from siasam_fast.paths import LOCK_FILE, folder_holder, lock_folder

    run = make_run(tmp_path / "busy", 1.0, [0.40], latest=51)
    (run / LOCK_FILE).write_text('{"host": "gone", "pid": 1}\n')  # its holder ended: no lock
    assert folder_holder(run) is None
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom siasam_fast.paths import lock_folder\n"
         f"lock_folder({str(run)!r}, 'train.out_dir')\nprint('held', flush=True)\n"
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert folder_holder(run)["pid"] == holder.pid
        assert main(["runs", str(run)]) == 0
        row = capsys.readouterr().out.splitlines()[1]
        assert " training on " in row and "saved at step 51" in row, row
        with pytest.raises(ValueError, match="is in use by another training"):
            lock_folder(run, "train.out_dir")  # (runs' look did not take it)
    finally:
        holder.kill()
        holder.wait()
    assert folder_holder(run) is None
    assert main(["runs", str(run)]) == 0
    assert " training on " not in capsys.readouterr().out


def test_a_run_named_twice_is_listed_once(tmp_path):
    from siasam_fast.runs import run_folders

    a = make_run(tmp_path / "runs" / "a", 1.0, [0.4])
    b = make_run(tmp_path / "runs" / "b", 0.0, [0.3])
    assert run_folders([a, tmp_path / "runs", str(a) + "/"]) == [a, b]
