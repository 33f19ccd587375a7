"""benchmarks/bench_kernels.py --combine: merging timing CSVs of separate runs on one card."""

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
    assert [r["config"] for r in rows[:-2]] == [
        "heuristic", "block_k=16,num_warps=2", "block_k=16,num_warps=4",
        "fwd_acc_2d=1,fwd_block_k=32", "bwd_block_k=64"]  # fmt: skip
    assert [r["kinds"] for r in rows] == ["fwd+bwd"] * 3 + ["fwd", "bwd"] + ["fwd+bwd"] * 2
    # the heuristic again after the pair; the speed-up is against the faster of its two timings
    assert rows[-1]["config"] == "heuristic, again" and float(rows[-1]["full_ms"]) > 0
    heuristic_ms = min(float(rows[0]["full_ms"]), float(rows[-1]["full_ms"]))
    assert float(rows[-2]["full_speedup_vs_heuristic"]) == pytest.approx(
        heuristic_ms / float(rows[-2]["full_ms"]), rel=1e-6)
    assert rows[-2]["tuned"].startswith("yes" if heuristic_ms / float(rows[-2]["full_ms"]) >= 1.05
                                        else "no (under 1.05x")
    assert "num_warps=2" in rows[1]["fwd_launch"] and "BLOCK_K=16" in rows[1]["bwd_launch"]
    assert "ACC_2D=1" in rows[3]["fwd_launch"] and not rows[3]["bwd_launch"]
    # one kernel's configs time that kernel alone; the others time fwd, bwd and fwd+bwd
    assert rows[3]["fwd_ms"] and not rows[3]["bwd_ms"] and not rows[3]["full_ms"]
    assert rows[4]["bwd_ms"] and not rows[4]["fwd_ms"]
    # last: the fastest forward with the fastest backward, by their effective settings
    last = rows[-2]
    assert last["config"].startswith("chosen: ") and float(last["full_ms"]) > 0
    fastest_fwd = min(rows[:-2], key=lambda r: float(r["fwd_ms"] or "inf"))["config"]
    assert last["config"].startswith(f"chosen: {fastest_fwd} | ")
    assert all(not r.get("error") for r in rows)
    assert "compiled 5 configs" in proc.stdout and "(0 failed" in proc.stdout  # the worker pool
    assert not list(tmp_path.glob("tuned_*.json"))  # interpreter timings tune nothing


def test_only_a_clear_gain_is_tuned():
    """A pair of launch settings within a repeat's noise of the heuristic was written to the
    tuned table all the same."""
    assert not bench_kernels.worth_tuning(None)
    assert not bench_kernels.worth_tuning(1.02)
    assert bench_kernels.worth_tuning(bench_kernels.TUNE_MIN_GAIN)
    assert bench_kernels.worth_tuning(1.3)


def test_an_interrupted_config_sweep_keeps_the_finished_one(tmp_path, monkeypatch, capsys):
    """The sweep rewrote NAME.csv after every config, so a Ctrl-C cut an earlier finished sweep's
    file to the rows measured so far (and ended in a traceback). Rows in progress now go to
    NAME.partial.csv, NAME.csv is written when the sweep ends, and Ctrl-C says where the rows
    are (exit 130)."""
    import torch

    monkeypatch.setattr(bench_kernels, "make_impls", lambda impls, device: {"triton": None})
    calls = []

    def timing(fn, inputs, mode, device_type):
        calls.append(mode)
        if stop_after and len(calls) > stop_after:
            raise KeyboardInterrupt
        return (0.1,)

    env = {"device": "cpu", "date": "d", "torch": "t", "triton": "t"}
    args = ("block_k=16;num_warps=2,4", ["fp32"], torch.device("cpu"), env, tmp_path, "")
    monkeypatch.setattr(bench_kernels, "time_impl", timing)
    stop_after = 0
    assert bench_kernels.sweep_configs(*args, workers=1) == 0
    (done,) = tmp_path.glob("bench_kernels_*_configs.csv")
    finished = done.read_text()
    assert len(finished.splitlines()) == 1 + 5  # heuristic, 2 configs, the chosen pair, heuristic
    calls.clear()
    stop_after = 4  # the heuristic's 3 modes and one more
    assert bench_kernels.sweep_configs(*args, workers=1) == 130
    assert done.read_text() == finished
    partial = done.with_name(done.stem + ".partial.csv")
    assert len(partial.read_text().splitlines()) == 1 + 1
    assert f"rows measured so far are in {partial}" in capsys.readouterr().err


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


