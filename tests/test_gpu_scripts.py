"""The one-call GPU scripts (scripts/*.sh) on CPU: a mistake in them would only show on a GPU
loan, where it costs device time that cannot be had back. Syntax of every script, and the flow of
scripts/gpu_owed.sh (parts, shares, one tarball per part) through its checks and train parts with
the tiny config."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from subprocess_env import cpu_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run")
def test_owed_script_runs_its_parts_and_packs_each(tmp_path):
    out, keep = tmp_path / "out", tmp_path / "keep"
    env = cpu_env(SKIP_STAGE="1", PY=sys.executable, BUDGET_S="900", PARTS="checks train",
                  OUT=str(out), KEEP=str(keep), CONFIG="configs/bench_tiny.yaml", STEPS="1",
                  WARMUP="1", VARIANTS="baseline-fp32", PROFILE="baseline-fp32",
                  NUM_VIDEOS="24", OMP_NUM_THREADS="2", drop=("TRITON_INTERPRET",))
    proc = subprocess.run(["bash", "scripts/gpu_owed.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checks.tgz", "owed.log", "train.tgz"]
    log = (out / "owed.log").read_text()
    assert "checks: ok" in log and "train: ok" in log, log
    with tarfile.open(out / "train.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("_bench_tiny.csv") for n in names), names
    assert any(n.endswith("console.log") for n in names), names

    env.update(PARTS="train", BUDGET_S="100")  # below the train part's 240 s minimum
    proc = subprocess.run(["bash", "scripts/gpu_owed.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "train: skipped: " in (out / "owed.log").read_text()
