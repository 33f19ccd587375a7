"""benchmarks/bench_kernels.py --combine: merging timing CSVs of separate runs on one card."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_kernels  # noqa: E402

A, B = bench_kernels.TARGET_A, bench_kernels.TARGET_B


def write(path, device, rows):
    cols = ["device", "copy_gbps", "sweep", "dtype", "V", "N", "D", "K", "impl", "mode", "ms"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({"device": device, "copy_gbps": 3000.0, "N": 9, **r})


def row(shape, impl, ms, mode="full", sweep="target", dtype="fp16"):
    return dict(sweep=sweep, dtype=dtype, impl=impl, mode=mode, ms=ms, **shape)


def test_combine_merges_runs_and_reports_targets(tmp_path, capsys):
    write(tmp_path / "a.csv", "GPU", [row(A, "triton", 0.5), row(A, "eager", 3.0),
                                      row(B, "triton", 0.4)])  # fmt: skip
    write(tmp_path / "b.csv", "GPU", [row(A, "compile", 1.0), row(A, "compile-max", 0.9)])
    assert bench_kernels.main(["--combine", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 0
    merged = list(csv.DictReader(open(tmp_path / "bench_kernels_combined.csv")))
    a = next(r for r in merged if int(r["V"]) == A["V"])
    assert float(a["x_vs_eager"]) == pytest.approx(6.0)
    assert float(a["x_vs_compile"]) == pytest.approx(2.0)
    assert float(a["x_vs_compile-max"]) == pytest.approx(1.8)
    out = capsys.readouterr().out
    # A: 6x eager, 1.8x the best compile -> met; B: 0.4 ms vs a floor of about 0.24 ms -> met
    targets = [line for line in out.splitlines() if line.strip().startswith(("A:", "B:"))]
    assert len(targets) == 2 and all("True" in line for line in targets), out


def test_combine_refuses_mixed_devices(tmp_path):
    write(tmp_path / "a.csv", "H100", [row(A, "triton", 0.5)])
    write(tmp_path / "b.csv", "V100", [row(A, "eager", 3.0)])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_kernels.py"), "--combine",
         str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and "different devices" in proc.stderr


def test_config_sweep_runs_in_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    grid = "block_k=16;num_warps=2,4|fwd_acc_2d=1;fwd_block_k=32|bwd_block_k=64"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_kernels.py"), "--interpret", "--dtypes",
         "fp32", "--sweep-configs", grid, "--out", str(tmp_path), "--compile-workers", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = tmp_path.glob("bench_kernels_*_configs.csv")
    rows = list(csv.DictReader(open(path)))
    assert [r["config"] for r in rows[:-1]] == [
        "heuristic", "block_k=16,num_warps=2", "block_k=16,num_warps=4",
        "fwd_acc_2d=1,fwd_block_k=32", "bwd_block_k=64"]  # fmt: skip
    assert [r["kinds"] for r in rows] == ["fwd+bwd"] * 3 + ["fwd", "bwd", "fwd+bwd"]
    assert "num_warps=2" in rows[1]["fwd_launch"] and "BLOCK_K=16" in rows[1]["bwd_launch"]
    assert "ACC_2D=1" in rows[3]["fwd_launch"] and not rows[3]["bwd_launch"]
    # one kernel's configs time that kernel alone; the others time fwd, bwd and fwd+bwd
    assert rows[3]["fwd_ms"] and not rows[3]["bwd_ms"] and not rows[3]["full_ms"]
    assert rows[4]["bwd_ms"] and not rows[4]["fwd_ms"]
    # last: the fastest forward with the fastest backward, by their effective settings
    last = rows[-1]
    assert last["config"].startswith("chosen: ") and float(last["full_ms"]) > 0
    fastest_fwd = min(rows[:-1], key=lambda r: float(r["fwd_ms"] or "inf"))["config"]
    assert last["config"].startswith(f"chosen: {fastest_fwd} | ")
    assert all(not r.get("error") for r in rows)
    assert "compiled 5 configs" in proc.stdout and "(0 failed" in proc.stdout  # the worker pool
    assert not list(tmp_path.glob("tuned_*.json"))  # interpreter timings tune nothing


def test_config_grid_errors():
    assert bench_kernels.parse_grid("block_k=64,128;num_stages=2") == [
        {"block_k": 64, "num_stages": 2}, {"block_k": 128, "num_stages": 2}]  # fmt: skip
    assert bench_kernels.parse_grid("block_k=64|block_k=64,32") == [
        {"block_k": 64}, {"block_k": 32}]  # fmt: skip
    assert bench_kernels.config_kinds({"fwd_acc_2d": 1}) == ("fwd",)
    assert bench_kernels.config_kinds({"fwd_block_k": 1, "num_warps": 4}) == ("fwd", "bwd")
    assert bench_kernels.config_kinds({}) == ("fwd", "bwd")
    with pytest.raises(SystemExit, match="is not KEY=INT"):
        bench_kernels.parse_grid("block_k=big")


def test_combine_says_what_was_not_measured_and_keeps_the_environment(tmp_path, capsys):
    write(tmp_path / "a.csv", "GPU", [row(A, "triton", 0.5)])
    assert bench_kernels.main(["--combine", str(tmp_path / "a.csv")]) == 0
    out = capsys.readouterr().out
    a = next(line for line in out.splitlines() if line.strip().startswith("A:"))
    b = next(line for line in out.splitlines() if line.strip().startswith("B:"))
    assert "not measured (no eager, compile row)" in a and "not measured (no triton row)" in b
    merged = list(csv.DictReader(open(tmp_path / "bench_kernels_combined.csv")))
    assert merged[0]["device"] == "GPU" and merged[0]["copy_gbps"] == "3000.0"


def test_a_stopped_run_keeps_the_earlier_results(tmp_path, monkeypatch, capsys):
    """Ctrl-C after one row: the rows so far in NAME.partial.csv, the earlier run's NAME.csv as it
    was, exit 130; a finished run replaces NAME.csv, drops the partial file and an earlier run's
    check CSV that it did not make again."""
    from siasam_fast import benchutil

    monkeypatch.setattr(benchutil, "environment", lambda: {
        "device": "cpu", "torch": "t", "triton": "t", "python": "p"})  # fmt: skip
    done = dict(sweep="V", dtype="fp32", V=4, N=9, D=8, K=16, impl="eager", mode="fwd", ms=1.0)

    def stopped(*args, on_row=None, **kwargs):
        on_row([done])
        raise KeyboardInterrupt

    earlier = tmp_path / "bench_kernels_cpu.csv"
    earlier.write_text("impl,ms\neager,9.0\n")
    (tmp_path / "bench_kernels_cpu_check.csv").write_text("old check\n")
    monkeypatch.setattr(bench_kernels, "run_timings", stopped)
    assert bench_kernels.main(["--quick", "--out-dir", str(tmp_path)]) == 130
    assert "interrupted: the rows measured so far are in" in capsys.readouterr().err
    assert earlier.read_text() == "impl,ms\neager,9.0\n"
    partial = list(csv.DictReader(open(tmp_path / "bench_kernels_cpu.partial.csv")))
    assert [r["ms"] for r in partial] == ["1.0"]

    monkeypatch.setattr(bench_kernels, "run_timings", lambda *a, **k: [done])
    monkeypatch.setattr(bench_kernels, "plot", lambda *a, **k: None)
    assert bench_kernels.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert [r["ms"] for r in csv.DictReader(open(earlier))] == ["1.0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_kernels_cpu.csv"]
    assert "removed" in capsys.readouterr().out


def test_no_png_without_full_mode_timings(tmp_path):
    rows = [dict(sweep="V", dtype="fp32", V=4, N=9, D=8, K=16, impl="eager", mode="fwd", ms=1.0)]
    assert bench_kernels.plot(rows, tmp_path / "x.png", "t") is None
    assert not (tmp_path / "x.png").exists()
    rows.append({**rows[0], "mode": "full"})
    assert bench_kernels.plot(rows, tmp_path / "x.png", "t").is_file()
