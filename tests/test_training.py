"""train.py end to end on CPU: one process without a launcher, 2 processes (gloo) with ZeRO 1-3,
exact resume, standalone evaluation and refused checkpoints."""

import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from checkpoints import write_checkpoint
from subprocess_env import cpu_env

from siasam_fast.data.synthetic import generate
from siasam_fast.pipeline.manifest import build_manifest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_videos=16, seed=3, size=64, workers=1, progress=False)
    build_manifest(root / "videos", root / "manifest.jsonl", workers=1, progress=False)
    return root


def base_args(synth: Path, out: Path, *extra: str) -> list[str]:
    ann = synth / "annotations"
    sets = {
        "data.train": ann / "train_qa.json", "data.val": ann / "val_qa.json", "data.test": "",
        "data.manifest": synth / "manifest.jsonl", "data.num_workers": 1, "train.epochs": 2,
        "train.batch_size": 4, "train.out_dir": out, "sampling.num_clips": 3,
        "sampling.frames_per_clip": 4, "eval.batch_size": 8,
    }
    args = ["--config", str(ROOT / "configs" / "synthetic.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def run(cmd: list[str], timeout=600) -> subprocess.CompletedProcess:
    env = cpu_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                             f"\n{proc.stderr[-5000:]}")
    return proc


def train(args: list[str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "train.py", *args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out: Path) -> list[float]:
    with (out / "metrics_steps.csv").open() as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


SLOW_LOSS_READ = """
import sys, time
import torch
from siasam_fast import training
micro_step = training.micro_step

class Queued(torch.Tensor):  # a loss whose device work is still queued: reading it waits
    def __float__(self):
        time.sleep(0.25)
        return super().__float__()

def queued_micro_step(*args, **kwargs):
    parts, times = micro_step(*args, **kwargs)
    return {**parts, "loss": parts["loss"].detach().as_subclass(Queued)}, times

training.micro_step = queued_micro_step
sys.exit(training.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("accum", [1, 2])
def test_step_time_includes_the_wait_in_the_loss_reads(synth, tmp_path, accum):
    """Without train.sync_timing the phases' clocks stop when their Python returns; the device's
    queued work is then waited for where the loss terms are read on the host. step_s (and
    videos_per_s) is the step's wall time, those reads included (it was the sum of the phases,
    which left that wait out of every step: too high a rate wherever the stack does not wait
    inside its optimizer step). Stood in for: a loss whose read takes 0.25 s."""
    out = tmp_path / "run"
    args = base_args(synth, out, "--set", "train.max_steps=2", "--set", f"train.grad_accum={accum}")
    proc = subprocess.run([sys.executable, "-c", SLOW_LOSS_READ, *args], cwd=ROOT,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with (out / "metrics_steps.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for r in rows:
        phases = sum(float(r[k]) for k in ("data_s", "forward_s", "backward_s", "optimizer_s"))
        assert float(r["step_s"]) >= 0.25 * accum + phases - 1e-6, r
        assert float(r["videos_per_s"]) == pytest.approx(4 * accum / float(r["step_s"]), rel=1e-6)


def test_single_process_trains_evaluates_and_checkpoints(synth, tmp_path):
    out = tmp_path / "run"
    proc = train(base_args(synth, out, "--set", "train.save_every=3"))
    assert "1 process(es) on cpu, fp32" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["precision"] == "fp32"
    assert 0.0 <= summary["val"]["accuracy"] <= 1.0 and summary["val"]["num_examples"] > 0
    steps = losses(out)
    assert len(steps) == summary["steps"] and all(x == x for x in steps)  # no NaN
    with (out / "metrics_steps.csv").open() as fh:  # each row: the rate its step used
        rates = [float(r["lr"]) for r in csv.DictReader(fh)]
    warmup = max(1, round(len(rates) * 0.1))  # configs/synthetic.yaml: lr 0.001, warm-up 10%
    assert rates[0] == pytest.approx(0.001 / warmup) and max(rates) == pytest.approx(0.001)
    with (out / "metrics_epochs.csv").open() as fh:
        epochs = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in epochs] == [1, 2] and "val_accuracy" in epochs[0]
    with (out / "metrics_steps.csv").open() as fh:
        step_rows = list(csv.DictReader(fh))
    for r in epochs:  # an epoch's training loss: the mean of its steps' losses
        mine = [float(s["loss"]) for s in step_rows if s["epoch"] == r["epoch"]]
        assert len(mine) == 17 and float(r["train_loss"]) == pytest.approx(sum(mine) / len(mine))
    tags = sorted((p.name for p in (out / "checkpoints").iterdir() if p.is_dir()),
                  key=lambda name: int(name[4:]))
    # the paper's protocol: each run's best epoch, its checkpoint kept (train.keep_best)
    best = summary["best"]
    assert best["split"] == "val" and best["accuracy"] == max(
        float(r["val_accuracy"]) for r in epochs)
    assert best["epoch"] == min(int(r["epoch"]) for r in epochs
                                if float(r["val_accuracy"]) == best["accuracy"])
    assert best["step"] == int(epochs[best["epoch"] - 1]["step"])
    assert best["checkpoint"] == str(out / "checkpoints" / f"step{best['step']}")
    # train.save_every=3 over 2 epochs of 17 steps: step 33, then the run's end at step 34
    assert summary["steps"] == 34 and tags[-2:] == ["step33", "step34"]
    # keep_checkpoints=2: older ones were removed, but for the best epoch's
    assert tags == sorted({*tags[-2:], f"step{best['step']}"}, key=lambda name: int(name[4:]))
    assert f"best val accuracy {best['accuracy']:.4f} at epoch {best['epoch']}" in proc.stdout
    state = json.loads((out / "checkpoints" / tags[-1] / "run_state.json").read_text())
    assert state["config"]["train"]["save_every"] == 3
    assert (out / "ans2label.json").is_file()

    # Standalone evaluation of the latest checkpoint gives the same accuracy as the last epoch.
    metrics, preds = tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "val.jsonl"
    proc = run([sys.executable, "-m", "siasam_fast.cli", "eval", "--checkpoint", str(out),
                "--json", str(metrics), "--predictions", str(preds)])
    assert json.loads(metrics.read_text()) == summary["val"]
    assert re.search(rf"\naccuracy +{summary['val']['accuracy']:.4f}\n", proc.stdout)
    # the table says what it is of: the checkpoint, the split and the evaluation's settings
    assert re.search(rf"evaluating {re.escape(str(out))}/checkpoints/step\d+ on val \(\d+ "
                     r"questions; eval.num_clips=1, sampling.eval_placement=middle, "
                     r"eval.aggregation=mean\)", proc.stdout), proc.stdout
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == summary["val"]["num_examples"]
    assert sum(r["accuracy"] for r in rows) / len(rows) == summary["val"]["accuracy"]
    assert {"qid", "question_type", "prediction"} <= rows[0].keys()
    # The train annotations moved since: eval reads only the split it evaluates (the run saved
    # its answer vocabulary), so it still works
    proc = run([sys.executable, "-m", "siasam_fast.cli", "eval", "--checkpoint", str(out),
                "--set", f"data.train={tmp_path / 'moved' / 'train_qa.json'}"])
    assert re.search(rf"\naccuracy +{summary['val']['accuracy']:.4f}\n", proc.stdout)


def test_resume_continues_the_same_run_exactly(synth, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(base_args(synth, full, "--set", "data.num_workers=2"))
    train(base_args(synth, part, "--set", "data.num_workers=2", "--set", "train.max_steps=5"))
    assert len(losses(part)) == 5
    proc = train(base_args(synth, part, "--set", "data.num_workers=2", "--resume", "auto"))
    assert "final metrics" in proc.stdout
    # Same later losses, bit for bit (fp32 on CPU): model, optimizer, scheduler, data, RNG.
    assert losses(part) == losses(full)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a["val"] == b["val"]
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    # epoch 1, cut at step 5: its training loss is over all of its steps (the sums carried over)
    assert epoch_rows(part, ("elapsed_s",)) == epoch_rows(full, ("elapsed_s",))


def signal_after_steps(cmd: list[str], out: Path, steps: int, sig: int, group: bool):
    """Run ``cmd`` in a session of its own; once ``out`` has logged ``steps`` steps, send ``sig``
    to its whole process group (``group``: as a scheduler does) or to it alone. Returns the
    completed process."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    log = out / "metrics_steps.csv"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and log.read_text().count("\n") - 1 >= steps:
            (os.killpg if group else os.kill)(proc.pid, sig)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_a_stop_signal_saves_a_checkpoint_and_the_run_resumes_exactly(synth, tmp_path):
    """SIGTERM to the whole process group (a scheduler's stop: the loader's workers get it too):
    the run finishes its step, saves, exits 143; --resume auto then gives the uninterrupted run's
    losses, bit for bit."""
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("--set", "data.num_workers=2", "--set", "train.epochs=3")
    train(base_args(synth, full, *extra))
    proc = signal_after_steps([sys.executable, "train.py", *base_args(synth, part, *extra)], part,
                              2, signal.SIGTERM, group=True)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "stopped by SIGTERM after step" in proc.stdout and "--resume auto" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    stopped_at = len(losses(part))
    assert 2 <= stopped_at < len(losses(full))
    assert (part / "checkpoints" / "latest").read_text().strip() == f"step{stopped_at}"
    assert not (part / "summary.json").exists()  # the run is not over
    train(base_args(synth, part, *extra, "--resume", "auto"))
    assert losses(part) == losses(full)


def test_two_processes_stop_together(synth, tmp_path):
    """torchrun passes SIGTERM on to both processes; they agree on one step (here the first epoch
    end), save one checkpoint together and exit; a resume finishes the run."""
    out = tmp_path / "two"
    args = base_args(synth, out, "--set", "train.epochs=3")
    cmd = [*LAUNCHERS["torchrun"], "--master_port", str(free_port()), "train.py", *args]
    proc = signal_after_steps(cmd, out, 1, signal.SIGTERM, group=False)
    assert proc.returncode != 0
    assert "stopped by SIGTERM after step" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    # an epoch is 9 steps on 2 processes: they agree at its end, not at step 10 (CHECK_EVERY)
    assert tag == "step9", tag
    assert {"rng_rank0.json", "rng_rank1.json"} <= {p.name for p in (out / "checkpoints" / tag)
                                                    .iterdir()}
    run([*LAUNCHERS["torchrun"], "--master_port", str(free_port()), "train.py", *args,
         "--resume", "auto"])
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] >= 1


SIGNAL_AT_STEP = """
import os, signal, sys
from siasam_fast import training
at = int(sys.argv[1])
write = training.MetricsLog.write

def write_then_signal(self, row):  # right after step `at` (its row of metrics_steps.csv)
    write(self, row)
    if row.get("step") == at and "loss" in row:
        os.kill(os.getpid(), signal.SIGTERM)

training.MetricsLog.write = write_then_signal
sys.exit(training.main(sys.argv[2:]))
"""


def test_a_stop_at_an_epochs_last_step_leaves_its_evaluation_to_the_resume(synth, tmp_path):
    """SIGTERM right after an epoch's last step: no evaluation inside the grace period, and the
    resumed run evaluates that epoch first, so metrics_epochs.csv and the summary hold every
    epoch, as in the uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    train(base_args(synth, full))
    with (full / "metrics_steps.csv").open() as fh:
        last_of_first = max(int(r["step"]) for r in csv.DictReader(fh) if r["epoch"] == "1")
    cmd = [sys.executable, "-c", SIGNAL_AT_STEP, str(last_of_first), *base_args(synth, part)]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "--resume auto continues with epoch 1's evaluation" in proc.stdout
    assert not (part / "metrics_epochs.csv").is_file() or len(epoch_rows(part)) == 0
    tag = part / "checkpoints" / f"step{last_of_first}"
    state = (tag / "run_state.json").read_bytes()
    assert json.loads(state)["eval_due"]
    # Continued in another folder: that run evaluates epoch 1 too, and leaves this checkpoint be.
    other = tmp_path / "other"
    train(base_args(synth, other, "--resume", str(tag)))
    assert [r["epoch"] for r in epoch_rows(other)] == ["1", "2"]
    assert (tag / "run_state.json").read_bytes() == state
    (part / "checkpoints" / "step999").mkdir()  # a save cut short: cleaned up by the next save
    train(base_args(synth, part, "--resume", "auto"))
    assert not (part / "checkpoints" / "step999").exists()
    drop = ("elapsed_s",)
    assert epoch_rows(part, drop) == epoch_rows(full, drop)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert b["epochs_completed"] == 2 and a["val"] == b["val"]
    # A second resume from that checkpoint would not evaluate epoch 1 again (if it is still kept).
    assert not tag.exists() or not json.loads((tag / "run_state.json").read_text())["eval_due"]


SIGNAL_IN_EPOCH_EVAL = """
import os, signal, sys
from siasam_fast import training
evaluate = training.evaluate

def evaluate_then_signal(*args, desc="", **kwargs):  # a stop during the first epoch's evaluation
    if desc.startswith("eval") and not getattr(evaluate_then_signal, "done", False):
        evaluate_then_signal.done = True
        os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(*args, desc=desc, **kwargs)

training.evaluate = evaluate_then_signal
sys.exit(training.main(sys.argv[1:]))
"""


def test_a_stop_during_an_epochs_evaluation_ends_it_with_the_epoch_saved(synth, tmp_path):
    """The epoch's checkpoint was written after its evaluation, which a stop signal did not end:
    a long evaluation used up the scheduler's grace, and its SIGKILL then lost the whole epoch.
    The epoch is now saved first, a signal ends the evaluation at once, and the resumed run
    evaluates that epoch first."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_IN_EPOCH_EVAL, *base_args(synth, out)],
                          cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SIGTERM: the evaluation of epoch 1 is left to the resumed run (the epoch's " \
           "checkpoint is saved)" in proc.stderr
    assert "--resume auto continues with epoch 1's evaluation and the rest of the run" \
        in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    tags = [p.name for p in (out / "checkpoints").glob("step*")]
    assert len(tags) == 1 and not (out / "metrics_epochs.csv").is_file() or not epoch_rows(out)
    proc = train(base_args(synth, out, "--resume", "auto"))
    assert f"note: {tags[0]} ends epoch 1, whose evaluation has no row" in proc.stdout
    assert [r["epoch"] for r in epoch_rows(out)] == ["1", "2"]
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 2


SIGNAL_IN_TEST_EVAL = """
import os, signal, sys
from siasam_fast import training
evaluate = training.evaluate

def evaluate_then_signal(*args, desc="", **kwargs):  # a stop during the test evaluation
    if desc == "test":
        os.kill(os.getpid(), signal.SIGINT)
    return evaluate(*args, desc=desc, **kwargs)

training.evaluate = evaluate_then_signal
sys.exit(training.main(sys.argv[1:]))
"""


def test_a_stop_during_the_test_evaluation_leaves_it_to_the_resume(synth, tmp_path):
    """Ctrl-C during the test evaluation (after the last checkpoint): one line naming what is
    left, exit 130, no summary; --resume auto then evaluates the test split and writes it (it
    was a traceback, and the demo read the exit status as a failed training)."""
    out = tmp_path / "run"
    ann = synth / "annotations"
    args = base_args(synth, out, "--set", f"data.test={ann / 'test_qa.json'}",
                     "--set", "train.epochs=1")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_IN_TEST_EVAL, *args], cwd=ROOT,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 128 + signal.SIGINT, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "stopped by SIGINT after the training" in proc.stdout
    assert "before the test evaluation finished: --resume auto does" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (out / "summary.json").exists()
    train([*args, "--resume", "auto"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["num_examples"] > 0 and (out / "predictions_test.jsonl").is_file()


def epoch_rows(out: Path, drop=()) -> list[dict]:
    with (out / "metrics_epochs.csv").open() as fh:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(fh)]


def test_a_failing_run_with_loader_workers_exits(synth, tmp_path):
    """An error mid-run (here a non-finite loss) ends the process, though its traceback keeps the
    loader, whose workers defer SIGTERM, alive: the workers are shut down on the way out."""
    cmd = [sys.executable, "train.py", *base_args(synth, tmp_path / "r", "--set",
                                                   "data.num_workers=2", "--set", "train.lr=1e30")]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "FloatingPointError" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - start < 120


def test_an_incomplete_latest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, capsys):
    from siasam_fast.training import resolve_checkpoint

    ckpt = tmp_path / "run" / "checkpoints"
    for step in (3, 6):
        (ckpt / f"step{step}").mkdir(parents=True)
        (ckpt / f"step{step}" / "run_state.json").write_text(json.dumps({"step": step}))
    (ckpt / "step9").mkdir()  # cut short: no run_state.json
    (ckpt / "latest").write_text("step9")
    assert resolve_checkpoint(tmp_path / "run") == ckpt / "step6"
    assert "step9, which is incomplete" in capsys.readouterr().err
    (ckpt / "latest").write_text("step3")
    assert resolve_checkpoint(tmp_path / "run") == ckpt / "step3"
    # no `latest` at all (a kill between a first save's run_state.json and its `latest`)
    (ckpt / "latest").unlink()
    for path in (tmp_path / "run", ckpt):
        assert resolve_checkpoint(path) == ckpt / "step6"
    assert "has no 'latest' file; using step6, the newest complete" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path)