def test_target_rows_ratios_and_memory_floor():
    """Target A: eager / Triton and the best torch.compile / Triton on the fp16 fwd+bwd rows;
    target B: Triton's time over the byte model's floor at 3 TB/s and at the measured copy rate."""
    rows = [  # other modes and dtypes of the same shapes (first) are not the targets' rows
            row(A, "triton", 5.0, mode="fwd"), row(A, "eager", 0.1, dtype="fp32"),
            row(A, "triton", 50.0, mode="bwd"), row(B, "triton", 99.0, dtype="bf16"),
            row(A, "triton", 0.5), row(A, "eager", 2.5), row(A, "compile", 1.0),
            row(A, "compile-max", 0.75), row(B, "triton", 0.4)]
    a, b = bench_kernels.target_rows(rows, copy_gbps=2000.0)
    assert a["triton_ms"] == 0.5
    assert a["vs_eager"] == pytest.approx(5.0) and a["vs_compile_best"] == pytest.approx(1.5)
    assert a["pass"] is True  # exactly at both goals (>= 5, >= 1.5)
    # fwd+bwd: z [V, N, K] and f [V, N, D] in fp16 read once and written once
    nbytes = 2 * B["V"] * 9 * (B["K"] + B["D"]) * 2
    assert bench_kernels.bytes_moved(B["V"], 9, B["D"], B["K"], bench_kernels.torch.float16,
                                     "full") == nbytes
    assert b["triton_ms"] == 0.4
    assert b["floor_ms_3TBps"] == pytest.approx(nbytes / 3e12 * 1e3)
    assert b["floor_ratio"] == pytest.approx(0.4 / (nbytes / 3e12 * 1e3))
    assert b["floor_ratio_measured_copy"] == pytest.approx(0.4 / (nbytes / 2e12 * 1e3))
    a, _ = bench_kernels.target_rows([row(A, "triton", 0.5), row(A, "eager", 2.4),
                                      row(A, "compile", 0.75)], None)
    assert a["pass"] is False  # 4.8x eager


def test_combine_uses_the_copy_bandwidth_of_the_csvs(tmp_path, capsys):
    write(tmp_path / "a.csv", "GPU", [row(B, "triton", 0.4)])
    assert bench_kernels.main(["--combine", str(tmp_path / "a.csv")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "floor_ratio" in line)
    assert "floor_ratio_measured_copy" in header  # write(): copy_gbps 3000 in every row


def test_timing_rows_bytes_and_bandwidth(monkeypatch):
    """Each timing row: the byte model of its dtype and mode at N = 9, and bytes / median time."""
    monkeypatch.setattr(bench_kernels, "time_impl", lambda fn, inputs, mode, dev: (
        {"fwd": 2.0, "full": 4.0}[mode], 1.0, 8.0))  # (p50, p20, p80) in ms
    rows = bench_kernels.run_timings(["eager"], [("V", dict(V=2, D=8, K=16))], ["fp32", "fp16"],
                                     ["fwd", "full"], bench_kernels.torch.device("cpu"))
    by = {(r["dtype"], r["mode"]): r for r in rows}
    once = 2 * 9 * (16 + 8)  # V x N x (K + D) elements
    assert by["fp32", "fwd"]["bytes"] == once * 4 and by["fp16", "fwd"]["bytes"] == once * 2
    assert by["fp32", "full"]["bytes"] == 2 * once * 4
    assert by["fp32", "fwd"]["gbps"] == pytest.approx(once * 4 / 2e-3 / 1e9)
    assert by["fp16", "full"]["gbps"] == pytest.approx(2 * once * 2 / 4e-3 / 1e9)
    assert (by["fp32", "fwd"]["ms"], by["fp32", "fwd"]["ms_p20"], by["fp32", "fwd"]["ms_p80"]) == (
        2.0, 1.0, 8.0)


def test_cpu_timing_gives_the_median_and_quantiles_in_order(monkeypatch):
    """(p50, p20, p80) of the repetitions, in that order, on a clock the test drives."""
    clock = {"now": 0.0, "calls": 0}
    durations = [0.001 * (1 + (7 * i) % 10) for i in range(1000)]  # 1 .. 10 ms, shuffled

    def fn():
        clock["now"] += durations[clock["calls"]]
        clock["calls"] += 1

    monkeypatch.setattr(bench_kernels, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    p50, p20, p80 = bench_kernels.bench(fn, "cpu")
    reps = clock["calls"] - 1  # the first call is a warm-up
    times = sorted(d * 1e3 for d in durations[1:1 + reps])
    import statistics

    qs = statistics.quantiles(times, n=100, method="inclusive")
    assert p50 == pytest.approx(statistics.median(times))
    assert (p20, p80) == (pytest.approx(qs[19]), pytest.approx(qs[79]))
    assert p20 < p50 < p80
