"""benchmarks/bench_train.py on CPU: every variant for 2 steps (GPU-only ones reported as skipped
with a reason), the CSV's rows and columns, a profiler trace, and the baseline's one-clip
pseudo-videos computing the same function as the model's own forward."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train  # noqa: E402
from subprocess_env import cpu_env  # noqa: E402

from siasam_fast.config import load_config  # noqa: E402
from siasam_fast.model import SiaSamReaModel, load_tokenizer  # noqa: E402
from siasam_fast.training import TextEncoder  # noqa: E402

COLUMNS = ["variant", "group", "base", "status", "reason", "loader", "dedup", "question",
           "siamese_impl", "engine", "precision", "cnn_layout", "optimizer", "videos_per_s",
           "clips_per_s",
           "step_ms", "step_ms_synced", "data_ms", "forward_ms", "backward_ms", "optimizer_ms",
           "data_wait_ms_nosync", "peak_gpu_mem_gb", "tflop_per_step", "mfu",
           "frames_encoded_per_video", "speedup_vs_baseline_fp32", "speedup_vs_base",
           "device", "torch", "deepspeed", "config", "notes"]
POSITIVE = ["videos_per_s", "clips_per_s", "step_ms", "step_ms_synced", "data_ms", "forward_ms",
            "backward_ms", "optimizer_ms", "tflop_per_step", "frames_encoded_per_video",
            "speedup_vs_baseline_fp32", "final_loss"]
GPU_ONLY = {"fast-fp16", "amp-triton", "amp-fused-adam", "amp-dali", "amp-cudnn-benchmark"}


ENV = cpu_env(OMP_NUM_THREADS="2", drop=("TRITON_INTERPRET",))


def bench_cmd(tmp_path, *options: str) -> list[str]:
    """bench_train.py on the tiny config, its synthetic set under tmp_path/synth (generated on the
    first run), results under tmp_path/results, one warm-up step, then ``options``."""
    data = tmp_path / "synth"
    return [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"),
            "--config", str(ROOT / "configs" / "bench_tiny.yaml"),
            "--set", f"data.train={data}/annotations/train_qa.json",
            "--set", f"data.manifest={data}/manifest.jsonl",
            "--warmup", "1", "--out", str(tmp_path / "results"), *options]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_every_variant_runs_or_says_why_not(tmp_path):
    out = tmp_path / "results"
    cmd = bench_cmd(tmp_path, "--num-videos", "40", "--steps", "2", "--profile", "baseline-fp32",
                    "--profile-steps", "1")
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    header = proc.stdout.splitlines()[-len(bench_train.VARIANTS) - 2]  # the table comes last
    assert header.split()[:2] == ["variant", "status"] and "videos/s" in header

    with (out / "bench_train_cpu_bench_tiny.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == [v.name for v in bench_train.VARIANTS]
    assert not [c for c in COLUMNS if c not in rows[0]]
    for r in rows:
        if r["variant"] in GPU_ONLY:
            assert r["status"] == "skipped" and r["reason"], r
            continue
        assert r["status"] == "ok", r
        for column in POSITIVE:
            value = float(r[column])
            assert math.isfinite(value) and value > 0, (r["variant"], column, r[column])
        assert r["mfu"] == "n/a" and r["peak_gpu_mem_gb"] == "n/a"  # no GPU, no peak
        assert r["device"] == "cpu"
    by = {r["variant"]: r for r in rows}
    assert float(by["baseline-fp32"]["frames_encoded_per_video"]) == 72  # N*B, no dedup
    assert float(by["amp-dedup"]["frames_encoded_per_video"]) < 72  # unique frames only
    assert float(by["amp-dedup"]["tflop_per_step"]) < float(by["baseline-amp"]["tflop_per_step"])
    assert "pyav instead of DALI" in by["fast-bf16"]["notes"]
    assert "no cuDNN autotuning here" in by["fast-bf16"]["notes"]
    assert by["fast-bf16"]["engine"] == "deepspeed-zero2"
    assert by["fast-bf16"]["cnn_layout"] == by["amp-channels-last"]["cnn_layout"] == "NHWC"
    assert by["baseline-amp"]["cnn_layout"] == "NCHW"
    assert by["fast-bf16"]["cudnn_benchmark"] == by["amp-cudnn-benchmark"]["cudnn_benchmark"]
    assert by["amp-cudnn-benchmark"]["cudnn_benchmark"] == "True"
    assert by["baseline-amp"]["cudnn_benchmark"] == "False"
    assert (out / "bench_train_cpu_bench_tiny.png").stat().st_size > 0
    assert (out / "bench_train_cpu_bench_tiny.md").read_text().startswith("| variant")
    trace = out / "traces" / "trace_bench_train_cpu_bench_tiny_baseline-fp32.json"
    assert trace.stat().st_size > 0 and by["baseline-fp32"]["trace"] == str(trace)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_isolated_variants_report_rows_logs_and_timeouts(tmp_path):
    """--isolate process (the GPU default): each variant in its own interpreter, its row back as
    JSON and its output in a log; a variant past --variant-timeout is killed and says so."""
    out = tmp_path / "results"
    base = bench_cmd(tmp_path, "--num-videos", "24", "--steps", "1", "--isolate", "process")
    env = ENV
    proc = subprocess.run(base + ["--variants", "amp-channels-last"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with (out / "bench_train_cpu_bench_tiny.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "ok" and float(row["videos_per_s"]) > 0, row
    assert row["cnn_layout"] == "NHWC" and row["isolated"] == "True"
    log = out / "logs" / "bench_train_cpu_bench_tiny_amp-channels-last.log"
    assert log.stat().st_size > 0

    proc = subprocess.run(base + ["--variants", "baseline-fp32", "--variant-timeout", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:]  # a variant that did not finish fails
    with (out / "bench_train_cpu_bench_tiny.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "timeout" and "no result within 1 s" in row["reason"], row

    # Killed from outside after its first variant (a device loan's limit): that row is on disk.
    csv_path = out / "bench_train_cpu_bench_tiny.csv"
    meta_path = csv_path.with_suffix(".json")
    csv_path.unlink()
    proc = subprocess.Popen(base + ["--variants", "amp-channels-last", "baseline-fp32"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not csv_path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # the JSON is written right after the CSV
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["amp-channels-last"] and rows[0]["status"] == "ok"
    assert json.loads(meta_path.read_text())["complete"] is False


def _batch(V, N, frames_per_video, S=32, seed=0):
    """A batch decoded without de-duplication: clip n of video v is frames [n*b, (n+1)*b)."""
    g = torch.Generator().manual_seed(seed)
    B = max(frames_per_video)
    U = N * B
    frames = torch.zeros(V, U, 3, S, S)
    clip_index = torch.zeros(V, N, B, dtype=torch.long)
    frame_mask = torch.zeros(V, N, B, dtype=torch.bool)
    for v, b in enumerate(frames_per_video):
        frames[v, : N * b] = torch.randn(N * b, 3, S, S, generator=g)
        clip_index[v, :, :b] = torch.arange(N * b).view(N, b)
        frame_mask[v, :, :b] = True
    questions = ["what colour is the square", "which way does the comet move", "what shape"]
    return {"frames": frames, "num_unique": frame_mask.sum((1, 2)), "clip_index": clip_index,
            "frame_mask": frame_mask, "clip_mask": torch.ones(V, N, dtype=torch.bool),
            "question": questions[:V], "candidates": [[] for _ in range(V)]}


@pytest.mark.parametrize("frames_per_video", [(4, 4), (4, 3, 2)])  # view / gather paths
def test_single_clip_videos_compute_what_the_model_computes(frames_per_video):
    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml")
    N = 3
    torch.manual_seed(0)
    model = SiaSamReaModel(cfg.model, "open", num_answers=7, vocab_size=500, num_clips=N).eval()
    text = TextEncoder(load_tokenizer(cfg.model), "open", 32)
    batch = _batch(len(frames_per_video), N, frames_per_video)
    with torch.no_grad():
        expected = model({**batch, **text(batch)})
        single = bench_train.single_clip_videos(batch, text)
        assert single["frames"].shape[:2] == (len(frames_per_video) * N, max(frames_per_video))
        got = bench_train.per_video_outputs(model(single), len(frames_per_video), N)
    for key in ("features", "logits"):
        assert got[key].shape == expected[key].shape
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