def _no_launcher_env(monkeypatch):
    """The variables a lone training sets for itself, restored after the test."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("value", ["latest", "last", "runs/nope"])
def test_a_resume_value_that_names_nothing_lists_the_valid_ones(tmp_path, capsys, monkeypatch,
                                                                value):
    from siasam_fast.training import main

    _no_launcher_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code = main(["--config", str(ROOT / "configs" / "synthetic.yaml"),
                 "--set", f"train.out_dir={tmp_path / 'run'}", "--resume", value])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in (f"--resume {value!r}", "'auto'", "'if-any'", "checkpoint folder"):
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra", [[], ["--set", "train.epochs=1"]])
def test_training_without_a_config_says_so(tmp_path, capsys, monkeypatch, extra):
    from siasam_fast.training import main

    _no_launcher_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code = main(extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in ("no --config", "--config configs/synthetic.yaml", "msrvtt_qa.yaml"):
        assert fragment in err, (fragment, err)


def test_the_best_epoch_and_its_checkpoint_are_kept(tmp_path):
    """summary.json's best epoch (highest accuracy, lowest MSE, the earliest of equals) and the
    pruning that keeps its checkpoint besides the newest keep_checkpoints."""
    from siasam_fast.training import best_epoch, best_line, prune_checkpoints

    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (ckpt / f"step{step}").mkdir(parents=True)
        (ckpt / f"step{step}" / "run_state.json").write_text(json.dumps({"step": step}))
    (ckpt / "step9").mkdir()  # a save cut short
    history = [{"step": 2, "epoch": 1, "val_accuracy": 0.5, "val_num_examples": 10},
               {"step": 4, "epoch": 2, "val_accuracy": 0.7, "val_num_examples": 10},
               {"step": 6, "epoch": 3, "val_accuracy": 0.7, "val_num_examples": 10},
               {"step": 8, "epoch": 4, "val_accuracy": float("nan")}]
    best = best_epoch(history, "val", "accuracy", ckpt)
    assert best == {"split": "val", "epoch": 2, "step": 4, "accuracy": 0.7, "num_examples": 10,
                    "checkpoint": str(ckpt / "step4")}
    prune_checkpoints(ckpt, 1, "step8", protect="step4")
    assert sorted(p.name for p in ckpt.iterdir()) == ["step4", "step8"]
    assert best_line(best) == (f"best val accuracy 0.7000 at epoch 2 (step 4; checkpoint "
                               f"{ckpt / 'step4'})")
    mse = [{"step": 2, "epoch": 1, "test_mse": 4.0}, {"step": 4, "epoch": 2, "test_mse": 3.5}]
    best = best_epoch(mse, "test", "mse", ckpt)
    assert (best["epoch"], best["mse"]) == (2, 3.5)
    prune_checkpoints(ckpt, 1, "step8")  # without protect: the newest only
    assert sorted(p.name for p in ckpt.iterdir()) == ["step8"]
    assert best_epoch(mse[:1], "test", "mse", ckpt)["checkpoint"] is None
    line = best_line(best_epoch(mse, "test", "mse", ckpt))
    assert line.startswith("best test mse 3.5000 at epoch 2 (step 4; its checkpoint is no longer")
    assert best_epoch([{"step": 1, "epoch": 1}], "val", "accuracy", ckpt) is None


def test_early_stop_ends_the_run_when_the_evaluation_stops_improving(synth, tmp_path):
    """train.early_stop=1 with weights that cannot change (lr 0, BatchNorms frozen): epoch 2's
    val accuracy equals epoch 1's, so epoch 3 is not run; the test evaluation and summary.json
    follow. A resume of that run (the history from its CSV) stops again at once."""
    out = tmp_path / "run"
    extra = ["--set", "train.epochs=3", "--set", "train.early_stop=1", "--set", "train.lr=0",
             "--set", "model.cnn_freeze=batchnorm",
             "--set", f"data.test={synth / 'annotations' / 'test_qa.json'}"]
    proc = train(base_args(synth, out, *extra))
    assert re.search(r"early stop \(train.early_stop=1\): val accuracy has not improved for 1 "
                     r"epochs since epoch 1 \(\d\.\d{4}\); epochs 3-3 are not run", proc.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["best"]["epoch"] == 1
    assert summary["test"]["num_examples"] > 0
    # siasam-fast runs reads the folder training wrote
    row = run([sys.executable, "-m", "siasam_fast.cli", "runs", str(out)]).stdout.splitlines()[1]
    best = f"{summary['best']['accuracy']:.4f}"
    assert row.split()[1:-1] == ["open", "1", "3", "done", "2", best, "1", best,
                                 f"{summary['test']['accuracy']:.4f}"]  # then steps/s
    proc = train(base_args(synth, out, *extra, "--resume", "auto"))
    assert "epochs 3-3 are not run" in proc.stdout
    again = json.loads((out / "summary.json").read_text())
    assert again["epochs_completed"] == 2
    # nothing trained in this start: the training's speed stays the first start's
    assert [again[k] for k in ("steps_per_s", "train_seconds")] == [
        summary[k] for k in ("steps_per_s", "train_seconds")]
    proc = train(base_args(synth, out, *extra, "--set", "train.epochs=2", "--resume", "auto"))
    assert ("ends the run's 2 epoch(s): nothing is left to train (raise train.epochs to train "
            "on); the test evaluation and summary.json are done again") in proc.stdout
    assert json.loads((out / "summary.json").read_text())["steps_per_s"] == summary["steps_per_s"]


def test_early_stop_reason_counts_epochs_since_the_best():
    from siasam_fast.training import early_stop_reason

    rows = [{"step": 2 * e, "epoch": e, "val_mse": v} for e, v in enumerate([5.0, 4.0, 4.5], 1)]
    assert early_stop_reason(rows, "val", "mse", 2) is None  # 1 epoch since the best (2)
    assert early_stop_reason(rows, "val", "mse", 1) == (
        "early stop (train.early_stop=1): val mse has not improved for 1 epochs since epoch 2 "
        "(4.0000)")
    assert early_stop_reason(rows, "val", "mse", 0) is None  # off
    assert early_stop_reason(rows, None, "mse", 1) is None  # no evaluation
    assert early_stop_reason([], "val", "mse", 1) is None


def test_the_best_epoch_of_a_resumed_run_and_the_tag_kept(tmp_path):
    """A resumed run's history comes back from metrics_epochs.csv (cells as numbers, NaN too); a
    NaN before the best is no best; train.keep_best off, or no evaluation, keeps no tag."""
    from siasam_fast.config import Config
    from siasam_fast.training import MetricsLog, best_epoch, kept_best_tag

    path = tmp_path / "metrics_epochs.csv"
    log = MetricsLog(path, True)
    for row in ({"step": 2, "epoch": 1, "val_accuracy": float("nan"), "val_num_examples": 10},
                {"step": 4, "epoch": 2, "val_accuracy": 0.25, "val_num_examples": 10},
                {"step": 6, "epoch": 3, "val_accuracy": 0.5, "val_num_examples": 10},
                {"step": 8, "epoch": 4, "val_accuracy": 0.5, "val_num_examples": 10}):
        log.write(row)
    history = MetricsLog(path, True, resume_step=6).rows  # the rows up to the resumed step
    assert [r["epoch"] for r in history] == [1, 2, 3]
    best = best_epoch(history, "val", "accuracy", tmp_path)
    assert (best["epoch"], best["step"], best["accuracy"], best["checkpoint"]) == (3, 6, 0.5, None)
    assert best_epoch(history[:1], "val", "accuracy", tmp_path) is None  # NaN only
    cfg = Config()
    assert kept_best_tag(history, cfg, "val", tmp_path) == "step6"
    assert kept_best_tag(history, cfg, None, tmp_path) is None  # eval.split none
    assert kept_best_tag(history[:1], cfg, "val", tmp_path) is None
    cfg.train.keep_best = False
    assert kept_best_tag(history, cfg, "val", tmp_path) is None
    cfg = Config.from_dict({"task": "count"})  # the lowest MSE
    mse = [{"step": 2, "epoch": 1, "val_mse": 2.0}, {"step": 4, "epoch": 2, "val_mse": 1.5},
           {"step": 6, "epoch": 3, "val_mse": 3.0}]
    assert kept_best_tag(mse, cfg, "val", tmp_path) == "step4"


def test_a_metric_first_seen_in_a_later_epoch_gets_its_column(tmp_path):
    """num_failed, num_dropped, accuracy_all appear only when there is something to count: a
    column first seen in epoch 2 used to be dropped from metrics_epochs.csv silently."""
    from siasam_fast.training import MetricsLog

    path = tmp_path / "metrics_epochs.csv"
    log = MetricsLog(path, True)
    log.write({"step": 2, "epoch": 1, "val_accuracy": 0.5})
    log.write({"step": 4, "epoch": 2, "val_accuracy": 0.25, "val_num_failed": 3})
    log.write({"step": 6, "epoch": 3, "val_accuracy": 0.75})
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["val_num_failed"] for r in rows] == ["", "3", ""]
    assert [r["val_accuracy"] for r in rows] == ["0.5", "0.25", "0.75"]
    resumed = MetricsLog(path, True, resume_step=4).rows
    assert [r["val_num_failed"] for r in resumed] == ["", 3]


def test_a_resume_before_every_logged_row_starts_the_csv_again_with_its_header(tmp_path):
    """--resume of a checkpoint older than every row (a run resumed from an early tag, its epoch
    rows all later): the rows go, and the next row comes with the header."""
    from siasam_fast.training import MetricsLog

    path = tmp_path / "metrics_epochs.csv"
    log = MetricsLog(path, True)
    log.write({"step": 17, "epoch": 1, "val_accuracy": 0.5})
    log.write({"step": 34, "epoch": 2, "val_accuracy": 0.75})
    resumed = MetricsLog(path, True, resume_step=3)
    assert resumed.rows == []
    resumed.write({"step": 17, "epoch": 1, "val_accuracy": 0.25})
    with path.open(newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"step": "17", "epoch": "1", "val_accuracy": "0.25"}]


def test_the_steps_log_of_a_resumed_run_keeps_no_rows_in_memory(tmp_path):
    """A resumed run's metrics_steps.csv is cut at the resumed step, its rows not kept: the run
    never reads them, and a long run's (100k steps: some 90 MB) stayed in memory to its end."""
    import inspect

    from siasam_fast import training
    from siasam_fast.training import MetricsLog

    path = tmp_path / "metrics_steps.csv"
    log = MetricsLog(path, True)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    resumed = MetricsLog(path, True, resume_step=3, keep_rows=False)
    assert resumed.rows == []
    with path.open(newline="") as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["1", "2", "3"]
    resumed.write({"step": 4, "loss": 0.5})
    with path.open(newline="") as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["1", "2", "3", "4"]
    source = inspect.getsource(training.run_training)
    assert 'MetricsLog(out_dir / "metrics_steps.csv"' in source
    assert "keep_rows=False" in source.split('"metrics_steps.csv"', 1)[1].split(")", 1)[0]


