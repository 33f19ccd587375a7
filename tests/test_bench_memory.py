"""benchmarks/bench_memory.py on the tiny model: it counts what the CNN keeps for the backward,
per frame, and the counts move the way the settings say they must."""

import csv
import subprocess
import sys
from pathlib import Path

from subprocess_env import cpu_env

ROOT = Path(__file__).resolve().parent.parent


def test_bench_memory_counts_activations_per_frame(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_memory.py", "--config", "configs/synthetic.yaml",
         "--sizes", "64", "128", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "memory.csv").open()))
    got = {(r["setting"], int(r["image_size"])): int(r["bytes_per_frame_fp32"]) for r in rows}
    assert len(got) == 8 and all(v > 0 for v in got.values())
    for size in (64, 128):
        # ClipBERT's freeze keeps less than BatchNorms frozen alone, which keeps less than the
        # default; recomputation keeps the least
        assert got["checkpointed", size] < got["default", size]
        assert got["clipbert", size] < got["bn_frozen", size]
        assert got["bn_frozen", size] < got["default", size]
    # activations scale with the pixels (the weights, saved too, are not counted: 4x exactly
    # up to the grid's rounding)
    assert 3.5 < got["default", 128] / got["default", 64] < 4.5
    assert "vs_default_smallest" in rows[0] and "wrote" in proc.stdout
