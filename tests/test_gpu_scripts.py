"""The one-call GPU scripts (scripts/*.sh) on CPU: a mistake in them would only show on a GPU
loan, where it costs device time that cannot be had back. Syntax of every script, and the flow of
scripts/gpu_owed.sh (parts, shares, one tarball per part) through its checks and train parts with
the tiny config."""

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from subprocess_env import cpu_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))


def scratch(tmp_path: Path) -> dict:
    """The staged-wheel folders (/tmp/site, /tmp/stage on the GPU machine) and the scripts' temp
    folders under the test's own folder: wheels staged on this machine are never imported."""
    return {"SITE": str(tmp_path / "site"), "STAGE": str(tmp_path / "stage"),
            "TMPDIR": str(tmp_path)}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run")
def test_owed_script_runs_its_parts_and_packs_each(tmp_path):
    out, keep = tmp_path / "out", tmp_path / "keep"
    env = cpu_env(SKIP_STAGE="1", **scratch(tmp_path),
                  PY=sys.executable, BUDGET_S="900", PARTS="checks train",
                  OUT=str(out), KEEP=str(keep), CONFIG="configs/bench_tiny.yaml", STEPS="1",
                  WARMUP="1", VARIANTS="baseline-fp32", PROFILE="baseline-fp32",
                  NUM_VIDEOS="24", OMP_NUM_THREADS="2", drop=("TRITON_INTERPRET",))
    proc = subprocess.run(["bash", "scripts/gpu_owed.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checks.tgz", "owed.log", "train.tgz"]
    log = (out / "owed.log").read_text()
    assert "checks: ok" in log and "train: ok" in log, log
    with tarfile.open(out / "checks.tgz") as tar:
        assert {"checks/env.json", "checks/env.log", "checks/console.log"} <= set(tar.getnames())
        env_log = tar.extractfile("checks/env.log").read().decode()
    assert "siasam-fast env: exit status 0" in env_log, env_log
    with tarfile.open(out / "train.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("_bench_tiny.csv") for n in names), names
    assert any(n.endswith("console.log") for n in names), names

    env.update(PARTS="train", BUDGET_S="100")  # below the train part's 150 s minimum
    proc = subprocess.run(["bash", "scripts/gpu_owed.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "train: skipped: " in (out / "owed.log").read_text()


def test_the_runbooks_second_call_runs_the_train_part(tmp_path):
    """docs/gpu_runbook.md's second call of a loan (PARTS=train BUDGET_S=230, what is left after
    the first) runs bench_train: the part's minimum used to be 240 s, so it was skipped at once.
    PY=true stands in for Python: only the part's scheduling is checked."""
    out, keep = tmp_path / "out", tmp_path / "keep"
    env = cpu_env(SKIP_STAGE="1", **scratch(tmp_path),
                  PY="true", BUDGET_S="230", PARTS="train", OUT=str(out),
                  KEEP=str(keep), VARIANTS="baseline-amp amp-deepspeed", PACK_EVERY_S="1")
    proc = subprocess.run(["bash", "scripts/gpu_owed.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "owed.log").read_text()
    assert "train: ok" in log and "skipped" not in log, log


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run")
def test_owed_script_packs_a_running_part_so_a_killed_call_returns_it(tmp_path):
    """The device tool stops a call at its limit from outside: the running part's folder must
    already be in $OUT by then (packed every PACK_EVERY_S seconds, never half-written)."""
    out, keep = tmp_path / "out", tmp_path / "keep"
    env = cpu_env(SKIP_STAGE="1", **scratch(tmp_path),
                  PY=sys.executable, BUDGET_S="300", PARTS="checks",
                  PACK_EVERY_S="1", OUT=str(out), KEEP=str(keep), OMP_NUM_THREADS="2",
                  drop=("TRITON_INTERPRET",))
    proc = subprocess.Popen(["bash", "scripts/gpu_owed.sh"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checks.tgz").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # a second pack, now with the first output in the part's logs
        running = "checks: " not in (keep / "owed.log").read_text().split("up to", 1)[-1]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert running, "the part ended before the check: nothing was killed mid-part"
    with tarfile.open(out / "checks.tgz") as tar:
        assert {"checks/env.log", "checks/console.log"} & set(tar.getnames())


def test_owed_script_leaves_no_packer_sleep_holding_its_output(tmp_path):
    """The packer's pause between packs must end with the packer: left running, it holds the
    script's stdout, so that whoever reads it through a pipe (the device tool, `| tee`) waited up
    to PACK_EVERY_S (20 s) after each part and after the script had ended (measured: 20 s more
    per call). PY=true stands in for Python: only the packing is checked."""
    out, keep = tmp_path / "out", tmp_path / "keep"
    env = cpu_env(SKIP_STAGE="1", **scratch(tmp_path), PY="true", BUDGET_S="300",
                  PARTS="checks", OUT=str(out), KEEP=str(keep), PACK_EVERY_S="30")
    start = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_owed.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checks: ok" in (out / "owed.log").read_text()
    assert took < 10, f"the output pipe closed {took:.0f} s after the start"