def test_each_metrics_row_reaches_tensorboard_at_once(tmp_path, monkeypatch):
    """Where tensorboard is installed, each row's scalars are flushed with the row: the writer is
    never closed and its thread flushes every 2 minutes, so a process ending soon after its last
    rows lost them (seen: 4 of 10). A stand-in SummaryWriter (tensorboard is not installed here)."""
    import sys
    import types

    from siasam_fast.training import MetricsLog

    events = []

    class SummaryWriter:
        def __init__(self, folder):
            events.append(("open", folder))

        def add_scalar(self, tag, value, step):
            events.append(("scalar", tag, value, step))

        def flush(self):
            events.append(("flush",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    log = MetricsLog(tmp_path / "metrics_epochs.csv", True)
    log.write({"step": 7, "epoch": 1, "val_accuracy": 0.5, "task": "open"})
    assert events == [("open", str(tmp_path / "tensorboard")),
                      ("scalar", "metrics_epochs/epoch", 1, 7),
                      ("scalar", "metrics_epochs/val_accuracy", 0.5, 7), ("flush",)]


def test_a_run_without_a_config_file_but_its_data_set_is_not_refused():
    """The check of "no --config" refuses a training whose every setting is the default (no
    data), not one that gives its data with --set alone."""
    import argparse

    from siasam_fast.config import Config
    from siasam_fast.training import check_start_args

    cfg = Config.from_dict({"data": {"manifest": "data/manifest.jsonl"}})
    check_start_args(argparse.Namespace(config=None, resume=None), cfg)
    with pytest.raises(ValueError, match="no --config given"):
        check_start_args(argparse.Namespace(config=None, resume=None), Config())


def test_resume_if_any_starts_or_continues(synth, tmp_path):
    """--resume if-any, for jobs that are requeued: a new run in an empty folder, a resume where a
    checkpoint is, and a new run over an earlier try that never saved one."""
    out = tmp_path / "job"
    aside = out / "replaced-20261128-190502"  # an overwrite whose replacement never saved
    (aside / "checkpoints").mkdir(parents=True)
    (aside / "checkpoints" / "latest").write_text("step4")
    proc = train(base_args(synth, out, "--set", "train.max_steps=2", "--resume", "if-any"))
    assert len(losses(out)) == 2 and "moved the previous run" not in proc.stdout
    assert (f"note: {aside} holds a run that train.overwrite set aside and whose replacement "
            "never saved: it stays until you delete it") in proc.stdout, proc.stdout
    assert aside.is_dir()
    # a max_steps stop says so, and summary.json says the run is not over
    assert "stopped at train.max_steps=2 (2 of " in proc.stdout, proc.stdout
    assert "--resume auto with a larger (or no) train.max_steps continues" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ended"] == "max_steps" and summary["planned_steps"] > 2
    proc = train(base_args(synth, out, "--set", "train.max_steps=4", "--resume", "if-any"))
    assert len(losses(out)) == 4  # continued from step 2: its rows kept, two more
    tries = tmp_path / "tries"
    tries.mkdir()
    (tries / "metrics_steps.csv").write_text("step,loss\n1,5.0\n")  # died before a checkpoint
    proc = train(base_args(synth, tries, "--set", "train.max_steps=2", "--resume", "if-any"))
    assert "--resume if-any, no checkpoint to continue: moved the previous run" in proc.stdout
    assert len(losses(tries)) == 2 and not list(tries.glob("replaced-*"))
    with pytest.raises(AssertionError, match="holds another run"):  # plain start: refused
        train(base_args(synth, out, "--set", "train.max_steps=2"))


def test_incompatible_checkpoint_is_refused(synth, tmp_path):
    out = tmp_path / "run"
    train(base_args(synth, out, "--set", "train.max_steps=2"))
    mismatch = r"model.dropout: checkpoint has 0.1, this run has 0.3"
    with pytest.raises(AssertionError, match=mismatch):
        train(base_args(synth, out, "--set", "model.dropout=0.3", "--resume", "auto"))
    with pytest.raises(AssertionError, match=r"was trained in fp32, this run is bf16: resume "
                                             r"with a DeepSpeed config of the same precision"):
        train(base_args(synth, out, "--resume", "auto", "--deepspeed_config",
                        str(ROOT / "configs" / "ds" / "zero2_bf16.json")))
    mismatch = r"sampling.num_clips: checkpoint has 3, this run has 4"
    with pytest.raises(AssertionError, match=mismatch):
        run([sys.executable, "-m", "siasam_fast.cli", "eval", "--checkpoint", str(out),
             "--set", "sampling.num_clips=4"])


def test_ctrl_c_while_training_starts_is_one_line(synth, tmp_path):
    """Ctrl-C in the first seconds (torch, DeepSpeed and transformers importing, DeepSpeed
    starting): one line and status 130, not a traceback; nothing written."""
    out = tmp_path / "r"
    # SIGINT's default action restored: a suite started in the background by a non-interactive
    # shell runs with SIGINT ignored, which the child would inherit (no KeyboardInterrupt then).
    proc = subprocess.Popen([sys.executable, "train.py", *base_args(synth, out)], cwd=ROOT,
                            env=cpu_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.7)  # Python is up and importing (torch alone takes longer than this)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted" in stderr, stderr[-3000:]
    assert not (out / "summary.json").exists()


SIGNAL_IN_MODEL_BUILD = """
import os, signal, sys, time
from siasam_fast import training

def build(*args, **kwargs):  # a scheduler's SIGTERM while the model is built
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    raise AssertionError("the start-up went on after the signal")

training.build_model = build
sys.exit(training.main(sys.argv[1:]))
"""


def test_a_sigterm_later_in_the_start_up_is_one_line_too(synth, tmp_path):
    """A SIGTERM while the model was built (or the data loaded, a checkpoint read) ended the
    process at once: no line at all, status -15. It now says so, and the run folder's lock goes."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_IN_MODEL_BUILD, *base_args(synth, out)],
                          cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert ("stopped by SIGTERM during the start-up, before the first step: nothing was "
            "trained; run the same command again to start") in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (out / ".lock").exists()


def test_ctrl_c_after_the_imports_and_before_the_loop_is_one_line_and_status_130(monkeypatch,
                                                                                capsys):
    """Ctrl-C once training.main runs (DeepSpeed starting, the data loading), before the run's
    stop handling is in place: main's own line and status 130, as in the imports."""
    from siasam_fast import training

    def interrupted(argv, prog):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert training.main([]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: stopped at once;") and "Traceback" not in err


def test_an_out_dir_under_a_file_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """train.out_dir inside a file (a typo, a file named like the run): one line naming the file,
    status 2; not the lock's FileExistsError traceback."""
    from siasam_fast.training import main

    _no_launcher_env(monkeypatch)
    victim = tmp_path / "runs"
    victim.write_text("keep")
    manifest = tmp_path / "manifest.jsonl"  # (checked first, for being there only)
    manifest.write_text("")
    code = main(["--config", str(ROOT / "configs" / "synthetic.yaml"),
                 "--set", f"train.out_dir={victim / 'run'}", "--set", f"data.manifest={manifest}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == (f"error: train.out_dir={str(victim / 'run')!r}: {str(victim)!r} is a file, "
                   "not a folder\n")
    assert victim.read_text() == "keep"


def test_fp16_on_cpu_is_a_clear_error(synth, tmp_path):
    with pytest.raises(AssertionError, match=r"fp16 needs a CUDA GPU"):
        train(base_args(synth, tmp_path / "r", "--deepspeed_config",
                        str(ROOT / "configs/ds/zero2_fp16.json")))


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"],
}


@pytest.mark.parametrize("stage, precision, launcher", [
    (1, "fp32", "torchrun"), (2, "bf16", "deepspeed"), (3, "fp32", "torchrun"),
])
def test_two_processes_with_zero(synth, tmp_path, stage, precision, launcher):
    out = tmp_path / f"zero{stage}"
    port = free_port()
    # stage 1: train.early_stop decided on rank 0 and followed by both (the weights cannot
    # change: epoch 2 is no better than epoch 1, so epoch 3 is not run)
    early = (["--set", "train.epochs=3", "--set", "train.early_stop=1", "--set", "train.lr=0",
              "--set", "model.cnn_freeze=batchnorm"] if stage == 1 else [])
    cmd = [*LAUNCHERS[launcher], "--master_port", str(port), "train.py",
           "--deepspeed_config", str(ROOT / f"configs/ds/zero{stage}_{precision}.json"),
           *base_args(synth, out, "--set", "train.epochs=1", *early)]
    proc = run(cmd)
    assert f"2 process(es) on cpu, {precision}, ZeRO stage {stage}" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage
    with (out / "metrics_steps.csv").open() as fh:  # a step: 4 videos on each of 2 processes
        first = next(csv.DictReader(fh))
    assert float(first["videos_per_s"]) == pytest.approx(8 / float(first["step_s"]))
    if early:
        assert "epochs 3-3 are not run" in proc.stdout and summary["epochs_completed"] == 2
    # Evaluation gathers both shards without duplicates: every val example once.
    n_val = len(json.loads((synth / "annotations" / "val_qa.json").read_text()))
    assert summary["val"]["num_examples"] == n_val
    tag = (out / "checkpoints" / "latest").read_text().strip()
    files = {p.name for p in (out / "checkpoints" / tag).iterdir()}
    assert {"rng_rank0.json", "rng_rank1.json", "loader_rank0.json", "loader_rank1.json",
            "run_state.json"} <= files
    if stage == 3:
        assert "model_weights.pt" in files  # gathered, for weights_only evaluation
    # DeepSpeed's CPU all-reduce buffers (66 MB per rank in /dev/shm; the deepspeed launcher
    # sets LOCAL_SIZE, which turns them on) are gone once the run ends.
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"left in /dev/shm: {[p.name for p in left]}"
    proc = run([sys.executable, "-m", "siasam_fast.cli", "eval", "--checkpoint", str(out)])
    assert re.search(r"\naccuracy +[01]\.\d{4}\n", proc.stdout)


def adam_steps(tag_dir: Path) -> list[int]:
    """The Adam step counts of each ZeRO partition saved in ``tag_dir`` (stages 1-2: the base
    optimizer's state; stage 3: its own), one list entry per distinct count of a partition."""
    import torch

    counts = []
    for path in sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")):
        saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        inner = saved.get("base_optimizer_state") or saved["optimizer_state_dict"]
        counts += sorted({int(v["step"]) for v in inner["state"].values()})
    return counts


def failed_train(args: list[str]) -> subprocess.CompletedProcess:
    """train.py that must fail with a usage error (status 2)."""
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def bn_batches(tag_dir: Path) -> int:
    """num_batches_tracked of the first BatchNorm in ``tag_dir``'s saved module."""
    import torch

    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    return int(next(v for k, v in module.items() if k.endswith("num_batches_tracked")))


def test_resume_on_another_number_of_processes(synth, tmp_path):
    """A ZeRO run saved by 2 processes continues on 1, then on 2 again (a requeued job on a
    smaller or larger allocation): the optimizer state goes through a universal checkpoint, the
    epoch continues where it stopped, and train.grad_accum may change to keep the batch."""
    out = tmp_path / "run"
    zero2 = ["--deepspeed_config", str(ROOT / "configs/ds/zero2_fp32.json")]
    run([*LAUNCHERS["torchrun"], "--master_port", str(free_port()), "train.py", *zero2,
         *base_args(synth, out, "--set", "train.max_steps=2")])
    assert adam_steps(out / "checkpoints" / "step2") == [2, 2]
    # A checkpoint DeepSpeed cannot convert: one error that says so and the ways out.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    part = broken / "checkpoints" / "step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    part.write_bytes(part.read_bytes()[:1000])
    proc = failed_train([*zero2, *base_args(synth, broken, "--set", "train.max_steps=3",
                                            "--resume", "auto")])
    assert "error: DeepSpeed's ds_to_universal failed" in proc.stderr, proc.stderr[-3000:]
    assert "Resume on the 2 process(es) that saved it, or start a new run" in proc.stderr
    assert "Traceback (most recent call last):\n  File \"/" not in proc.stderr.split("error:")[-1]
    assert sorted(p.name for p in (broken / "checkpoints").iterdir() if p.is_dir()) == ["step2"]
    # ZeRO-2's optimizer state does not load into ZeRO-3: refused by name before DeepSpeed starts.
    proc = failed_train(["--deepspeed_config", str(ROOT / "configs/ds/zero3_fp32.json"),
                         *base_args(synth, out, "--set", "train.max_steps=3", "--resume", "auto")])
    assert ("was saved with ZeRO stage 2, this run's DeepSpeed config has stage 3: DeepSpeed loads "
            "optimizer state across stages 1 and 2 only") in proc.stderr, proc.stderr[-3000:]
    proc = train([*zero2, *base_args(synth, out, "--set", "train.max_steps=3",
                                     "--set", "train.grad_accum=2", "--resume", "auto")])
    assert "universal checkpoint written" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == [
        "step2", "step3"]  # the universal checkpoint is removed once loaded
    assert re.search(r"note: checkpoint step2 was saved by 2 process\(es\), this run has 1: "
                     r"epoch 1 continues after its first 16 of \d+ examples; ZeRO's optimizer "
                     r"state is re-partitioned", proc.stdout), proc.stdout[-3000:]
    assert "batch per step changes" not in proc.stdout  # 4 x 1 x 2 = 4 x 2 x 1
    assert "done: 3 steps" in proc.stdout
    assert adam_steps(out / "checkpoints" / "step3") == [3]  # continued, not restarted
    # BatchNorm's batch count (a buffer, which DeepSpeed's universal load leaves out) continues:
    # step 3 is 2 micro-batches on 1 process, after rank 0's 2 of steps 1-2.
    ckpts = out / "checkpoints"
    assert bn_batches(ckpts / "step3") == bn_batches(ckpts / "step2") + 2
    with (out / "metrics_steps.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)][-3:] == [1, 2, 3]
    (out / "checkpoints" / ".step1.universal" / "universal").mkdir(parents=True)  # left by a stop
    proc = run([*LAUNCHERS["torchrun"], "--master_port", str(free_port()), "train.py", *zero2,
                *base_args(synth, out, "--set", "train.max_steps=4", "--resume", "auto")])
    assert "was saved by 1 process(es), this run has 2" in proc.stdout, proc.stdout[-3000:]
    assert "done: 4 steps" in proc.stdout
    assert adam_steps(out / "checkpoints" / "step4") == [4, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == [
        "step3", "step4"]  # keep_checkpoints=2; the universal ones are gone


def test_zero3_resume_on_fewer_processes_keeps_the_step_count_and_schedule(synth, tmp_path):
    """ZeRO-3 saved by 2 processes, resumed on 1 with the same train.grad_accum: Adam's step
    count continues by one a step (DeepSpeed's ZeRO-3 universal load gives every parameter group
    one shared step tensor, which AdamW would advance once per group), and the epoch now takes
    17 steps instead of 9: the learning rate decays to zero at the run's new end (the steps done
    plus the steps left), from the next step on."""
    from siasam_fast.training import warmup_linear_decay

    out = tmp_path / "run"
    zero3 = ["--deepspeed_config", str(ROOT / "configs/ds/zero3_fp32.json")]
    run([*LAUNCHERS["torchrun"], "--master_port", str(free_port()), "train.py", *zero3,
         *base_args(synth, out, "--set", "train.max_steps=2")])
    proc = train([*zero3, *base_args(synth, out, "--set", "train.max_steps=4",
                                     "--resume", "auto")])
    # 2 steps x 4 x 2 processes = 16 examples done: micro-batch 4 of 17; 13 steps left in the
    # epoch, then 17 in the second: 2 + 13 + 17 = 32.
    assert re.search(r"an epoch takes 17 steps \(was 9\): the learning rate now decays to zero "
                     r"at step 32 \(was 18\)", proc.stdout), proc.stdout[-3000:]
    with (out / "metrics_steps.csv").open() as fh:
        rows = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(fh)}
    lr = 1e-3  # configs/synthetic.yaml
    for step in (3, 4):  # the rate of step s is the schedule's at s - 1
        assert rows[step] == pytest.approx(lr * warmup_linear_decay(32, 0.1)(step - 1))
    assert adam_steps(out / "checkpoints" / "step4") == [4]


def test_multiple_choice_task(synth, tmp_path):
    """How2QA-style (VALUE JSONL) multiple choice: hinge L_gt, siamese loss over candidates."""
    out = tmp_path / "mc"
    ann = synth / "annotations"
    train(base_args(synth, out, "--set", "task=mc", "--set", "data.dataset=how2qa",
                    "--set", f"data.train={ann / 'how2qa_train.jsonl'}",
                    "--set", f"data.val={ann / 'how2qa_val.jsonl'}", "--set", "train.epochs=1"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val"]["num_examples"] > 0 and 0.0 <= summary["val"]["accuracy"] <= 1.0
    with (out / "metrics_steps.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["loss_siamese"]) >= 0 for r in rows)
    # Evaluating needs no train annotations: multiple choice has no answer vocabulary to build.
    proc = run([sys.executable, "-m", "siasam_fast.cli", "eval", "--checkpoint", str(out),
                "--set", "data.train=", "--json", str(tmp_path / "eval.json")])
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["accuracy"] == pytest.approx(summary["val"]["accuracy"]), proc.stdout
    # One question about one video: a probability for every candidate.
    proc = ask(out, synth / "videos" / "video0.mp4", "What color is the big triangle?",
               "--candidates", "it is red|it is cyan|it is green", "--json")
    answers = json.loads(proc.stdout)["answers"]
    assert [a for a, _ in answers] == ["it is red", "it is cyan", "it is green"]
    assert sum(p for _, p in answers) == pytest.approx(1.0)
    assert "note:" not in proc.stderr
    proc = ask(out, synth / "videos" / "video0.mp4", "What color?", "--candidates",
               "it is red|it is " + "a very light cyan " * 8)  # (the question is short)
    assert re.search(r"note: the question with its longest candidate is \d+ tokens; the model "
                     r"reads 32 of them", proc.stderr), proc.stderr
    proc = ask(out, synth / "videos" / "video0.mp4", "What color?", ok=False)
    assert "task=mc): give the answers to choose from with --candidates" in proc.stderr
    proc = ask(out, synth / "videos" / "video0.mp4", "What color?", "--candidates",
               "it is red|it is cyan| it is red", ok=False)  # (two rows at 50% each)
    assert "--candidates: 'it is red' is given more than once" in proc.stderr


def ask(run_dir: Path, video: Path, question: str, *options: str,
        ok: bool = True) -> subprocess.CompletedProcess:
    """siasam-fast ask; ``ok=False``: it must fail with a usage error (status 2)."""
    proc = subprocess.run([sys.executable, "-m", "siasam_fast.cli", "ask", "--checkpoint",
                           str(run_dir), "--video", str(video), "--question", question,
                           *options], cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == (0 if ok else 2), proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_ask_answers_one_question_about_one_video(synth, tmp_path):
    out = tmp_path / "run"
    train(base_args(synth, out, "--set", "train.max_steps=2"))
    vocab = json.loads((out / "ans2label.json").read_text())
    proc = ask(out, synth / "videos" / "video0.mp4", "what is the color of the large triangle?",
               "--top", "3", "--json")
    answers = json.loads(proc.stdout)["answers"]
    assert len(answers) == 3 and all(a in vocab for a, _ in answers)
    probs = [p for _, p in answers]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    proc = ask(out, synth / "videos" / "video0.mp4", "what is the color of the large triangle?")
    assert re.fullmatch(r"(\S+ +\d+\.\d%\n){5}", proc.stdout), proc.stdout
    assert "note: the question is" not in proc.stderr
    proc = ask(out, synth / "videos" / "video0.mp4", "what is " + "the big red " * 20 + "?")
    assert re.search(r"note: the question is \d+ tokens; the model reads 32 of them "
                     r"\(data.max_question_len\)", proc.stderr), proc.stderr
    # Bad input: one line each, naming the option.
    proc = ask(out, tmp_path / "nope.mp4", "what?", ok=False)
    assert f"--video {str(tmp_path / 'nope.mp4')!r}: no such file" in proc.stderr
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    proc = ask(out, broken, "what?", ok=False)
    assert f"--video {str(broken)!r}: cannot be decoded:" in proc.stderr
    proc = ask(out, synth / "videos" / "video0.mp4", "what?", "--candidates", "a|b", ok=False)
    assert "--candidates: this checkpoint's task is 'open', which takes none" in proc.stderr
    proc = ask(out, synth / "videos" / "video0.mp4", "what?", "--candidates", "a", ok=False)
    assert "--candidates 'a': give two or more non-empty answers separated by |" in proc.stderr
    # A segment (How2QA's ts) as eval would take it; an empty one is refused.
    proc = ask(out, synth / "videos" / "video0.mp4", "what?", "--start", "0.5", "--end", "2",
               "--json")
    assert len(json.loads(proc.stdout)["answers"]) == 5
    proc = ask(out, synth / "videos" / "video0.mp4", "what?", "--start", "3", "--end", "1",
               ok=False)
    assert "--start / --end: segment empty: it ends (1.0 s) before it starts (3.0 s)" in proc.stderr
    # A run folder without ans2label.json: the vocabulary can be given with data.ans2label.
    vocab_file = tmp_path / "vocab.json"
    (out / "ans2label.json").rename(vocab_file)
    proc = ask(out, synth / "videos" / "video0.mp4", "what?", ok=False)
    assert "give it with --set data.ans2label=FILE" in proc.stderr
    proc = ask(out, synth / "videos" / "video0.mp4", "what?", "--set",
               f"data.ans2label={vocab_file}", "--json")
    assert len(json.loads(proc.stdout)["answers"]) == 5


def test_ask_answers_as_the_checkpoints_weights_say_and_names_bad_input(synth, tmp_path):
    """answer_question called directly on a checkpoint written without training, whose answer
    head favours one answer: it loads the weights, answers in evaluation mode (the same answer
    twice), gives probabilities over the whole vocabulary, and refuses bad input, and a vocabulary
    that is not the checkpoint's, before any decoding."""
    import torch

    from siasam_fast.data.vocab import save_ans2label
    from siasam_fast.model import load_tokenizer
    from siasam_fast.training import answer_question, build_model, load_data

    cfg = _config(synth, **{"sampling.num_clips": 2, "sampling.frames_per_clip": 1,
                            "data.image_size": 32, "model.dropout": 0.5})
    vocab = load_data(cfg).ans2label
    torch.manual_seed(0)
    model = build_model(cfg, len(vocab), len(load_tokenizer(cfg.model)))
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    favourite = sorted(vocab)[3]
    with torch.no_grad():
        last.bias[vocab[favourite]] = 50.0
    tag = write_checkpoint(model, cfg, vocab, tmp_path / "run" / "checkpoints" / "step1")
    video, question = synth / "videos" / "video0.mp4", "what is the color of the triangle?"

    answers = answer_question(str(tag), str(video), question, top=len(vocab) + 5)
    assert answers["task"] == "open" and len(answers["answers"]) == len(vocab)
    assert answers["answers"][0][0] == favourite and answers["answers"][0][1] > 0.99
    probs = [p for _, p in answers["answers"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    other = tmp_path / "other.json"  # a data.ans2label: the run folder's vocabulary comes first
    save_ans2label({"red": 0}, other)
    assert answer_question(str(tag), str(video), question, top=len(vocab) + 5,
                           overrides=[f"data.ans2label={other}"]) == answers
    assert answer_question(str(tag), str(video), question, top=len(vocab) + 5,  # quoted
                           overrides=[f"data.ans2label='{other}'"]) == answers

    for kwargs, message in (
            ({"question": " "}, "--question is empty"),
            ({"candidates": ["a", "b"]}, "--candidates: this checkpoint's task is 'open'"),
            ({"video": str(tmp_path)}, r"--video '.*' is a folder: give one video file"),
            ({"overrides": [f"data.ans2label={tmp_path / 'none.json'}"]},
             r"data.ans2label='.*none.json': no such file"),
            ({"task": "qa"}, "--task 'qa': this checkpoint was trained on one task"),
            ({"start": 3.0, "end": 1.0}, r"--start / --end: segment empty")):
        with pytest.raises(ValueError, match=message):
            answer_question(str(tag), **{"video": str(video), "question": question, **kwargs})
    save_ans2label({"red": 0}, tmp_path / "run" / "ans2label.json")
    with pytest.raises(ValueError, match=r"run/ans2label.json is not the answer vocabulary"):
        answer_question(str(tag), str(video), question)


def test_eval_names_a_split_it_cannot_evaluate_and_another_vocabulary(synth, tmp_path):
    """evaluate_checkpoint's refusals, before it starts a process group: a split that is not one,
    or has no annotations, and a run folder's vocabulary that is not the checkpoint's (found
    without reading train's annotations, which the run folder's vocabulary makes unneeded)."""
    from siasam_fast.data.vocab import save_ans2label
    from siasam_fast.training import build_model, evaluate_checkpoint, load_data

    cfg = _config(synth, **{"sampling.num_clips": 2})
    vocab = load_data(cfg).ans2label
    tag = write_checkpoint(build_model(cfg, len(vocab), 64), cfg, vocab,
                           tmp_path / "run" / "checkpoints" / "step1")
    with pytest.raises(ValueError, match=r"split='none': valid splits are train, val, test \(the "
                                         r"run's eval.split is 'none': choose one with --split"):
        evaluate_checkpoint(str(tag), overrides=["eval.split=none"])
    with pytest.raises(ValueError, match=r"split 'test' has no annotations in this config "
                                         r"\(data.test is empty\)"):
        evaluate_checkpoint(str(tag), split="test")
    save_ans2label({"red": 0}, tmp_path / "run" / "ans2label.json")
    with pytest.raises(ValueError, match=r"step1 was trained with another answer vocabulary"):
        evaluate_checkpoint(str(tag), overrides=[f"data.train={tmp_path / 'moved.json'}"])


def test_count_task(synth, tmp_path):
    """TGIF-QA count format (tab-separated, header): MSE L_gt, scalar siamese propagation."""
    meta = json.loads((synth / "meta.json").read_text())
    path = tmp_path / "Train_count_question.csv"
    lines = ["gif_name\tquestion\tanswer\tvid_id\tkey"]
    for vid, video in meta["videos"].items():
        q = video["questions"]["count"]
        n = video["events"]["count"]["count"]
        lines.append(f"{vid}\t{q['open_question']}\t{n}\tCOUNT{video['index']}\t{video['index']}")
    path.write_text("\r\n".join(lines) + "\r\n")
    out = tmp_path / "count"
    # ZeRO-3: the count term reads theta1 / theta2, partitioned unless gathered by a module call
    train(base_args(synth, out, "--set", "task=count", "--set", "data.dataset=tgif_count",
                    "--set", f"data.train={path}", "--set", f"data.val={path}",
                    "--set", "train.epochs=1", "--deepspeed_config",
                    str(ROOT / "configs" / "ds" / "zero3_fp32.json")))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val"]["num_examples"] == len(lines) - 1
    assert summary["val"]["mse"] >= 0
    proc = ask(out, synth / "videos" / "video0.mp4", "how many rings appear?")
    # the answer as evaluation takes it (rounded, 1..10: eval.count_metric tgif) and the output
    match = re.fullmatch(r"count: (\d+) \(model output (-?\d+\.\d\d)\)\n", proc.stdout)
    assert match and 1 <= int(match[1]) <= 10, proc.stdout
    assert int(match[1]) == min(10, max(1, int(float(match[2]) + 0.5)))
    proc = ask(out, synth / "videos" / "video0.mp4", "how many rings appear?", "--json",
               "--set", "eval.count_metric=raw")
    result = json.loads(proc.stdout)
    assert result["count"] == result["output"] and isinstance(result["count"], float)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("7.0;8.0;9.0", None),  # DeepSpeed reads it as is
        ("9.0a", "9.0"),
        ("8.0;9.0a;9.0", "8.0;9.0"),
        ("10.0f+PTX 9.0a", "10.0+PTX;9.0"),
    ],
)
def test_arch_list_made_readable_for_deepspeed_fused_adam(value, expected):
    from siasam_fast.training import deepspeed_arch_list

    assert deepspeed_arch_list(value) == expected
    if expected:  # DeepSpeed 0.19's own sort key (op_builder/builder.py) must accept every entry
        for cc in expected.split(";"):
            tuple(int(part.split("+")[0]) for part in cc.split("."))


def test_init_from_starts_a_new_run_from_trained_weights(synth, tmp_path):
    import torch

    from siasam_fast.training import load_model_weights, resolve_checkpoint

    base, fine = tmp_path / "base", tmp_path / "fine"
    train(base_args(synth, base, "--set", "train.max_steps=3", "--set", "siamese.alpha=0",
                    "--set", "sampling.num_clips=1"))  # fmt: skip
    # SiaSamRea with 3 clips from the 1-clip baseline; lr 0 keeps the loaded weights as they are.
    proc = train(base_args(synth, fine, "--set", "train.max_steps=1", "--set", "train.lr=0",
                           "--set", f"train.init_from={base}"))  # fmt: skip
    assert "initialised afresh: reasoning.theta1, reasoning.theta2" in proc.stdout, proc.stdout
    a, b = (load_model_weights(resolve_checkpoint(d)) for d in (base, fine))
    shared = [k for k in a if a[k].shape == b[k].shape and "running_" not in k
              and "num_batches" not in k]  # fmt: skip
    assert len(shared) > 20 and all(torch.equal(a[k], b[k]) for k in shared)
    assert b["reasoning.theta1"].shape == (3,)
    # A run with other answers builds its own vocabulary (here the top 3 of the same data).
    proc = train(base_args(synth, tmp_path / "fewer", "--set", "train.max_steps=1", "--set",
                           "train.lr=0", "--set", "data.num_answers=3",
                           "--set", f"train.init_from={base}"))  # fmt: skip
    assert re.search(r"answers: 3 of this run's 3 carried over from the checkpoint's \d+-answer",
                     proc.stdout), proc.stdout
    assert len(json.loads((tmp_path / "fewer" / "ans2label.json").read_text())) == 3
    mismatch = r"model.dropout: checkpoint has 0.1, this run has 0.3"
    with pytest.raises(AssertionError, match=mismatch):
        train(base_args(synth, tmp_path / "other", "--set", "model.dropout=0.3",
                        "--set", f"train.init_from={base}"))  # fmt: skip


PRE_VOCAB = {"red": 0, "blue": 1, "green": 2, "cat": 3}


def pretrained_open_model(tmp_path):
    """A checkpoint of an open-ended synthetic model (3 clips) with the answers red, blue, green,
    cat: its config, tag folder, weights, and the name of the classifier's output layer."""
    import torch

    from siasam_fast.config import load_config
    from siasam_fast.training import build_model

    cfg = load_config(ROOT / "configs" / "synthetic.yaml", ["sampling.num_clips=3"])
    torch.manual_seed(0)
    pre = build_model(cfg, len(PRE_VOCAB), 64)
    tag = write_checkpoint(pre, cfg, PRE_VOCAB, tmp_path / "pre" / "checkpoints" / "step5")
    out = [n for n, m in pre.head.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    return cfg, tag, pre.state_dict(), out


def test_init_from_another_dataset_or_task_keeps_what_carries_over(tmp_path):
    """The paper's recipe, pre-training on TGIF-QA and fine-tuning on another dataset: its answers
    differ (the classifier's rows are carried over by answer) and so may its task (the head starts
    fresh). Before, another task was refused and the new run took the checkpoint's vocabulary:
    every answer of the new dataset outside it was dropped from training."""
    import torch

    from siasam_fast.config import load_config
    from siasam_fast.training import build_model, init_model_from

    cfg, tag, before, out = pretrained_open_model(tmp_path)

    new_vocab = {"dog": 0, "cat": 1, "red": 2}  # another dataset's answers
    fine = build_model(cfg, len(new_vocab), 64)
    fresh = {k: v.clone() for k, v in fine.state_dict().items()}
    note = init_model_from(fine, tag, cfg, new_vocab)
    assert "answers: 2 of this run's 3 carried over from the checkpoint's 4-answer" in note, note
    after = fine.state_dict()
    w, b = f"head.{out}.weight", f"head.{out}.bias"
    assert torch.equal(after[w][1], before[w][3]) and torch.equal(after[b][1], before[b][3])
    assert torch.equal(after[w][2], before[w][0]) and torch.equal(after[b][2], before[b][0])
    assert torch.equal(after[w][0], fresh[w][0])  # "dog": new
    backbone = [k for k in after if not k.startswith("head.") and "num_batches" not in k]
    assert len(backbone) > 20 and all(torch.equal(after[k], before[k]) for k in backbone)
    assert all(torch.equal(after[k], before[k]) for k in after
               if k.startswith("head.") and k not in (w, b))  # the hidden layers

    # An ans2label.json rewritten since the checkpoint (not the vocabulary its rows follow): no row
    # is carried over rather than the wrong ones.
    (tmp_path / "pre" / "ans2label.json").write_text(json.dumps({"cat": 0, "red": 1}))
    note = init_model_from(build_model(cfg, len(new_vocab), 64), tag, cfg, new_vocab)
    assert "answers: 0 of this run's 3 carried over from the checkpoint's 4-answer" in note, note
    assert "is not the vocabulary it was trained with" in note

    mc = load_config(ROOT / "configs" / "synthetic.yaml", ["sampling.num_clips=3", "task=mc"])
    scorer = build_model(mc, 0, 64)
    fresh = {k: v.clone() for k, v in scorer.state_dict().items()}
    note = init_model_from(scorer, tag, mc, {})
    assert "head initialised afresh (the checkpoint's task is 'open')" in note, note
    after = scorer.state_dict()
    assert all(torch.equal(after[k], fresh[k]) for k in after if k.startswith("head."))
    assert all(torch.equal(after[k], before[k]) for k in backbone)
    # another task's head starts fresh whichever it is: ClipBERT's here, the checkpoint's siasam
    mc.model.qa_head = "clipbert"
    note = init_model_from(build_model(mc, 0, 64), tag, mc, {})
    assert "head initialised afresh (the checkpoint's task is 'open')" in note, note
    cfg.model.qa_head = "clipbert"  # the same task: another head is another model
    with pytest.raises(ValueError, match="has another model:\n  model.qa_head: checkpoint has "
                                         "'auto', this run has 'clipbert'"):
        init_model_from(build_model(cfg, len(new_vocab), 64), tag, cfg, new_vocab)


def test_init_from_carries_each_answers_row_by_answer_and_says_what_it_loaded(tmp_path):
    """The classifier's rows follow the answers even when both vocabularies are as long (no row
    is taken by position); the note says what was loaded: everything for the same vocabulary,
    and which weights keep their initialisation (another number of clips: theta1, theta2)."""
    import torch

    from siasam_fast.config import load_config
    from siasam_fast.training import build_model, init_model_from

    cfg, tag, before, out = pretrained_open_model(tmp_path)
    w, b = f"head.{out}.weight", f"head.{out}.bias"

    same = build_model(cfg, len(PRE_VOCAB), 64)
    n = len(same.state_dict())
    note = init_model_from(same, tag, cfg, PRE_VOCAB)
    assert note == f"init_from {tag}: {n} of {n} tensors loaded"

    new_vocab = {"cat": 0, "red": 1, "dog": 2, "blue": 3}  # as many answers, other ones
    fine = build_model(cfg, len(new_vocab), 64)
    fresh = {k: v.clone() for k, v in fine.state_dict().items()}
    note = init_model_from(fine, tag, cfg, new_vocab)
    after = fine.state_dict()
    for new, old in ((0, 3), (1, 0), (3, 1)):
        assert torch.equal(after[w][new], before[w][old]) and after[b][new] == before[b][old]
    assert torch.equal(after[w][2], fresh[w][2]) and after[b][2] == fresh[b][2]  # "dog"
    assert note.endswith("; answers: 3 of this run's 4 carried over from the checkpoint's "
                         "4-answer classifier, the others start fresh"), note

    fewer = load_config(ROOT / "configs" / "synthetic.yaml", ["sampling.num_clips=2"])
    model = build_model(fewer, 2, 64)
    theta = model.state_dict()["reasoning.theta1"].clone()
    note = init_model_from(model, tag, fewer, {"cat": 0, "red": 1})
    assert note.endswith("; answers: 2 of this run's 2 carried over from the checkpoint's "
                         "4-answer classifier; shape differs, initialised afresh: "
                         "reasoning.theta1, reasoning.theta2"), note
    assert torch.equal(model.state_dict()["reasoning.theta1"], theta)


def test_alpha_warmup_ramps_the_siamese_weight(synth, tmp_path):
    """siamese.alpha_warmup: alpha grows linearly from 0 over that fraction of the steps (the
    steps CSV logs it), and each step's loss is L_gt + alpha_t * L_siamese."""
    from siasam_fast.config import SiameseConfig
    from siasam_fast.losses import alpha_at

    ramp = SiameseConfig(alpha=2.0, alpha_warmup=0.25)
    assert [alpha_at(ramp, s, 40) for s in (0, 5, 9, 10, 39)] == [0.0, 1.0, 1.8, 2.0, 2.0]
    assert alpha_at(SiameseConfig(alpha=2.0), 0, 40) == 2.0  # no warm-up: the paper's
    with pytest.raises(ValueError, match=r"siamese.alpha_warmup=1.5: must lie in \[0, 1\]"):
        SiameseConfig(alpha_warmup=1.5)

    out = tmp_path / "ramp"  # the ramp spans half of the 2 epochs' steps (max_steps stops early)
    train(base_args(synth, out, "--set", "train.max_steps=3", "--set", "siamese.alpha_warmup=0.5",
                    "--set", "siamese.alpha=1"))
    with (out / "metrics_steps.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    alphas = [float(r["alpha"]) for r in rows]
    assert len(alphas) == 3 and alphas[0] == 0.0 and 0 < alphas[1] < 1, alphas
    assert alphas[2] == pytest.approx(2 * alphas[1]), alphas  # linear
    for r in rows:
        assert float(r["loss"]) == pytest.approx(
            float(r["loss_gt"]) + float(r["alpha"]) * float(r["loss_siamese"]), rel=1e-5)


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_failed_start_or_a_rerun_leaves_the_previous_run_as_it_was(synth, tmp_path):
    out = tmp_path / "run"
    train(base_args(synth, out, "--set", "train.max_steps=2"))
    before = _snapshot(out)
    assert "ans2label.json" in before and "config.json" in before and "metrics_steps.csv" in before

    # Fails late (the tokenizer loads after the data and its new 5-answer vocabulary): nothing of
    # the previous run is rewritten, although overwrite was asked for.
    with pytest.raises(AssertionError, match=r"model.tokenizer='/nonexistent/tok': no such folder"):
        train(base_args(synth, out, "--set", "train.overwrite=true", "--set",
                        "data.num_answers=5", "--set", "model.tokenizer=/nonexistent/tok"))
    assert _snapshot(out) == before

    # A new run into the same folder without --resume is refused.
    with pytest.raises(AssertionError, match=r"holds another run \(checkpoints step2; "
                                             r"metrics_steps.csv.*--resume auto"):
        train(base_args(synth, out, "--set", "train.max_steps=1"))
    assert _snapshot(out) == before

    # Resuming another run's checkpoint into this folder would mix the two: refused too.
    other = tmp_path / "other"
    train(base_args(synth, other, "--set", "train.max_steps=1"))
    with pytest.raises(AssertionError, match=r"holds another run"):
        train(base_args(synth, out, "--resume", str(other), "--set", "train.max_steps=2"))
    assert _snapshot(out) == before

    # train.overwrite=true replaces it: the old run is set aside until the new one has saved a
    # checkpoint, then deleted; no step of it is left.
    proc = train(base_args(synth, out, "--set", "train.max_steps=1", "--set",
                           "train.overwrite=true"))
    assert "moved the previous run" in proc.stdout
    assert len(losses(out)) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step1"]
    assert not list(out.glob("replaced-*"))


def _config(synth: Path, **sets):
    from siasam_fast.config import load_config

    ann = synth / "annotations"
    values = {"data.train": ann / "train_qa.json", "data.val": ann / "val_qa.json",
              "data.test": "", "data.manifest": synth / "manifest.jsonl", **sets}
    return load_config(ROOT / "configs" / "synthetic.yaml",
                       [f"{k}={v}" for k, v in values.items()])


def test_a_multiple_choice_question_listing_a_candidate_twice_is_noted(synth, tmp_path):
    """How2QA has rows whose wrong answer repeats the right one: the model scores the two alike
    and the tie, not the video, decides; they loaded without a word."""
    from siasam_fast.training import load_data

    ann = synth / "annotations"
    rows = [json.loads(line) for line in (ann / "how2qa_train.jsonl").read_text().splitlines()]
    rows[1]["a2"] = rows[1]["a3"].upper() + " "  # the right answer again (case, space)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = {"task": "mc", "data.dataset": "how2qa", "data.train": tmp_path / "train.jsonl",
            "data.val": ann / "how2qa_val.jsonl"}
    notes = "\n".join(load_data(_config(synth, **sets)).notes)
    assert (f"data.train: 1 multiple-choice question(s) list one candidate twice (e.g. qid "
            f"{rows[1]['qid']}: ") in notes, notes
    assert "data.val: " not in notes
    assert "twice" not in "\n".join(load_data(_config(synth, **{
        **sets, "data.train": ann / "how2qa_train.jsonl"})).notes)


def test_a_missing_annotation_file_names_its_key(synth, tmp_path):
    from siasam_fast.training import load_data

    gone = tmp_path / "gone.json"
    with pytest.raises(ValueError, match=rf"data.val='{gone}': {gone} does not exist \(set "
                                         r"data.val to the val annotations, e.g. --set "
                                         r"data.val=PATH, or leave it empty\)"):
        load_data(_config(synth, **{"data.val": gone}))
    assert set(load_data(_config(synth, **{"data.val": gone}), splits=("train",)).examples) \
        == {"train"}


def test_data_of_another_task_is_refused_with_the_task_to_set(synth, tmp_path):
    """task=count on open-ended answers made NaN targets (fp16 then skipped every step silently);
    task=open on a count file failed deep in the vocabulary code."""
    from siasam_fast.training import load_data

    with pytest.raises(ValueError, match=r"task=count needs counting \(integer answers\), but "
                                         r"the data.train annotations .* hold open-ended answers "
                                         r".*: set task: open, or use a count dataset"):
        load_data(_config(synth, task="count"))
    with pytest.raises(ValueError, match=r"task=mc needs multiple choice \(candidates\), but the "
                                         r"data.train annotations .* hold open-ended answers"):
        load_data(_config(synth, task="mc"))
    path = tmp_path / "Train_count_question.csv"
    path.write_text("gif_name\tquestion\tanswer\tvid_id\tkey\nv\thow many?\t3\tCOUNT1\t1\n")
    with pytest.raises(ValueError, match="task=open needs open-ended answers, .* hold counting "
                                         r"\(integer answers\) .*: set task: count"):
        load_data(_config(synth, **{"data.dataset": "tgif_count", "data.train": path,
                                    "data.val": path}))


def test_labels_follow_answers_even_when_question_ids_repeat(synth, tmp_path):
    """Two files of one split may reuse question ids (ClipBERT JSONL without ids numbers each
    file from 0): each question keeps its own answer's label, and a note says ids repeat. The
    loading notes also count the out-of-vocabulary answers."""
    from siasam_fast.training import LabelLookup, load_data

    ann = synth / "annotations"
    records = json.loads((ann / "train_qa.json").read_text())
    other = [{**r, "answer": records[(i + 1) % len(records)]["answer"]}
             for i, r in enumerate(records)]  # same ids, other answers
    (tmp_path / "other.json").write_text(json.dumps(other))
    data = load_data(_config(synth, **{"data.train": f"{ann / 'train_qa.json'},"
                                                     f"{tmp_path / 'other.json'}"}))
    label_of = LabelLookup(data.ans2label)
    train = data.examples["train"]
    assert [label_of(ex) for ex in train] == list(data.labels["train"])
    assert len({ex.qid for ex in train}) < len(train)
    firsts = {}
    for ex in train:  # one qid, two answers, two labels
        firsts.setdefault(ex.qid, set()).add(label_of(ex))
    assert any(len(labels) == 2 for labels in firsts.values())
    notes = "\n".join(data.notes)
    assert "data.train: " in notes and "question id(s) occur more than once" in notes
    assert re.search(r"data.val answers \(\d+-answer vocabulary\): \d+ examples, 0 dropped "
                     r"and \d+ kept as OOV", notes), notes


def test_min_answer_count_keeps_answers_seen_that_often(synth):
    from collections import Counter

    from siasam_fast.training import load_data

    counts = Counter(ex.answer for ex in load_data(_config(synth)).examples["train"])
    data = load_data(_config(synth, **{"data.min_answer_count": 4}))
    assert set(data.ans2label) == {a for a, n in counts.items() if n >= 4}
    assert 0 < len(data.ans2label) < len(counts)
    with pytest.raises(ValueError, match=r"data.min_answer_count=0: must be >= 1"):
        _config(synth, **{"data.min_answer_count": 0})


def test_load_data_reads_the_splits_and_builds_loads_or_is_given_the_vocabulary(synth, tmp_path):
    """load_data called directly: a folder of annotations takes the split's file; train drops
    the answers outside the vocabulary and val keeps them (label -1); data.ans2label is read,
    a vocabulary given (evaluation: the run's) wins over a data.ans2label file that is gone; an
    empty data.train is refused where it is needed, and each bad key is named."""
    from siasam_fast.data.vocab import save_ans2label
    from siasam_fast.training import _split_paths, load_data

    ann = synth / "annotations"
    assert _split_paths(" a.json, ,b.json,") == ["a.json", "b.json"]
    data = load_data(_config(synth, **{"data.train": ann, "data.val": ann}))
    assert [ex.qid for ex in data.examples["train"]] == [
        ex.qid for ex in load_data(_config(synth)).examples["train"]]
    assert len(data.examples["val"]) == len(json.loads((ann / "val_qa.json").read_text()))
    (tmp_path / "three.json").write_text(json.dumps(
        json.loads((ann / "train_qa.json").read_text())[:3]))  # 3 ids again: each one named
    notes = load_data(_config(synth, **{"data.train": f"{ann / 'train_qa.json'},"
                                                      f"{tmp_path / 'three.json'}"})).notes
    assert re.search(r"data.train: 3 question id\(s\) occur more than once \('\w+', '\w+', "
                     r"'\w+'\); each occurrence", notes[0]), notes

    data = load_data(_config(synth, **{"data.num_answers": 3}))
    assert len(data.ans2label) == 3
    train, val = data.examples["train"], data.examples["val"]
    assert train and all(label >= 0 for label in data.labels["train"])
    assert len(train) < len(json.loads((ann / "train_qa.json").read_text()))  # OOV dropped
    assert len(val) == len(json.loads((ann / "val_qa.json").read_text()))  # OOV kept
    assert -1 in data.labels["val"]

    vocab = {data.examples["train"][0].answer: 0, "no such answer": 1}
    save_ans2label(vocab, tmp_path / "ans2label.json")
    assert load_data(_config(synth, **{"data.ans2label": tmp_path / "ans2label.json"})
                     ).ans2label == vocab
    gone = _config(synth, **{"data.ans2label": tmp_path / "gone.json"})
    with pytest.raises(ValueError, match=r"data.ans2label='.*gone.json' does not exist"):
        load_data(gone)
    assert load_data(gone, ans2label=vocab).ans2label == vocab

    no_train = _config(synth, **{"data.train": ""})
    with pytest.raises(ValueError, match="data.train is empty: training needs the train"):
        load_data(no_train)
    with pytest.raises(ValueError, match="data.train is empty: task=open builds its answer"):
        load_data(no_train, need_train=False)
    saved = _config(synth, **{"data.train": "", "data.ans2label": tmp_path / "ans2label.json"})
    data = load_data(saved, need_train=False)
    assert set(data.examples) == {"val"} and data.ans2label == vocab

    with pytest.raises(ValueError, match=r"data.manifest is empty: build one with"):
        load_data(_config(synth, **{"data.manifest": ""}))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"data.video_dir='.*file' is not a folder"):
        load_data(_config(synth, **{"data.video_dir": tmp_path / "file"}))


def test_videos_missing_from_the_manifest_start_are_only_refused_all_together(synth):
    """The moved-videos check looks at the first 20 videos indexed without error: one of them
    gone (deleted since) is left to the loader's stand-ins, as any damaged video is."""
    import dataclasses

    from siasam_fast.pipeline.manifest import load_manifest
    from siasam_fast.training import load_data

    manifest = load_manifest(synth / "manifest.jsonl")
    first = next(iter(manifest))
    manifest[first] = dataclasses.replace(manifest[first], path=str(synth / "gone.mp4"))
    assert load_data(_config(synth), manifest=manifest).examples["train"]
    moved = {k: dataclasses.replace(r, path=str(synth / "gone" / k)) for k, r in manifest.items()}
    with pytest.raises(ValueError, match=r"none of the first 16 videos is where the manifest "
                                         r"puts it \(e.g. .*gone/"):
        load_data(_config(synth), manifest=moved)


def test_each_split_gets_the_loader_its_config_asks_for(synth, monkeypatch, caplog):
    """make_loader passes the config to the loader factory: train its batch size, clips and
    answer labels; an evaluation split eval.batch_size and eval.num_clips clips; every split the
    seed, rank, epoch and decoding settings. A task=multi task's loader names the task in the log
    lines written while it is built, and only then."""
    import logging

    from siasam_fast import training

    monkeypatch.setattr(training, "build_video_loader",
                        lambda *args, **kwargs: (args, kwargs))
    cfg = _config(synth, **{"train.batch_size": 3, "eval.batch_size": 5, "eval.num_clips": 2,
                            "train.seed": 11, "data.dedup": False, "data.dali_trim": False,
                            "data.decode_group": 2, "data.frame_fit": "pad",
                            "data.backend": "pyav", "data.num_workers": 0})
    data = training.load_data(cfg)
    (examples, manifest, sampling), kw = training.make_loader(cfg, data, "train", 1, 2, epoch=4)
    assert examples is data.examples["train"] and manifest is data.manifest
    assert sampling == cfg.sampling and kw["split"] == "train" and kw["batch_size"] == 3
    label = kw["label_fn"](data.examples["train"][0])
    assert label == data.labels["train"][0] and label >= 0
    expected = dict(image_size=cfg.data.image_size, num_workers=0, seed=11, rank=1, world_size=2,
                    backend="pyav", dedup=False, epoch=4, decode_group=2, trim=False,
                    defer_stop_signals=True, frame_fit="pad")
    assert {k: kw[k] for k in expected} == expected
    (examples, _, sampling), kw = training.make_loader(cfg, data, "val", 0, 1)
    assert examples is data.examples["val"] and kw["split"] == "val" and kw["batch_size"] == 5
    assert sampling.eval_clips == 2 and sampling.num_clips == cfg.sampling.num_clips
    assert cfg.sampling.eval_clips == 1  # the config's own is left as it was
    mc = _config(synth, **{"task": "mc", "data.dataset": "how2qa",
                           "data.train": synth / "annotations" / "how2qa_train.jsonl",
                           "data.val": ""})
    assert training.make_loader(mc, training.load_data(mc), "train", 0, 1)[1]["label_fn"] is None

    def logging_factory(*args, **kwargs):
        logging.getLogger("siasam_fast.pipeline.dataset").warning("train: kept 3 of 4")
        return "loader"

    monkeypatch.setattr(training, "build_video_loader", logging_factory)
    with caplog.at_level(logging.WARNING):
        assert training.make_loader(cfg, data, "train", 0, 1, task_name="qa") == "loader"
        training.make_loader(cfg, data, "train", 0, 1)
    assert [r.getMessage() for r in caplog.records] == ["data.tasks.qa: train: kept 3 of 4",
                                                        "train: kept 3 of 4"]


def test_a_split_without_questions_is_refused(synth, tmp_path):
    from siasam_fast.training import load_data

    (tmp_path / "val_qa.json").write_text("[]")
    with pytest.raises(ValueError, match=r"data.val \(.*val_qa.json\) holds no questions"):
        load_data(_config(synth, **{"data.val": tmp_path / "val_qa.json"}))


def test_a_video_damaged_after_indexing_gets_stand_ins_and_training_goes_on(synth, tmp_path):
    """Before, the PyAV loader's DecodeError ended the run at the first batch holding it."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    manifest = json.loads((data / "manifest.jsonl").read_text().splitlines()[0])
    victim = data / "videos" / manifest["relpath"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    out = tmp_path / "run"
    args = base_args(data, out, "--set", "train.epochs=1", "--set",
                     f"data.video_dir={data / 'videos'}")
    proc = train(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stand_in_examples"] >= 1
    assert f"video {victim} failed" in proc.stderr
    assert "got a stand-in because their video failed" in proc.stdout


def test_more_epochs_on_resume_says_how_the_schedule_changes(synth, tmp_path):
    from siasam_fast.training import warmup_linear_decay

    out = tmp_path / "run"
    train(base_args(synth, out, "--set", "train.max_steps=2"))
    proc = train(base_args(synth, out, "--set", "train.epochs=3", "--set", "train.max_steps=3",
                           "--resume", "auto"))
    # 17 steps an epoch: the end moves by one epoch's steps, from 2 x 17 to 3 x 17
    assert re.search(r"note: train.epochs changed from 2 to 3: the learning rate now decays to "
                     r"zero at step 51 \(was 34\), the run's end; the rate of step 3 is \S+ "
                     r"\(was \S+\)",
                     proc.stdout), proc.stdout[-2000:]
    with (out / "metrics_steps.csv").open() as fh:  # step 3 trains at the new schedule's rate
        rate = float(list(csv.DictReader(fh))[2]["lr"])
    assert rate == pytest.approx(0.001 * warmup_linear_decay(51, 0.1)(2))


def test_a_resume_already_at_max_steps_trains_no_further(synth, tmp_path):
    out = tmp_path / "run"
    proc = train(base_args(synth, out, "--set", "train.max_steps=3"))
    # DeepSpeed's CPU all-reduce op loads quietly (it printed "DeepSpeed ... built successfully")
    assert "built successfully" not in proc.stdout + proc.stderr, proc.stdout[:500]
    proc = train(base_args(synth, out, "--set", "train.max_steps=3", "--resume", "auto"))
    assert "done: 3 steps" in proc.stdout, proc.stdout[-1500:]
    assert "built successfully" not in proc.stdout + proc.stderr, proc.stdout[:500]
    assert len(losses(out)) == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step3"]


def test_each_rank_draws_its_own_random_numbers_from_the_seed():
    """seed_everything(seed, rank): the same draws for the same seed and rank (python, numpy and
    torch), other draws on another rank (its own augmentation, dropout)."""
    import random

    import numpy as np
    import torch

    from siasam_fast.training import seed_everything

    def draws(seed, rank):
        seed_everything(seed, rank)
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        first = draws(5, 0)
        assert draws(5, 0) == first
        assert all(a != b for a, b in zip(draws(5, 1), first))
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def test_only_deepspeeds_build_note_is_dropped(capsys):
    import contextlib

    from siasam_fast.training import DropBuildNote

    note = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
    with contextlib.redirect_stdout(DropBuildNote(sys.stdout)):
        print(note)
        print("[WARNING] ShareMemCommBuilder requires the 'g++' command")
        print(note, "and more")
        print(note, end="", flush=True)
        print()
        print(note)
    assert capsys.readouterr().out == (
        "[WARNING] ShareMemCommBuilder requires the 'g++' command\n"
        f"{note} and more\n{note}\n")


def test_moved_videos_are_named_before_training(synth, tmp_path):
    import shutil

    from siasam_fast.training import load_data

    moved = tmp_path / "elsewhere"
    shutil.copytree(synth, moved)
    cfg = _config(moved)  # its manifest still names the original folder: fine while it exists
    cfg.data.manifest = str(moved / "manifest.jsonl")
    cfg.data.video_dir = str(tmp_path / "nowhere")
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(ValueError, match=r"none of the first 16 videos is where data.video_dir "
                                         r"puts it .* set data.video_dir to their folder"):
        load_data(cfg)
    cfg.data.video_dir = str(moved / "videos")
    assert load_data(cfg).examples["train"]


def test_gradient_accumulation_steps_resume_and_schedule(synth, tmp_path):
    """train.grad_accum=3 with 4 videos a micro-batch: an epoch's 17 micro-batches (66 examples)
    make 6 optimizer steps, the last of 2 micro-batches (4 + 2 videos); the lr schedule,
    max_steps and the steps CSV count optimizer steps, and a resume mid-epoch continues the run
    exactly. A grad_accum above an epoch's micro-batches says each step is one epoch."""
    full, part = tmp_path / "full", tmp_path / "part"
    accum = ("--set", "train.grad_accum=3")
    proc = train(base_args(synth, full, *accum))
    assert "6 steps/epoch x 2 epochs (each step 3 micro-batches of 4 per process)" in proc.stdout
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 12 and len(losses(full)) == 12
    with (full / "metrics_steps.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1] * 6 + [2] * 6
    rates = [float(r["lr"]) for r in rows]  # warm-up of 10% of 12 steps: 1 step, then decay
    assert rates[:2] == [pytest.approx(0.001), pytest.approx(0.001)]
    assert rates[-1] == pytest.approx(0.001 / 11) and rates == sorted(rates, reverse=True)
    train(base_args(synth, part, *accum, "--set", "train.max_steps=4"))
    assert len(losses(part)) == 4
    proc = train(base_args(synth, part, *accum, "--resume", "auto"))
    assert losses(part) == losses(full)  # bit for bit (fp32 on CPU)
    # Another accumulation is another run (the schedule's steps would change): refused
    proc = subprocess.run([sys.executable, "train.py", *base_args(synth, part, "--resume", "auto")],
                          cwd=ROOT, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2
    assert "train.grad_accum: checkpoint has 3, this run has 1" in proc.stderr
    # (train.max_steps stops it at the epoch's end: the epoch is evaluated all the same)
    proc = train(base_args(synth, tmp_path / "huge", "--set", "train.grad_accum=100",
                           "--set", "train.epochs=1", "--set", "train.max_steps=1"))
    assert ("note: train.grad_accum=100 is more than an epoch's 17 micro-batches: each step takes "
            "one epoch (66 videos per process)") in proc.stdout
    assert len(losses(tmp_path / "huge")) == 1
    summary = json.loads((tmp_path / "huge" / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["val"]["num_examples"] > 0


# -- checkpoint helpers, called directly on hand-made checkpoint folders (no training) -------


def test_a_resume_on_fewer_gpus_than_saved_restores_the_rng_of_the_gpus_it_has(monkeypatch):
    """Each process of a run on 2 GPUs (torchrun: every process sees both) saves both GPUs' RNG
    states; a resume on a machine with 1 GPU gave torch the state of a second GPU, which it
    sets in torch.cuda.default_generators[1]: IndexError, no resume. (torch.cuda stands in for
    a GPU here, as torch does it: one state per device it has.)"""
    import torch

    from siasam_fast.training import _rng_state, _set_rng_state

    state = json.loads(json.dumps(_rng_state()))
    state["cuda"] = [[1] * 16, [2] * 16]
    restored = []

    def set_rng_state_all(states):
        for i, each in enumerate(states):
            if i >= torch.cuda.device_count():
                raise IndexError("tuple index out of range")  # default_generators[i]
            restored.append(each.tolist())

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    _set_rng_state(state)
    assert restored == [[1] * 16]


@pytest.mark.parametrize("local", [1, 3])  # 1: the first LOCAL_RANK past its one GPU
def test_a_process_that_sees_fewer_gpus_than_its_local_rank_is_told_how_to_launch(monkeypatch,
                                                                                  local):
    """A scheduler binding one GPU per task (Slurm's --gpus-per-task) shows process 3 only its own
    GPU, as cuda:0; DeepSpeed then bound NCCL to cuda:3 and stopped with "device_id cuda:3 is out
    of range". The start says why, before DeepSpeed is asked. (torch.cuda stands in for 1 GPU.)"""
    import deepspeed
    import torch

    from siasam_fast.training import init_distributed

    def not_reached(*args, **kwargs):
        raise AssertionError("deepspeed.init_distributed was called")

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setenv("MASTER_ADDR", "node1")  # a launcher sets all five
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(local))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(deepspeed, "init_distributed", not_reached)
    with pytest.raises(ValueError, match=rf"^LOCAL_RANK={local}, but this process sees 1 "
                       rf"GPU\(s\) \(CUDA_VISIBLE_DEVICES={local}\): .*one torchrun per node"):
        init_distributed()


def test_a_resume_restores_the_cuda_rng_of_the_gpu_each_process_draws_from(monkeypatch):
    """Rank 3 of a torchrun job (all 4 GPUs visible, its own is cuda:3) saves its GPU's RNG
    state; resumed where each process sees only its own GPU (cuda:0 to it), that state goes to
    cuda:0. Saving every visible GPU's state and restoring by index gave the resumed process
    GPU 0's state, a generator rank 3 had never drawn from. (torch.cuda stands in for 4 GPUs,
    then 1.)"""
    import torch

    from siasam_fast.training import _rng_state, _set_rng_state

    gens = {i: [i] * 16 for i in range(4)}  # each GPU's generator state
    current = {"device": 3}

    def index(device):  # torch.cuda's: "cuda" is the current device, else the one named
        if device == "cuda":
            return current["device"]
        return device if isinstance(device, int) else torch.device(device).index

    def get_rng_state(device="cuda"):
        return torch.tensor(gens[index(device)], dtype=torch.uint8)

    def set_rng_state(new, device="cuda"):
        gens[index(device)] = new.tolist()

    def set_rng_state_all(states):
        for i, each in enumerate(states):
            gens[i] = each.tolist()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gens))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: [torch.tensor(g, dtype=torch.uint8) for g in gens.values()])
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    saved = json.loads(json.dumps(_rng_state()))
    gens.clear()
    gens[0] = [99] * 16  # the resuming process's one GPU
    current["device"] = 0
    _set_rng_state(saved)
    assert gens == {0: [3] * 16}


def test_a_checkpoints_rng_state_restores_every_generator():
    """rng_rank*.json (through JSON) gives back Python's, NumPy's and torch's streams, their
    cached Gaussians too."""
    import numpy as np
    import torch

    from siasam_fast.training import _rng_state, _set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # each keeps a second Gaussian for its next draw

    def draws():
        return (random.gauss(0, 1), random.random(), float(np.random.randn()),
                float(np.random.rand()), torch.rand(2).tolist())

    saved = json.loads(json.dumps(_rng_state()))
    first = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _set_rng_state(saved)
    assert draws() == first


class FakeEngine:
    """What save_checkpoint asks of a DeepSpeed engine."""

    def __init__(self, stage=0):
        import torch

        self.stage = stage
        self.module = torch.nn.Linear(2, 3)

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        assert save_latest is False  # 'latest' is ours: written once every file is
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_text("weights")

    def zero_optimization_stage(self):
        return self.stage


def test_save_checkpoint_writes_each_processs_files_then_latest_and_prunes(tmp_path):
    import torch

    from siasam_fast.training import save_checkpoint

    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        # rank 1 first: its RNG and loader state, no run state, 'latest' not moved
        save_checkpoint(FakeEngine(), tmp_path, f"step{step}", {}, 2, 1, {"position": step})
        assert step == 2 or (ckpt / "latest").read_text() == f"step{step - 2}"
        assert not (ckpt / f"step{step}" / "run_state.json").exists()
        tag = save_checkpoint(FakeEngine(), tmp_path, f"step{step}", {"step": step}, 1, 0,
                              {"position": step + 100}, protect="step2")
        assert tag == ckpt / f"step{step}"
        assert (ckpt / "latest").read_text() == f"step{step}"
        assert sorted(p.name for p in tag.iterdir()) == [
            "loader_rank0.json", "loader_rank1.json", "mp_rank_00_model_states.pt",
            "rng_rank0.json", "rng_rank1.json", "run_state.json"]
        assert json.loads((tag / "loader_rank1.json").read_text()) == {"position": step}
        assert json.loads((tag / "run_state.json").read_text()) == {"step": step}
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step2", "step4"]  # protected
    save_checkpoint(FakeEngine(), tmp_path, "step6", {"step": 6}, 1, 0)  # no loader state
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step6"]
    assert not list((ckpt / "step6").glob("loader_rank*"))
    assert not (ckpt / "step6" / "model_weights.pt").exists()  # stages 0-2: DeepSpeed's file
    for stage in (2, 3):  # ZeRO-3 partitions the weights: they are gathered into one file too
        engine = FakeEngine(stage)
        tag = save_checkpoint(engine, tmp_path, f"step{10 + stage}", {"step": 10 + stage}, 3, 0)
        assert (tag / "model_weights.pt").is_file() == (stage == 3)
    weights = torch.load(tag / "model_weights.pt", weights_only=True)
    assert weights.keys() == {"weight", "bias"} and torch.equal(weights["bias"],
                                                                 engine.module.bias)


def test_save_checkpoint_syncs_every_file_before_the_tag_is_marked_complete(tmp_path,
                                                                            monkeypatch):
    """A power loss after a save: run_state.json (what makes a tag complete) and `latest` must not
    reach the disk before the files they vouch for, which stay in the page cache otherwise."""
    import siasam_fast.paths as paths
    from siasam_fast.training import RESAVE, save_checkpoint

    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(paths.os, "fsync", fsync)
    save_checkpoint(FakeEngine(3), tmp_path, "step2", {"step": 2}, 1, 0, {"position": 1})
    save_checkpoint(FakeEngine(), tmp_path, "step2", {"step": 2}, 1, 0)  # saved again: swapped
    tag, ckpt = str(tmp_path / "checkpoints" / "step2"), str(tmp_path / "checkpoints")
    first = synced[:synced.index(ckpt) + 1]
    files = ["mp_rank_00_model_states.pt", "model_weights.pt", "rng_rank0.json",
             "loader_rank0.json"]
    marked = next(i for i, p in enumerate(first) if Path(p).name.startswith(".run_state.json"))
    assert {f"{tag}/{name}" for name in files} <= set(first[:marked])  # the files, then the mark
    assert first.index(tag) < marked and first[-1] == ckpt  # ... and `latest` with the renames
    again = synced[len(first):]
    assert f"{ckpt}/.step2{RESAVE}/mp_rank_00_model_states.pt" in again and again[-1] == ckpt


def test_syncing_a_checkpoint_skips_another_processs_file_gone_meanwhile(tmp_path):
    """Each process syncs the whole tag folder while the others still write into it: a rank's
    temporary file renamed meanwhile failed the save ("No such file or directory:
    .../.loader_rank1.json.7847.tmp"), seen in a 2-process CPU run of the suite."""
    from siasam_fast.paths import fsync_tree

    (tmp_path / "tag").mkdir()
    (tmp_path / "tag" / "model.pt").write_bytes(b"w")
    (tmp_path / "tag" / ".loader_rank1.json.7847.tmp").symlink_to(tmp_path / "renamed")
    fsync_tree(tmp_path / "tag")  # (a link to nothing: a file that went between list and open)


def test_a_tag_saved_again_is_swapped_in_whole(tmp_path):
    """The epoch's last step is saved twice (save_every, then the epoch's end). Saved in place,
    the second save rewrote the model file while `latest` named the tag: a kill then left a
    complete-looking tag with a cut file (with keep_checkpoints=1 the only checkpoint)."""
    from siasam_fast.training import resolve_checkpoint, save_checkpoint

    ckpt = tmp_path / "checkpoints"
    save_checkpoint(FakeEngine(), tmp_path, "step26", {"step": 26, "v": 1}, 1, 0)

    class Killed(FakeEngine):
        def save_checkpoint(self, save_dir, tag, save_latest=True):
            (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
            (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_text("wei")  # cut
            raise KeyboardInterrupt  # the process dies here

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(Killed(), tmp_path, "step26", {"step": 26, "v": 2}, 1, 0)
    assert (ckpt / "step26" / "mp_rank_00_model_states.pt").read_text() == "weights"
    assert resolve_checkpoint(tmp_path) == ckpt / "step26"
    assert json.loads((ckpt / "step26" / "run_state.json").read_text())["v"] == 1
    # the next save of it replaces the first whole, and leaves no hidden folder
    tag = save_checkpoint(FakeEngine(), tmp_path, "step26", {"step": 26, "v": 3}, 1, 0)
    assert tag == ckpt / "step26" and json.loads((tag / "run_state.json").read_text())["v"] == 3
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step26"]
    # killed between the two renames: the newest complete tag is the new save, under its
    # hidden name, and a later save prunes both
    (ckpt / "step26").rename(ckpt / ".step26.replaced")
    _tag(ckpt, ".step26.resave", state={"step": 26, "v": 4})
    assert json.loads((resolve_checkpoint(tmp_path) / "run_state.json").read_text())["v"] == 4
    save_checkpoint(FakeEngine(), tmp_path, "step27", {"step": 27}, 1, 0)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step27"]
    # such copies never count among the tags kept: keep 3 keeps step27 and step28 here
    _tag(ckpt, ".step27.replaced", step=27)
    _tag(ckpt, ".step27.resave", step=27)
    save_checkpoint(FakeEngine(), tmp_path, "step28", {"step": 28}, 3, 0)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step27", "step28"]


def test_a_failed_checkpoint_write_is_recognised():
    """torch.save to a path reports a full disk as a RuntimeError, not an OSError."""
    import torch

    from siasam_fast.training import WRITE_FAILED

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full (a device whose writes fail with ENOSPC) here")
    with pytest.raises(RuntimeError) as err:
        torch.save({"w": torch.zeros(1000)}, "/dev/full")
    assert WRITE_FAILED.search(str(err.value)), str(err.value)
    assert not WRITE_FAILED.search("CUDA error: an illegal memory access was encountered")


def test_a_checkpoint_pruned_while_being_read_is_named(tmp_path):
    """`eval --checkpoint RUN` while that run trains with keep_checkpoints=1: the tag it picked
    was pruned before the weights were read, and the error was a bare FileNotFoundError."""
    from siasam_fast.training import load_model_weights

    with pytest.raises(ValueError, match=r"step5 was removed while this command ran .* "
                                         r"train.keep_checkpoints"):
        load_model_weights(tmp_path / "checkpoints" / "step5")
    (tmp_path / "step6").mkdir()  # there, without its model file: not a removal
    with pytest.raises(FileNotFoundError):
        load_model_weights(tmp_path / "step6")


def _tag(ckpt: Path, name: str, step=None, state=None) -> Path:
    (ckpt / name).mkdir(parents=True)
    if step is not None or state is not None:
        (ckpt / name / "run_state.json").write_text(json.dumps(
            state if state is not None else {"step": step}))
    return ckpt / name


def test_pruning_keeps_the_newest_the_saved_and_protected_tags_only(tmp_path):
    """keep=2 keeps two; the tag just saved stays even if older (a resume from an older tag);
    saves cut short and universal checkpoints a stop left behind go; other folders stay."""
    from siasam_fast.training import prune_checkpoints

    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6, 10):
        _tag(ckpt, f"step{step}", step)
    _tag(ckpt, "step12")  # a save cut short
    (ckpt / ".step4.universal" / "universal").mkdir(parents=True)  # a conversion a stop left
    _tag(ckpt, "mine")  # not a tag of this package: not touched
    prune_checkpoints(ckpt, 2, "step10")
    assert sorted(p.name for p in ckpt.iterdir()) == ["mine", "step10", "step6"]
    prune_checkpoints(ckpt, 1, "step6")  # resumed from step6 and saved it again
    assert sorted(p.name for p in ckpt.iterdir()) == ["mine", "step10", "step6"]


def test_resolve_checkpoint_takes_a_tag_a_checkpoints_or_a_run_folder(tmp_path, capsys):
    from siasam_fast.training import complete_tags, resolve_checkpoint

    ckpt = tmp_path / "run" / "checkpoints"
    tags = [_tag(ckpt, f"step{s}", s) for s in (9, 10)]
    _tag(ckpt, "step3", state=[3])  # not a run state (a list)
    _tag(ckpt, "step4", state={"step": "four"})
    assert complete_tags(ckpt) == tags  # steps as numbers: 10 after 9
    (ckpt / "latest").write_text("step9\n")
    for where in (tmp_path / "run", ckpt, str(ckpt)):
        assert resolve_checkpoint(where) == tags[0]
    assert resolve_checkpoint(ckpt / "step10") == tags[1]  # a tag folder
    (ckpt / "latest").write_text("step11")  # deleted, or cut short
    assert resolve_checkpoint(tmp_path / "run") == tags[1]
    assert "step11, which is incomplete" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*expected a tag directory"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(ckpt / "step3" / "nothing")
    lone = tmp_path / "lone" / "checkpoints"  # no complete tag: 'latest' as named, for
    _tag(lone, "step1")                       # read_run_state to say what is wrong
    (lone / "latest").write_text("step1")
    assert resolve_checkpoint(lone.parent) == lone / "step1"


def test_a_damaged_run_state_is_named_with_what_is_wrong(tmp_path):
    from siasam_fast.training import read_run_state

    with pytest.raises(ValueError, match="has no run_state.json"):
        read_run_state(tmp_path)
    path = tmp_path / "run_state.json"
    path.write_text('{"step": 1')
    with pytest.raises(ValueError, match=r"run_state.json is damaged \(not valid JSON"):
        read_run_state(tmp_path)
    for text in ("[1, 2]", "5"):
        path.write_text(text)
        with pytest.raises(ValueError, match="lacks step, epoch, sampler, config, vocab"):
            read_run_state(tmp_path)
    path.write_text(json.dumps({"step": 1, "epoch": 0, "sampler": {}, "config": {}}))
    with pytest.raises(ValueError, match="damaged: it lacks vocab$"):
        read_run_state(tmp_path)


def test_grad_accum_may_change_on_a_resume_only_with_the_number_of_processes(tmp_path):
    from siasam_fast.config import Config
    from siasam_fast.training import load_run_state

    saved = Config()
    tag = _tag(tmp_path, "step4", state={"step": 4, "epoch": 0, "sampler": {}, "vocab": "",
                                         "config": saved.to_dict(), "world_size": 2})
    cfg = Config()
    cfg.train.grad_accum = 2
    assert load_run_state(tag, cfg, 1)["step"] == 4  # 2 processes -> 1: keeps the batch
    for world in (2, None):
        with pytest.raises(ValueError, match=r"train.grad_accum: checkpoint has 1, this run has "
                           r"2 \(it may change only with the number of processes\)"):
            load_run_state(tag, cfg, world)
    cfg.train.lr = saved.train.lr * 2
    with pytest.raises(ValueError, match=r"incompatible config:\n  train.lr: checkpoint has"):
        load_run_state(tag, cfg, 1)


def test_processes_and_zero_stage_of_a_checkpoint_from_its_state_or_its_files(tmp_path):
    """run_state.json says (since 2026-11-27); before, the files DeepSpeed wrote do."""
    from siasam_fast.training import checkpoint_world_size, zero_partitions, zero_stage_of

    tag = _tag(tmp_path, "step1")
    assert (checkpoint_world_size(tag, {}), zero_partitions(tag), zero_stage_of(tag, {})) == \
        (1, 0, 0)
    for name in ("rng_rank0.json", "rng_rank1.json", "mp_rank_00_model_states.pt",
                 "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"):  # bf16's own prefix
        (tag / name).write_text("")
    assert (checkpoint_world_size(tag, {}), zero_partitions(tag), zero_stage_of(tag, {})) == \
        (2, 2, None)  # stage 1 or 2
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_text("")
    assert zero_stage_of(tag, {}) == 3
    assert checkpoint_world_size(tag, {"world_size": 4}) == 4
    assert zero_stage_of(tag, {"zero_stage": 1}) == 1


@pytest.mark.parametrize("saved, stage, ok", [
    (0, 0, True), (1, 2, True), (2, 1, True), (None, 1, True), (None, 2, True), (3, 3, True),
    (0, 1, False), (1, 0, False), (2, 3, False), (3, 2, False), (None, 0, False),
    (None, 3, False)])
def test_a_resume_across_zero_stages_only_between_1_and_2(tmp_path, saved, stage, ok):
    from siasam_fast.training import check_zero_stage

    state = {} if saved is None else {"zero_stage": saved}
    if saved is None:  # an older checkpoint of stage 1 or 2: its optimizer partitions tell
        (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("")
    if ok:
        check_zero_stage(tmp_path, state, stage)
        return
    was = "ZeRO stage 1 or 2" if saved is None else f"ZeRO stage {saved}"
    with pytest.raises(ValueError, match=rf"saved with {was}, this run's DeepSpeed config has "
                       rf"stage {stage}: .*train.init_from"):
        check_zero_stage(tmp_path, state, stage)


def test_a_universal_conversion_that_fails_or_stops_leaves_nothing(tmp_path, monkeypatch):
    from siasam_fast import training

    tag = _tag(tmp_path / "old" / "checkpoints", "step6", 6)
    for r in range(3):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_text("")
    ckpt = tmp_path / "run" / "checkpoints"
    load_dir = ckpt / ".step6.universal"
    (load_dir / "universal").mkdir(parents=True)
    (load_dir / "universal" / "half").write_text("")  # a conversion cut short before
    calls = []

    def converted(cmd):
        calls.append(cmd)
        assert not (load_dir / "universal" / "half").exists()
        out = Path(cmd[cmd.index("--output_folder") + 1])
        out.mkdir()
        (out / "done").write_text("")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(training, "run_to_end", converted)
    assert training.universal_checkpoint(tag, ckpt, 0, 2) == load_dir
    assert (load_dir / "universal" / "done").is_file()
    cmd = calls[0]
    assert cmd[cmd.index("--input_folder") + 1] == str(tag)
    assert "--inject_missing_state" in cmd
    training.remove_universal(load_dir, 1, 1)  # only process 0 removes it
    assert load_dir.is_dir()
    training.remove_universal(load_dir, 0, 1)
    assert not load_dir.exists()

    def failed(cmd):
        Path(cmd[cmd.index("--output_folder") + 1]).mkdir()
        return subprocess.CompletedProcess(cmd, 2, "working\nKeyError: 'param_shapes'\n", "")

    for fake, message in (
            (failed, r"ds_to_universal failed \(exit status 2\) converting .*step6: "
                     r"KeyError: 'param_shapes'\n"),
            (lambda cmd: subprocess.CompletedProcess(cmd, 1, "", ""), r"status 1\).*\(no output\)"),
            (lambda cmd: (_ for _ in ()).throw(OSError("no python")),
             "could not run DeepSpeed's ds_to_universal: no python")):
        monkeypatch.setattr(training, "run_to_end", fake)
        with pytest.raises(ValueError, match=message) as err:
            training.universal_checkpoint(tag, ckpt, 0, 2)
        assert "Resume on the 3 process(es) that saved it" in str(err.value)
        assert not load_dir.exists()

    def stopped(cmd):
        Path(cmd[cmd.index("--output_folder") + 1]).mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "run_to_end", stopped)
    with pytest.raises(KeyboardInterrupt):
        training.universal_checkpoint(tag, ckpt, 0, 2)
    assert not load_dir.exists()


def test_run_to_end_gives_output_and_errors_together_and_ends_the_command_on_sigterm(tmp_path):
    from siasam_fast.training import run_to_end

    before = signal.getsignal(signal.SIGTERM)
    proc = run_to_end([sys.executable, "-c",
                       "import sys; print('out', flush=True); sys.exit('fails here')"])
    assert (proc.returncode, proc.stdout) == (1, "out\nfails here\n")
    assert signal.getsignal(signal.SIGTERM) is before
    pid_file = tmp_path / "pid"
    child = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "time.sleep(60)")

    def stop_when_started():  # once the command runs and run_to_end's handler is in place
        deadline = time.monotonic() + 30
        while (signal.getsignal(signal.SIGTERM) is before
               or not (pid_file.is_file() and pid_file.read_text())) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_started, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        run_to_end([sys.executable, "-c", child])
    assert stop.value.code == 128 + signal.SIGTERM and time.monotonic() - start < 30
    with pytest.raises(ProcessLookupError):  # ended (and reaped)
        os.kill(int(pid_file.read_text()), 0)
    assert signal.getsignal(signal.SIGTERM) is before


def test_restore_buffers_copies_only_the_checkpoints_buffers(tmp_path):
    import torch

    from siasam_fast.training import restore_buffers

    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    trained(torch.randn(8, 3))  # running statistics and a batch count
    torch.save({"module": trained.state_dict()}, tmp_path / "mp_rank_00_model_states.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    weight = fresh[0].weight.detach().clone()
    restore_buffers(fresh, tmp_path)
    for name, buf in trained.named_buffers():
        assert torch.equal(dict(fresh.named_buffers())[name], buf), name
    assert torch.equal(fresh[0].weight, weight)  # parameters are the universal load's


def test_unshare_optimizer_steps_gives_each_parameter_its_own_step():
    import torch

    from siasam_fast.training import unshare_optimizer_steps

    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    opt = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(2)
    opt.step()
    shared = opt.state[params[0]]["step"]
    for p in params[1:]:
        opt.state[p]["step"] = shared  # as DeepSpeed's ZeRO-3 universal load leaves them
    wrapper = SimpleNamespace(optimizer=opt)  # DeepSpeed's ZeRO optimizer
    assert unshare_optimizer_steps(wrapper) == 2
    assert unshare_optimizer_steps(wrapper) == 0
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [2.0, 2.0, 2.0]


def test_the_resume_note_on_another_number_of_processes(tmp_path):
    from siasam_fast.config import Config
    from siasam_fast.training import resharding_note

    cfg = Config()
    cfg.train.batch_size = 4
    sampler = {"epoch": 0, "position": 5, "num_examples": 20, "world_size": 2,
               "drop_last": False}
    state = {"config": {"train": {"batch_size": 4, "grad_accum": 1}}, "sampler": sampler}
    note = resharding_note(tmp_path, state, 2, 1, cfg, 8)
    assert note == (f"note: checkpoint {tmp_path.name} was saved by 2 process(es), this run has "
                    "1: epoch 1 continues after its first 10 of 20 examples (2 of them given "
                    "again). The batch per step changes from 8 to 4 examples (train.batch_size x "
                    "processes x train.grad_accum): --set train.grad_accum=2 keeps it")
    cfg.train.grad_accum = 2
    note = resharding_note(tmp_path, state, 2, 1, cfg, 10)
    assert note.endswith("first 10 of 20 examples")  # the same batch, nothing given again
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("")
    state["config"]["train"]["grad_accum"] = 3  # 4 x 2 x 3 = 24, not a multiple of 4 x 5
    sampler["position"] = 10  # the whole shard: the epoch was complete
    note = resharding_note(tmp_path, state, 2, 5, cfg, 4)
    assert note == (f"note: checkpoint {tmp_path.name} was saved by 2 process(es), this run has "
                    "5: epoch 2 starts (epoch 1 was complete); ZeRO's optimizer state is "
                    "re-partitioned (DeepSpeed universal checkpoint). The batch per step changes "
                    "from 24 to 40 examples (train.batch_size x processes x train.grad_accum): no "
                    "train.grad_accum keeps it on 5 process(es) (train.batch_size cannot change "
                    "on a resume)")
    task = {"epoch": 0, "num_examples": 20, "world_size": 2, "drop_last": False, "position": 5}
    state["sampler"] = {"epoch": 0, "done": 3, "world_size": 2, "tasks": {
        "qa": task, "count": {**task, "num_examples": 15, "position": 8}}}  # count: complete
    note = resharding_note(tmp_path, state, 2, 4, cfg, {"qa": 2, "count": 4})
    assert ("epoch 1 continues, each task where it was (qa after its first 10 of 20 examples "
            "(2 given again); count after its first 15 of 15 examples), its batches") in note


def test_steps_per_epoch_of_a_checkpoint_from_before_it_was_saved():
    from siasam_fast.training import saved_steps_per_epoch

    # 21 examples on 2 processes: shards of 11, 3 batches of 4, 2 steps of 2 micro-batches
    state = {"sampler": {"num_examples": 21, "world_size": 2},
             "config": {"train": {"batch_size": 4, "grad_accum": 2}}}
    assert saved_steps_per_epoch(state) == 2
    state["sampler"]["drop_last"] = True  # shards of 10: still 3 batches
    state["config"]["train"]["batch_size"] = 5  # 2 batches, 1 step
    assert saved_steps_per_epoch(state) == 1
    assert saved_steps_per_epoch({**state, "steps_per_epoch": 7}) == 7


def test_a_previous_run_is_found_and_set_aside_whole(tmp_path):
    from siasam_fast.training import previous_run, set_aside_previous_run

    (tmp_path / "checkpoints" / ".step2.universal").mkdir(parents=True)  # a stop's leftover
    (tmp_path / "notes.txt").write_text("mine")
    assert previous_run(tmp_path) == []
    (tmp_path / "checkpoints" / "step2").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step2")
    run_files = ["metrics_steps.csv", "summary.json", "config.json", "ans2label.json"]
    for name in run_files:
        (tmp_path / name).write_text(name)
    (tmp_path / "tensorboard").mkdir()
    assert previous_run(tmp_path) == ["checkpoints step2", "metrics_steps.csv", "summary.json"]
    aside = set_aside_previous_run(tmp_path)
    assert aside.parent == tmp_path and aside.name.startswith("replaced-")
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        ["checkpoints", "tensorboard", *run_files])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", aside.name]
    assert previous_run(tmp_path) == []


def test_triton_kernels_on_cpu_are_refused_before_the_run_unless_interpreted(monkeypatch):
    import torch

    from siasam_fast.training import check_siamese_impl

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SIASAM_IMPL", "triton")
    for impl in ("triton", "auto"):
        with pytest.raises(ValueError, match=rf"siamese.impl={impl} \(SIASAM_IMPL='triton'\) "
                           "asks for the Triton kernels, which need a CUDA GPU"):
            check_siamese_impl(impl, torch.device("cpu"))
    check_siamese_impl("reference", torch.device("cpu"))
    check_siamese_impl("triton", torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_siamese_impl("triton", torch.device("cpu"))


def test_the_vocabulary_hash_is_the_one_checkpoints_hold_whatever_the_order():
    from siasam_fast.training import _vocab_hash

    assert _vocab_hash({"yes": 0, "no": 1}) == _vocab_hash({"no": 1, "yes": 0}) == \
        "2298a02ccb230039"  # what the run states saved so far hold
    assert _vocab_hash({"yes": 0, "no": 1}) != _vocab_hash({"yes": 1, "no": 0})


def test_the_train_split_is_scored_with_evaluation_clips_and_every_question(synth):
    """`siasam-fast eval --split train` scores train as val and test are scored: eval.num_clips
    clips at fixed places in a fixed order, and questions whose answer is outside the vocabulary
    kept (scored wrong); training's loader samples siamese clips at random and drops those
    questions (it has no label for them). Both were training's before."""
    from siasam_fast.config import load_config
    from siasam_fast.training import load_streams, make_loader

    args = base_args(synth, synth / "unused", "--set", "eval.num_clips=2",
                     "--set", "data.num_answers=2")
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(ROOT / "configs" / "synthetic.yaml", overrides)
    _, trained = load_streams(cfg, splits=("train",))
    _, scored = load_streams(cfg, need_train=False, splits=("train",), scoring=True)
    total = len(json.loads((synth / "annotations" / "train_qa.json").read_text()))
    assert len(trained[""].examples["train"]) < total  # a 2-answer vocabulary leaves some out
    assert len(scored[""].examples["train"]) == total
    loader = make_loader(cfg, scored[""], "train", 0, 1, scoring=True)
    assert not loader.dataset.training
    batch = next(iter(loader))
    assert batch["frame_ids"].shape[1] == 2  # eval.num_clips, not sampling.num_clips=3
    again = next(iter(make_loader(cfg, scored[""], "train", 0, 1, scoring=True)))
    assert batch["example_index"].tolist() == again["example_index"].tolist()
    assert torch.equal(batch["frame_ids"], again["frame_ids"])
    training_batch = next(iter(make_loader(cfg, trained[""], "train", 0, 1)))
    assert training_batch["frame_ids"].shape[1] == 3


KILLED_IN_EPOCH_EVAL = """
import os, sys
from siasam_fast import training
evaluate_tasks = training.evaluate_tasks

def killed(*args, desc="", **kwargs):  # the process dies outright in epoch 1's evaluation
    if desc.startswith("eval"):
        os._exit(137)
    return evaluate_tasks(*args, desc=desc, **kwargs)

training.evaluate_tasks = killed
sys.exit(training.main(sys.argv[1:]))
"""


def test_an_epoch_whose_evaluation_died_is_evaluated_by_the_resume(synth, tmp_path):
    """A checkpoint saved at an epoch's last step (train.save_every), then the process killed
    outright in that epoch's evaluation: --resume auto evaluates the epoch first (it went on to
    the next epoch, and metrics_epochs.csv, the best epoch and early stopping never had it)."""
    out = tmp_path / "run"
    args = base_args(synth, out, "--set", "train.save_every=17")  # an epoch is 17 steps
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_EPOCH_EVAL, *args], cwd=ROOT,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 137, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "checkpoints" / "step17").is_dir()
    proc = train([*args, "--resume", "auto"])
    assert "step17 ends epoch 1, whose evaluation has no row" in proc.stdout, proc.stdout[-3000:]
    assert [r["epoch"] for r in epoch_rows(out)] == ["1", "2"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["steps"] == 34
    # step 34 was saved twice (save_every, then the epoch's end): the second swapped in whole
    assert not list((out / "checkpoints").glob(".*"))
    state = json.loads((out / "checkpoints" / "step34" / "run_state.json").read_text())
    assert state["step"] == 34


def test_a_partial_launcher_environment_is_named_not_sent_to_mpi(monkeypatch):
    """RANK set (by hand, from a scheduler's variables) without the other four: DeepSpeed then
    looked for MPI and the run ended in a traceback about mpi4py; now one error names them."""
    from siasam_fast import training

    for name in training.LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(training.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(training.deepspeed, "init_distributed",
                        lambda **kw: pytest.fail("DeepSpeed was started"))
    with pytest.raises(ValueError, match=r"RANK=0 is set but LOCAL_RANK, MASTER_ADDR, "
                                         r"MASTER_PORT not: a launcher \(torchrun, deepspeed\)"):
        training.init_distributed()


def test_processes_that_do_not_meet_are_waited_for_aloud_then_named(monkeypatch, capsys):
    """WORLD_SIZE=2 with one process started: DeepSpeed waits (10 minutes by default) with no
    word, then raised DistStoreError under a traceback. A process still waiting after
    JOIN_NOTE_S says what it waits for, and the failure is one error naming the address."""
    import time as _time

    from siasam_fast import training

    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29999"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(training, "JOIN_NOTE_S", 0.05)
    monkeypatch.setattr(training.dist, "is_initialized", lambda: False)

    def waits_then_fails(**kw):
        _time.sleep(0.5)
        raise training.dist.DistStoreError("Timed out after 61 seconds waiting for clients. "
                                           "1/2 clients joined.")

    monkeypatch.setattr(training.deepspeed, "init_distributed", waits_then_fails)
    with pytest.raises(ValueError, match=r"could not meet at 127.0.0.1:29999, process 0 of "
                                         r"WORLD_SIZE=2: Timed out after 61 seconds"):
        training.init_distributed()
    assert "still starting after 0 s at 127.0.0.1:29999" in capsys.readouterr().err


INHERITED_PORT = """
import socket, sys
from siasam_fast.training import init_distributed
with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    import os
    os.environ["MASTER_PORT"] = str(port)
    rank, world, _ = init_distributed()
    print("started", rank, world, os.environ["MASTER_PORT"] != str(port))
"""


def test_a_lone_process_with_an_inherited_port_in_use_takes_a_free_one():
    """`python train.py` in a shell that still exports an earlier MASTER_PORT, now in use: the
    one-process run failed with EADDRINUSE under a traceback; it now takes a free port."""
    proc = subprocess.run([sys.executable, "-c", INHERITED_PORT], cwd=ROOT,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "started 0 1 True" in proc.stdout
    assert "(from the environment) is in use or not a port" in proc.stderr


DISK_FULL_ON_SECOND_SAVE = """
import sys
from siasam_fast import training
save_checkpoint, saves = training.save_checkpoint, []

def full(engine, out_dir, tag, *args, **kwargs):  # the disk fills up during the second save
    saves.append(tag)
    if len(saves) == 2:
        (out_dir / "checkpoints" / tag).mkdir(parents=True, exist_ok=True)
        raise OSError(28, "No space left on device")
    return save_checkpoint(engine, out_dir, tag, *args, **kwargs)

training.save_checkpoint = full
sys.exit(training.main(sys.argv[1:]))
"""


def test_a_failed_save_is_one_line_naming_the_checkpoint_left(synth, tmp_path):
    """A full disk during a save ended in a 25-line traceback that said neither which file nor
    that the previous checkpoint was intact."""
    out = tmp_path / "run"
    args = base_args(synth, out, "--set", "train.save_every=2", "--set", "train.max_steps=6")
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_ON_SECOND_SAVE, *args], cwd=ROOT,
                          env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (f"error: saving checkpoint step4 in {out / 'checkpoints'} failed: [Errno 28] No space "
            "left on device; the last complete one, step2, is intact (--resume auto continues "
            "from it once the cause is fixed)") in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    proc = train([*args, "--resume", "auto"])
    assert "resumed from" in proc.stdout and "step2" in proc.stdout
