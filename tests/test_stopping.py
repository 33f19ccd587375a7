"""siasam_fast.stopping: stop signals become a flag, repeats from launchers are one stop, and loader
workers leave the signals to their main process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from subprocess_env import ended

from siasam_fast import stopping
from siasam_fast.stopping import StopRequest


def test_a_signal_asks_for_a_stop_and_the_old_handlers_come_back(capsys):
    before = {name: signal.getsignal(getattr(signal, name)) for name in stopping.STOP_SIGNALS}
    with StopRequest() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(2) and stop.signal == "SIGUSR1"
        assert stop.exit_status == 128 + signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher passing the same stop on: no effect
        assert stop.signal == "SIGUSR1"
    assert {name: signal.getsignal(getattr(signal, name)) for name in stopping.STOP_SIGNALS} == \
        before
    assert "SIGUSR1: stopping after this step with a checkpoint" in capsys.readouterr().err


def test_only_the_announcing_process_prints_the_stop(capsys):
    """Every process of a run gets the scheduler's signal: 8 processes printed 8 lines."""
    with StopRequest(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(1)
    assert capsys.readouterr().err == ""


def test_ctrl_c_twice_stops_at_once_but_an_echo_does_not(monkeypatch):
    monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.2)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # within the window: the launcher's echo
        assert stop.signal == "SIGINT" and stop.exit_status == 130
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest


def test_several_processes_wait_for_the_agreed_step():
    """Without a group to ask (world > 1), only the agreed steps read the flag: the others say
    nothing, whatever the flag."""
    stop = StopRequest(world_size=2, check_every=10)
    stop.signal = "SIGTERM"
    assert not stop.should_stop(7)


def run_worker(grace_s: float, *lines: str) -> subprocess.CompletedProcess:
    """A Python process set up as a loader worker (``WORKER_GRACE_S`` = ``grace_s``) that then
    runs ``lines``."""
    code = "\n".join(["import os, signal, time", "from siasam_fast import stopping",
                      f"stopping.WORKER_GRACE_S = {grace_s}", "stopping.defer_stop_signals(0)",
                      *lines]) + "\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_loader_workers_leave_stop_signals_to_the_main_process():
    """A worker ignores SIGINT and SIGUSR1, outlives a SIGTERM by the grace period (its main
    process may still need the batch it is making), then exits with status 0 (PyTorch reports a
    worker killed by a signal as an error)."""
    start = time.monotonic()
    out = run_worker(1.0, "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, "
                          "signal.SIGTERM):", "    os.kill(os.getpid(), s)", "time.sleep(0.3)",
                     "print('still here', flush=True)", "time.sleep(30)", "print('not ended')")
    assert out.returncode == 0, out.stderr
    assert "still here" in out.stdout and "not ended" not in out.stdout
    assert time.monotonic() - start < 20


def test_several_processes_stop_together_on_any_ones_signal(monkeypatch):
    """The agreement (one all-reduce, MAX, over the given group) at the check steps and at an
    epoch's end: a peer's signal stops this process too (status 143, its name unknown here), this
    process's signal stops it, and no signal anywhere goes on. The peer is a stand-in."""
    import torch.distributed as dist

    peer, calls = {"flag": 0}, []

    def all_reduce(tensor, op, group):
        calls.append(group)
        reduce = {dist.ReduceOp.MAX: max, dist.ReduceOp.MIN: min}[op]
        tensor.fill_(reduce(int(tensor.item()), peer["flag"]))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    alone = StopRequest(world_size=2, group="gloo group", check_every=10)
    assert not alone.should_stop(10) and calls == ["gloo group"]  # nobody has a signal
    peer["flag"] = 1
    assert not alone.should_stop(7) and len(calls) == 1  # not a check step: nothing asked
    assert alone.should_stop(7, epoch_end=True) and len(calls) == 2  # an epoch's end is one
    assert alone.signal == "another process's stop signal" and alone.exit_status == 143
    peer["flag"] = 0
    signalled = StopRequest(world_size=2, group="gloo group", check_every=10)
    signalled.signal = "SIGUSR1"
    assert signalled.should_stop(20) and signalled.exit_status == 128 + signal.SIGUSR1


def test_a_worker_that_ends_after_a_sigterm_is_not_held_for_the_grace_period():
    """The delayed exit is a daemon timer: a worker shut down by its main process within the
    grace period ends at once, not when the timer fires."""
    start = time.monotonic()
    out = run_worker(20.0, "os.kill(os.getpid(), signal.SIGTERM)", "time.sleep(0.2)",
                     "print('ended', flush=True)")
    assert out.returncode == 0 and out.stdout == "ended\n", out.stderr
    assert time.monotonic() - start < 10


GRACEFUL_PARENT = r"""
import os, signal, sys, time
from siasam_fast import stopping
stopping.WORKER_GRACE_S, stopping.WATCH_EVERY_S = 0.5, 0.05
ready, told = os.pipe()
worker = os.fork()
if worker == 0:  # a loader worker, forked after the import (as the DataLoader's are)
    stopping.defer_stop_signals(0)
    os.write(told, b"r")
    while True:
        time.sleep(0.05)
os.read(ready, 1)

def gone(pid, wait_s):
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return True
        time.sleep(0.05)
    return False

with stopping.StopRequest():
    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler signals the whole group
    os.kill(worker, signal.SIGTERM)
    time.sleep(0.1)
    if sys.argv[1] == "orphan":  # the main process dies in its stop: the worker follows
        print(worker, flush=True)
        os._exit(0)
    print("stays during the stop:", not gone(worker, 1.5), flush=True)  # 3x the grace
print("leaves after it:", gone(worker, 2.0), flush=True)
"""


@pytest.mark.parametrize("how", ["stop", "orphan"])
def test_a_worker_outlives_the_grace_period_while_its_main_process_saves(how):
    """A worker left WORKER_GRACE_S (30 s) after a SIGTERM whatever its main process still did:
    a step and a save longer than that (a scheduler's 120 s grace) then failed with "DataLoader
    worker exited unexpectedly" and no checkpoint. It now stays while its main process is in a
    graceful stop, and leaves once the stop is over or its main process is gone."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", GRACEFUL_PARENT, how], capture_output=True,
                         text=True, timeout=60, cwd=root)
    assert out.returncode == 0, out.stderr
    if how == "stop":
        assert out.stdout.splitlines() == ["stays during the stop: True", "leaves after it: True"]
        return
    worker = int(out.stdout.split()[0])
    if not ended(worker, 5):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its main process")


def test_a_later_sigterm_ends_a_worker_at_once():
    """The exit handler of a main process that failed SIGTERMs its workers and waits for them:
    a second SIGTERM, later than a launcher's echo, ends a worker without its grace period."""
    start = time.monotonic()
    out = run_worker(20.0, "stopping.IN_GRACEFUL_STOP.value = 1",
                     "os.kill(os.getpid(), signal.SIGTERM)", "time.sleep(stopping.REPEAT_WINDOW_S"
                     " + 0.2)", "print('first', flush=True)", "os.kill(os.getpid(), "
                     "signal.SIGTERM)", "time.sleep(10)", "print('not ended')")
    assert out.returncode == 0 and out.stdout == "first\n", out.stderr
    assert time.monotonic() - start < 8


START_CHILD = r"""
import os, signal, sys, time
from pathlib import Path
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT="29599")
import siasam_fast.training as training

lock = Path(sys.argv[1]) / "lock"

def build(**kwargs):  # torch's JIT build: a lock file, removed in its finally
    lock.write_text("")
    try:
        if sys.argv[3] == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        raise AssertionError("the start-up went past the build")
    finally:
        lock.unlink()

training.deepspeed.init_distributed = build
sys.exit(training.main(["--config", "configs/synthetic.yaml", "--set",
                        f"data.manifest={sys.argv[2]}", "--set",
                        f"train.out_dir={Path(sys.argv[1]) / 'run'}"]))
"""


def start(tmp_path, manifest, what):
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", START_CHILD, str(tmp_path), str(manifest), what],
                          capture_output=True, text=True, timeout=120, cwd=root)


def test_a_sigterm_during_the_start_ups_build_releases_its_lock(tmp_path):
    """A SIGTERM while DeepSpeed builds its CPU comm op (or FusedAdam) killed the run outright:
    no message, and torch's build lock stayed, so every later run on the machine waited on it
    (a newcomer walkthrough found it). Now the build ends through its own cleanup and the run
    says what happened."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    proc = start(tmp_path, manifest, "signal")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "stopped by SIGTERM during the start-up" in proc.stderr, proc.stderr
    assert not (tmp_path / "lock").exists() and not (tmp_path / "run").exists()


def test_a_missing_manifest_is_said_before_the_start_ups_slow_part(tmp_path):
    """The manifest is checked before DeepSpeed's start-up (its CPU comm op build took about 30 s
    before the error, for a newcomer without data); the error names the synth command that makes
    it."""
    proc = start(tmp_path, tmp_path / "syn" / "manifest.jsonl", "none")
    assert proc.returncode == 2, proc.stderr
    assert f"`siasam-fast synth --out {tmp_path / 'syn'}`" in proc.stderr, proc.stderr
    assert not (tmp_path / "lock").exists()  # the build never began


def test_resume_if_any_starts_again_over_a_first_save_cut_short(tmp_path, monkeypatch):
    """A stop that ends during the run's first save (a scheduler's SIGKILL after its grace
    period, a second Ctrl-C) leaves checkpoints/stepN without run_state.json and no `latest`:
    nothing to resume. A requeued job's --resume if-any starts the run again (the earlier try set
    aside, as for one that never saved); it was refused as "another run" and told to use
    --resume auto, which finds no checkpoint, so the requeued job failed every time."""
    import argparse

    import torch

    from siasam_fast import training
    from siasam_fast.config import Config

    out = tmp_path / "run"
    (out / "checkpoints" / "step17").mkdir(parents=True)
    (out / "checkpoints" / "step17" / "mp_rank_00_model_states.pt").write_bytes(b"cut")
    (out / "metrics_steps.csv").write_text("step,loss\n1,5.0\n")

    class Started(Exception):
        pass

    def started(*args):  # the first thing after the start's refusals
        raise Started

    monkeypatch.setattr(training, "check_siamese_impl", started)
    with pytest.raises(Started):
        training.run_training(argparse.Namespace(resume="if-any"), Config(), 0, 1,
                              torch.device("cpu"), out)


def test_resume_auto_over_a_first_save_cut_short_says_what_to_do(tmp_path):
    """--resume auto where the only save was cut short: the error names the tag and how to start
    again (it said only what a checkpoint folder holds, as for a typo in the path)."""
    from siasam_fast.training import start_view

    out = tmp_path / "run"
    (out / "checkpoints" / "step17").mkdir(parents=True)
    error = start_view("auto", out)["error"]
    assert "holds only a save cut short (step17, without run_state.json)" in error, error
    assert "start it again with --resume if-any (or --set train.overwrite=true)" in error, error
