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
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train  # noqa: E402
from subprocess_env import cpu_env, ended  # noqa: E402

from siasam_fast.config import load_config  # noqa: E402
from siasam_fast.model import SiaSamReaModel, load_tokenizer  # noqa: E402
from siasam_fast.training import TextEncoder  # noqa: E402

COLUMNS = ["variant", "group", "base", "status", "reason", "loader", "dedup", "question",
           "siamese_impl", "engine", "precision", "cnn_layout", "optimizer", "videos_per_s",
           "clips_per_s",
           "step_ms", "step_ms_synced", "data_ms", "forward_ms", "backward_ms", "optimizer_ms",
           "data_wait_ms_nosync", "data_wait_frac", "peak_gpu_mem_gb", "tflop_per_step",
           "model_tflop_per_step", "model_tflop_counted", "mfu", "hfu", "achieved_tflops",
           "frames_encoded_per_video", "speedup_vs_baseline_fp32", "speedup_vs_base",
           "warmup_steps", "drained_batches", "loader_prefetch", "substituted", "complete",
           "device", "torch", "deepspeed", "config", "notes"]
POSITIVE = ["videos_per_s", "clips_per_s", "step_ms", "step_ms_synced", "data_ms", "forward_ms",
            "backward_ms", "optimizer_ms", "tflop_per_step", "model_tflop_per_step",
            "frames_encoded_per_video", "speedup_vs_baseline_fp32", "final_loss"]
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
        assert r["mfu"] == r["hfu"] == r["peak_gpu_mem_gb"] == "n/a"  # no GPU, no peak
        assert r["device"] == "cpu" and r["complete"] == "True"
        assert 0 <= float(r["data_wait_frac"]) <= 1
        assert int(r["warmup_steps"]) == 1 + bench_train.SETTLE_STEPS
        assert int(r["drained_batches"]) == int(r["loader_prefetch"]) == 2  # 1 worker x 2
    by = {r["variant"]: r for r in rows}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len({r["model_tflop_per_step"] for r in ok}) == 1  # one figure for every row
    assert len({r["model_tflop_counted"] for r in ok}) == 1  # and every row counted the same
    assert float(by["baseline-amp"]["tflop_per_step"]) > 1.5 * float(
        by["baseline-amp"]["model_tflop_per_step"])
    # skipped toggles describe themselves, not a fallback
    assert by["amp-dali"]["loader"] == "dali" and by["amp-triton"]["siamese_impl"] == "triton"
    assert by["amp-fused-adam"]["optimizer"] == "DeepSpeed FusedAdam"
    assert "pyav for DALI" in by["fast-bf16"]["substituted"]
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
    md = (out / "bench_train_cpu_bench_tiny.md").read_text()
    assert md.startswith("| variant") and "| notes |" in md and "pyav for DALI" in md
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
    text = log.read_text()
    for stage in ("model and", "first batch after", "warm-up step 1/1", "drained the loader's",
                  "pass 1 (unsynchronised)", "pass 2 (synchronised phases)", "FLOPs counted"):
        assert stage in text, (stage, text)  # time-stamped: where a variant's time went

    proc = subprocess.run(base + ["--variants", "baseline-fp32", "--variant-timeout", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:]  # a variant that did not finish fails
    with (out / "bench_train_cpu_bench_tiny.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "timeout" and "no result within 1 s" in row["reason"], row

    # Killed from outside after its first variant (a device loan's limit): that row is on disk
    # in the partial files, and the earlier finished run's files are as they were.
    finished = out / "bench_train_cpu_bench_tiny.csv"
    before = finished.read_text()
    csv_path = out / "bench_train_cpu_bench_tiny.partial.csv"
    meta_path = csv_path.with_suffix(".json")
    proc = subprocess.Popen(base + ["--variants", "amp-channels-last", "baseline-fp32"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # The JSON is written last of the three (CSV, table, JSON), each atomically.
        while not meta_path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["amp-channels-last"] and rows[0]["status"] == "ok"
    assert rows[0]["complete"] == "False"
    assert json.loads(meta_path.read_text())["complete"] is False
    assert finished.read_text() == before


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
        # each pseudo-video encodes its clip's real frames, not the padding after them
        assert single["num_unique"].tolist() == [b for b in frames_per_video for _ in range(N)]
        got = bench_train.per_video_outputs(model(single), len(frames_per_video), N)
    for key in ("features", "logits"):
        assert got[key].shape == expected[key].shape
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Review fixes: one model-FLOPs figure for MFU, the timed window past the loader's backlog, a
# toggle never timed on a stand-in, skipped rows with their own settings, the small ones.


def _tiny_setup(tmp_path, num_videos=24):
    """The tiny config, its synthetic set under tmp_path/synth, and a short run's options."""
    data = tmp_path / "synth"
    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml",
                      [f"data.train={data}/annotations/train_qa.json",
                       f"data.manifest={data}/manifest.jsonl"])
    bench_train.ensure_data(cfg, num_videos)
    args = bench_train.parse_args(["--steps", "2", "--warmup", "1", "--out", str(tmp_path / "out")])
    args.out_dir, args.stem = Path(args.out), "bench_train_test"
    return cfg, args


@pytest.mark.parametrize("script", ["benchmarks/bench_train.py", "train.py"])
def test_dalis_spawned_readers_do_not_import_torch_deepspeed_or_the_package(script):
    """DALI's reader processes start with spawn on a GPU and run the main script again as
    __mp_main__ before reading a byte: torch, DeepSpeed and transformers cost each of them
    seconds (7 s here) and ~0.4 GB, 12 of them per DALI pass with configs/clipbert_base.yaml."""
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers', 'siasam_fast') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / script)],
                         env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_ctrl_c_while_a_variant_writes_its_stacks_still_kills_it():
    """Ctrl-C during stop_with_stacks' wait: the variant's process group (its own session, which
    the terminal's Ctrl-C does not reach) is killed all the same."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import faulthandler, signal, time; faulthandler.register("
         "signal.SIGUSR2); print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"  # it survives SIGUSR2, as a variant does
    real_wait = proc.wait

    def wait(timeout=None):
        if timeout is not None:
            raise KeyboardInterrupt
        return real_wait()

    proc.wait = wait
    try:
        with pytest.raises(KeyboardInterrupt):
            bench_train.stop_with_stacks(proc)
        assert real_wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            real_wait()


def test_apply_model_flops_gives_every_row_the_same_model_flops():
    """The baseline's own count (duplicate frames) is ~1.8x the de-duplicated one: its MFU must
    come from the de-duplicated figure like every other row's, its own count only in HFU."""
    rows = [
        {"variant": "baseline-amp", "status": "ok", "step_ms": 200.0, "peak_tflops": 100.0,
         "tflop_per_step": 17.7, "model_tflop_counted": 10.0},
        {"variant": "fast-bf16", "status": "ok", "step_ms": 100.0, "peak_tflops": 100.0,
         "tflop_per_step": 10.0, "model_tflop_counted": 10.0},
        {"variant": "amp-dedup", "status": "ok", "step_ms": 150.0, "peak_tflops": 100.0,
         "tflop_per_step": 10.0, "model_tflop_counted": "n/a"},  # its count failed
        {"variant": "amp-dali", "status": "skipped", "reason": "no DALI"},
    ]
    assert bench_train.apply_model_flops(rows) == 10.0
    assert [r.get("model_tflop_per_step") for r in rows] == [10.0, 10.0, 10.0, None]
    assert rows[0]["mfu"] == pytest.approx(10.0 / 0.2 / 100.0)  # not 17.7 / 0.2 / 100
    assert rows[1]["mfu"] == pytest.approx(10.0 / 0.1 / 100.0)
    assert rows[2]["mfu"] == pytest.approx(10.0 / 0.15 / 100.0)
    assert rows[1]["mfu"] / rows[0]["mfu"] == pytest.approx(2.0)  # the step-time ratio, no more
    assert "mfu" not in rows[3]
    differ = [{**rows[2]}, {**rows[0], "model_tflop_counted": 12.0}, {**rows[1]}]
    assert bench_train.apply_model_flops(differ) == 12.0  # the first row that counted it
    no_peak = [{**rows[1], "peak_tflops": "n/a"}]
    bench_train.apply_model_flops(no_peak)
    assert no_peak[0]["mfu"] == "n/a" and no_peak[0]["model_tflop_per_step"] == 10.0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_mfu_uses_the_same_model_flops_for_baseline_and_dedup_rows(tmp_path, monkeypatch):
    """Counted in each variant's own run: the model figure is the same in both rows (the same
    first batch, de-duplicated), the baseline's own count is larger (duplicate frames), and the
    MFU ratio is exactly the step-time ratio."""
    cfg, args = _tiny_setup(tmp_path)
    monkeypatch.setattr(bench_train, "peak_tflops", lambda device: 0.01)  # a "GPU" peak on CPU
    out = tmp_path / "out"
    status = bench_train.main([
        "--config", str(ROOT / "configs" / "bench_tiny.yaml"),
        "--set", f"data.train={cfg.data.train}", "--set", f"data.manifest={cfg.data.manifest}",
        "--steps", "2", "--warmup", "1", "--out", str(out),
        "--variants", "baseline-amp", "amp-dedup"])
    assert status == 0
    with (out / "bench_train_cpu_bench_tiny.csv").open() as fh:
        by = {r["variant"]: r for r in csv.DictReader(fh)}
    base, dedup = by["baseline-amp"], by["amp-dedup"]
    assert base["status"] == dedup["status"] == "ok"
    assert base["model_tflop_counted"] == dedup["model_tflop_counted"]
    assert base["model_tflop_per_step"] == dedup["model_tflop_per_step"]
    model = float(base["model_tflop_per_step"])
    assert float(base["tflop_per_step"]) > 1.5 * model  # 72 clip frames vs ~37 distinct
    assert float(dedup["tflop_per_step"]) == pytest.approx(model, rel=0.15)  # other batch, + loss
    mfu_ratio = float(dedup["mfu"]) / float(base["mfu"])
    assert mfu_ratio == pytest.approx(float(base["step_ms"]) / float(dedup["step_ms"]))
    assert float(base["mfu"]) == pytest.approx(model / (float(base["step_ms"]) / 1e3) / 0.01)
    assert float(base["hfu"]) > float(base["mfu"])  # its own count includes the duplicates
    md = (out / "bench_train_cpu_bench_tiny.md").read_text()
    assert "| MFU | HFU |" in md and "the same for every row" in md


def test_dedup_batch_keeps_each_frame_once_and_the_model_output():
    """The batch the model FLOPs are counted on: distinct frames only, the same function."""
    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml")
    V, N, B = 2, 3, 4
    batch = _batch(V, N, (B, B))
    # Overlapping clips, as the sampler makes them: clip n starts at frame 2n (ids 2n .. 2n+3).
    ids = torch.arange(B).view(1, 1, B) + 2 * torch.arange(N).view(1, N, 1)
    batch["frame_ids"] = ids.expand(V, N, B).clone()
    g = torch.Generator().manual_seed(1)
    distinct = torch.randn(V, 2 * N + 2, 3, 32, 32, generator=g)
    for v in range(V):  # the non-de-duplicated batch repeats each shared frame's pixels
        batch["frames"][v, : N * B] = distinct[v, batch["frame_ids"][v].flatten()]
    out = bench_train.dedup_batch(batch)
    assert out["num_unique"].tolist() == [2 * N + 2] * V  # 8 distinct of 12 clip frames
    assert out["frames"].shape[:2] == (V, 2 * N + 2)
    torch.testing.assert_close(bench_train.dedup_batch(out)["frames"], out["frames"])  # idempotent
    torch.manual_seed(0)
    model = SiaSamReaModel(cfg.model, "open", num_answers=7, vocab_size=500, num_clips=N).eval()
    text = TextEncoder(load_tokenizer(cfg.model), "open", 32)
    with torch.no_grad():
        expected = model({**batch, **text(batch)})
        got = model({**out, **text(out)})
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=1e-4, atol=1e-5)


class _Prefetched:
    """A loader like the real ones: ``depth`` batches ready at the start (what the workers made
    during the slow first steps), then one every ``period`` seconds, at most ``depth`` ahead."""

    def __init__(self, depth: int, period: float):
        import queue
        import threading

        self.q = queue.Queue(maxsize=depth)
        for i in range(depth):
            self.q.put(i)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(depth, period), daemon=True)
        self.thread.start()

    def _produce(self, i, period):
        while not self.stop.is_set():
            time.sleep(period)
            while not self.stop.is_set():
                try:
                    self.q.put(i, timeout=0.05)
                    break
                except Exception:  # noqa: BLE001 - queue.Full: try again
                    continue
            i += 1

    def __iter__(self):
        return self

    def __next__(self):
        return self.q.get()

    def close(self):
        self.stop.set()


class _SleepyTrainer:
    """run_step's view of a trainer whose step takes ``step_s`` seconds."""

    def __init__(self, step_s: float):
        self.step_s, self.device = step_s, torch.device("cpu")

    def prepare(self, raw):
        return raw, raw, 1

    def forward(self, batch, targets):
        time.sleep(self.step_s)
        return torch.zeros(()), {}

    def backward(self, loss):
        pass

    def step(self):
        pass

    def skipped_steps(self):
        return 0.0


def test_timed_window_is_not_served_from_the_loader_backlog():
    """A loader 10x slower than the step with 12 batches queued up at the start (the ClipBERT
    config queues 24): the timed window must see the loader's rate, not the backlog."""
    depth, period, step_s, steps = 12, 0.05, 0.005, 4
    loader = _Prefetched(depth, period)
    try:
        m = bench_train.measure(_SleepyTrainer(step_s), loader, torch.device("cpu"), warmup=1,
                                steps=steps, prefetch=depth)
    finally:
        loader.close()
    assert m["drained"] == depth and m["warmup_steps"] == 1 + bench_train.SETTLE_STEPS
    wait_frac = sum(m["waits"]) / m["total"]
    assert wait_frac > 0.5, m  # data-bound: ~0.9 here; ~0 when timed on the backlog
    assert m["total"] / steps > 0.5 * period  # the loader's period per step, not the step's


def test_loader_prefetch_is_what_the_loader_holds_ahead():
    cfg = load_config(ROOT / "configs" / "clipbert_base.yaml")
    pyav = bench_train.resolve(bench_train.BY_NAME["baseline-amp"], torch.device("cpu"), 2)
    assert bench_train.loader_prefetch(pyav, cfg) == 24  # 12 workers x prefetch_factor 2
    cfg.data.num_workers = 0
    assert bench_train.loader_prefetch(pyav, cfg) == 0
    dali = bench_train.resolve(bench_train.BY_NAME["amp-dali"], torch.device("cpu"), 2)
    assert dali.loader == "dali" and bench_train.loader_prefetch(dali, cfg) == 2
    cfg.data.decode_group = 3  # DALI: prefetch_factor iterations of decode_group batches
    assert bench_train.loader_prefetch(dali, cfg) == 6


def test_skipped_toggles_keep_their_own_settings():
    """On CPU the DALI, Triton and FusedAdam toggles are skipped: their rows describe the toggle
    (what was not measured), not the fallback a siasam-fast row would use."""
    cpu = torch.device("cpu")
    rows = {}
    for name in ("amp-dali", "amp-triton", "amp-fused-adam", "amp-cudnn-benchmark", "fast-fp16",
                 "fast-bf16"):
        plan = bench_train.resolve(bench_train.BY_NAME[name], cpu, 2)
        rows[name] = bench_train.skipped_row(plan, "skipped", plan.skip or "time budget")
    for name in ("amp-dali", "amp-triton", "amp-fused-adam", "amp-cudnn-benchmark", "fast-fp16",
                 "fast-bf16"):
        assert rows[name]["reason"] and not rows[name]["notes"] and not rows[name]["substituted"]
    assert rows["amp-dali"]["loader"] == "dali"
    assert rows["amp-triton"]["siamese_impl"] == "triton"
    assert rows["amp-fused-adam"]["optimizer"] == "DeepSpeed FusedAdam"
    assert rows["amp-cudnn-benchmark"]["cudnn_benchmark"] is True
    for name in ("fast-fp16", "fast-bf16"):  # skipped (fp16 on CPU; the budget): as meant
        assert (rows[name]["loader"], rows[name]["siamese_impl"], rows[name]["optimizer"]) == (
            "dali", "triton", "DeepSpeed FusedAdam"), rows[name]
    fast = bench_train.describe(bench_train.resolve(bench_train.BY_NAME["fast-bf16"], cpu, 2))
    assert (fast["loader"], fast["siamese_impl"], fast["optimizer"]) == (  # runs: stand-ins
        "pyav", "reference", "torch AdamW")
    assert fast["substituted"] == ("pyav for DALI; reference for Triton; torch AdamW for "
                                   "FusedAdam; no cuDNN autotuning")


def _failing_fused_adam(monkeypatch):
    """build_optimizer as on a GPU whose FusedAdam JIT build fails."""
    real = bench_train.build_optimizer

    def build(model, cfg, device):
        if cfg.train.optimizer == "deepspeed":
            raise RuntimeError("Error building extension 'fused_adam'\nninja: build stopped")
        return real(model, cfg, device)

    monkeypatch.setattr(bench_train, "build_optimizer", build)


@pytest.mark.slow
def test_a_toggle_whose_subject_fails_is_skipped_not_timed_on_a_stand_in(tmp_path, monkeypatch):
    """FusedAdam's build fails: amp-fused-adam is skipped with the reason (it measured torch AdamW
    under FusedAdam's name before); a siasam-fast row falls back and says so in the table."""
    cfg, args = _tiny_setup(tmp_path)
    _failing_fused_adam(monkeypatch)
    cpu = torch.device("cpu")
    toggle = bench_train.resolve(bench_train.BY_NAME["amp-fused-adam"], cpu, 2)
    toggle.optimizer, toggle.skip = "fused", ""  # as resolved on a GPU
    row = bench_train.run_in_process(toggle, cfg, args, cpu)
    assert row["status"] == "skipped", row
    assert "FusedAdam did not load" in row["reason"] and "fused_adam" in row["reason"]
    assert row["optimizer"] == "DeepSpeed FusedAdam"

    fast = bench_train.Variant("fast-test", "siasam-fast", "baseline-amp + FusedAdam (a fast row)",
                               optimizer="fused", precision="amp", base="baseline-amp")
    plan = bench_train.resolve(fast, cpu, 2)
    plan.optimizer, plan.notes, plan.substituted = "fused", [], []  # as resolved on a GPU
    row = bench_train.run_in_process(plan, cfg, args, cpu)
    assert row["status"] == "ok", row
    assert row["optimizer"] == "torch AdamW (fused)"
    assert "torch AdamW(fused=True) for FusedAdam" in row["substituted"]
    (table,) = bench_train.table_rows([row], notes=True)
    assert "torch AdamW(fused=True) for FusedAdam" in table["notes"]


@pytest.mark.slow
def test_the_fused_adam_toggle_steps_with_deepspeeds_own_zero_grad(tmp_path, monkeypatch):
    """amp-fused-adam steps DeepSpeed's FusedAdam in the plain torch loop, whose zero_grad() takes
    no arguments (DeepSpeed 0.19): zero_grad(set_to_none=True) failed its first step on a GPU.
    FusedAdam itself needs CUDA, so its own zero_grad runs here on torch AdamW's CPU step."""
    from deepspeed.ops.adam import FusedAdam

    cfg, args = _tiny_setup(tmp_path)
    real = bench_train.build_optimizer

    class CpuFusedAdam(torch.optim.AdamW):
        zero_grad = FusedAdam.zero_grad  # DeepSpeed's: no set_to_none argument
        set_grad_none = True

    def build(model, cfg, device):
        if cfg.train.optimizer != "deepspeed":
            return real(model, cfg, device)
        cfg.train.optimizer = "torch"
        plain, _ = real(model, cfg, device)
        cfg.train.optimizer = "deepspeed"
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in plain.param_groups]
        return CpuFusedAdam(groups, lr=cfg.train.lr), "DeepSpeed FusedAdam"

    monkeypatch.setattr(bench_train, "build_optimizer", build)
    cpu = torch.device("cpu")
    toggle = bench_train.resolve(bench_train.BY_NAME["amp-fused-adam"], cpu, 2)
    toggle.optimizer, toggle.skip = "fused", ""  # as resolved on a GPU
    row = bench_train.run_in_process(toggle, cfg, args, cpu)
    assert row["status"] == "ok", row
    assert row["optimizer"] == "DeepSpeed FusedAdam"


def test_peak_table_matches_whole_model_names():
    peak = bench_train.peak_for_name
    assert peak("NVIDIA L4") == 121.0
    assert peak("NVIDIA L40") == 181.0  # not the L4's
    assert peak("NVIDIA L40S") == 362.0
    assert peak("NVIDIA H100 80GB HBM3") == 989.4
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H100 NVL") == 835.0
    assert peak("Tesla V100-PCIE-32GB") == 112.0
    assert peak("Tesla V100S-PCIE-32GB") == 130.0
    assert peak("Tesla V100-SXM2-16GB") == 125.0
    assert peak("NVIDIA A10") == 125.0 and peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("NVIDIA A10G") == 125.0
    assert peak("NVIDIA GeForce RTX 4090") is None
    assert peak("NVIDIA H200") == 989.4 and peak("NVIDIA H200 NVL") == 835.0


def test_fp32_baseline_says_it_runs_convolutions_in_tf32():
    cuda = torch.device("cuda", 0)  # resolve() only looks at the type: no GPU needed
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        plan = bench_train.resolve(bench_train.BY_NAME["baseline-fp32"], cuda, 2)
        assert bench_train.describe(plan)["precision"] == "fp32 (tf32 convs)"  # the defaults
        assert plan.precision == "fp32"  # what the trainer reads is unchanged
        torch.backends.cuda.matmul.allow_tf32 = True
        plan = bench_train.resolve(bench_train.BY_NAME["baseline-fp32"], cuda, 2)
        assert bench_train.describe(plan)["precision"] == "fp32 (tf32 convs + matmuls)"
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
        plan = bench_train.resolve(bench_train.BY_NAME["baseline-fp32"], cuda, 2)
        assert bench_train.describe(plan)["precision"] == "fp32"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    cpu = bench_train.resolve(bench_train.BY_NAME["baseline-fp32"], torch.device("cpu"), 2)
    assert bench_train.describe(cpu)["precision"] == "fp32"
    amp = bench_train.resolve(bench_train.BY_NAME["baseline-amp"], cuda, 2)
    assert bench_train.describe(amp)["precision"] == "amp-fp16"


def test_fp32_baseline_on_a_v100_says_no_tf32(monkeypatch):
    """A V100 (sm_70) has no TF32: cuDNN's allow_tf32 (True by default) changes nothing there, so
    the fp32 row is plain fp32; an A100 (sm_80) keeps the label."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    plan = bench_train.resolve(bench_train.BY_NAME["baseline-fp32"], cuda, 2)
    assert bench_train.describe(plan)["precision"] == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    plan = bench_train.resolve(bench_train.BY_NAME["baseline-fp32"], cuda, 2)
    assert bench_train.describe(plan)["precision"].startswith("fp32 (tf32 convs")


def test_partial_results_say_they_are_incomplete(tmp_path):
    """The CSV written after each variant (STEM.partial.csv; STEM.csv at the end, which drops the
    partial files) carries ``complete`` like the JSON, and the .md table a notes column (the
    reason a row did not run, or what it substituted)."""
    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml")
    args = bench_train.parse_args(["--out", str(tmp_path)])
    args.out_dir, args.stem = tmp_path, "bt"
    plan = bench_train.resolve(bench_train.BY_NAME["amp-dali"], torch.device("cpu"), 2)
    rows = [bench_train.skipped_row(plan, "skipped", "a reason | with a bar")]
    for final in (False, True):
        csv_path, md_path = bench_train.save_rows(rows, args, {"device": "cpu"}, cfg, [], final)
        assert csv_path.name == ("bt.csv" if final else "bt.partial.csv")
        with csv_path.open() as fh:
            (row,) = list(csv.DictReader(fh))
        assert row["complete"] == str(final)
        assert json.loads(csv_path.with_suffix(".json").read_text())["complete"] is final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bt.csv", "bt.json", "bt.md"]
    header, _, line = md_path.read_text().splitlines()[:3]
    assert header.endswith("| notes |") and line.endswith("| a reason / with a bar |")


def test_time_budget_expects_a_variant_to_take_what_its_base_took():
    rows = [{"variant": "baseline-fp32", "status": "ok", "wall_s": 80.0},
            {"variant": "baseline-amp", "status": "ok", "wall_s": 50.0},
            {"variant": "fast-fp16", "status": "failed", "wall_s": 5.0}]
    expect = bench_train.expected_seconds
    assert expect(bench_train.BY_NAME["amp-triton"], rows, 30) == 50.0  # its base
    assert expect(bench_train.BY_NAME["baseline-fp32"], rows, 30) == 65.0  # median of the ok rows
    assert expect(bench_train.BY_NAME["amp-triton"], [], 30) == 30  # nothing yet: the floor
    rows.append({"variant": "fast-bf16", "status": "ok", "wall_s": 35.0})
    assert expect(bench_train.BY_NAME["baseline-fp32"], rows, 30) == 50.0  # median, not mean


def test_a_variant_out_of_time_while_importing_leaves_its_stacks(tmp_path):
    """SIGUSR2 during the worker's imports (torch, DeepSpeed: seconds) dumps its stacks too: the
    handler is armed before them, not in worker_main (else SIGUSR2's default action kills the
    worker and its log is empty, though its row says the log ends with where it was)."""
    args = bench_train.parse_args(["--config", str(ROOT / "configs" / "bench_tiny.yaml"),
                                   "--out", str(tmp_path)])
    args.out_dir, args.stem = Path(args.out), "stuck"
    plan = bench_train.resolve(bench_train.BY_NAME["baseline-fp32"], torch.device("cpu"), 2)
    row = bench_train.run_isolated(plan, args, bench_train.worker_argv(args), 1.5)
    assert row["status"] == "timeout", row
    text = (tmp_path / "logs" / "stuck_baseline-fp32.log").read_text()
    assert "most recent call first" in text, text


def _fused_plans(monkeypatch):
    """resolve() as on a GPU: the siasam-fast row and the FusedAdam toggle use FusedAdam."""
    real = bench_train.resolve

    def resolve(variant, device, zero_stage):
        plan = real(variant, torch.device("cpu"), zero_stage)
        if variant.optimizer == "fused":
            plan.optimizer, plan.skip = "fused", ""
        return plan

    monkeypatch.setattr(bench_train, "resolve", resolve)


def test_a_failed_fusedadam_build_is_said_once_and_handed_to_the_variants(monkeypatch, capsys):
    """On CUDA the parent builds FusedAdam once before the variants (each variant used to build it
    inside its --variant-timeout: an H200 run lost both siasam-fast rows to it). A failed build
    is said once, with its last line, and handed to the variants through the environment."""
    _fused_plans(monkeypatch)
    # set, then deleted: monkeypatch then deletes what prebuild_fused_adam sets (a bare delenv
    # of an absent name records nothing, and the failure leaked into the tests after this one)
    monkeypatch.setenv(bench_train.FUSED_ADAM_PROBLEM_ENV, "")
    monkeypatch.delenv(bench_train.FUSED_ADAM_PROBLEM_ENV)
    calls = []

    def run(cmd, timeout):
        calls.append(cmd)
        return 1, "Traceback ...\nValueError: invalid literal for int() with base 10: '0a'\n"

    monkeypatch.setattr(bench_train, "run_build", run)
    args = bench_train.parse_args(["--config", str(ROOT / "configs" / "bench_tiny.yaml")])
    gpu = torch.device("cuda", 0)
    bench_train.prebuild_fused_adam(["baseline-fp32"], args, gpu)
    assert calls == []  # no variant wants it: no build
    bench_train.prebuild_fused_adam(["baseline-fp32", "fast-fp16", "amp-fused-adam"], args, gpu)
    assert len(calls) == 1 and "--build-fused-adam" in calls[0]
    problem = os.environ[bench_train.FUSED_ADAM_PROBLEM_ENV]
    assert "invalid literal for int() with base 10: '0a'" in problem
    out = capsys.readouterr().out
    assert "FusedAdam build failed" in out and "fast-fp16, amp-fused-adam" in out
    assert "fast-fp16 use torch AdamW(fused=True)" in out and "amp-fused-adam skipped" in out
    bench_train.prebuild_fused_adam(["fast-fp16"], args, gpu)  # said already: not again
    assert len(calls) == 1
    monkeypatch.setenv(bench_train.FUSED_ADAM_PROBLEM_ENV, "")  # only the toggle: no fast row
    bench_train.prebuild_fused_adam(["baseline-amp", "amp-fused-adam"], args, gpu)
    out = capsys.readouterr().out
    assert "amp-fused-adam skipped" in out and "AdamW" not in out.split("failed")[-1], out
    bench_train.prebuild_fused_adam(["fast-fp16"], args, torch.device("cpu"))
    assert len(calls) == 2


@pytest.mark.slow
def test_variants_told_of_a_failed_build_do_not_build_again(tmp_path, monkeypatch):
    """With the parent's failure in the environment, the siasam-fast row falls back at once and
    the toggle is skipped with that reason; DeepSpeed's FusedAdam is never asked for."""
    cfg, args = _tiny_setup(tmp_path)
    real = bench_train.build_optimizer

    def build(model, cfg, device):
        assert cfg.train.optimizer != "deepspeed", "a variant tried to build FusedAdam again"
        return real(model, cfg, device)

    monkeypatch.setattr(bench_train, "build_optimizer", build)
    monkeypatch.setenv(bench_train.FUSED_ADAM_PROBLEM_ENV, "its build failed: ValueError: '0a'")
    cpu = torch.device("cpu")
    toggle = bench_train.resolve(bench_train.BY_NAME["amp-fused-adam"], cpu, 2)
    toggle.optimizer, toggle.skip = "fused", ""  # as resolved on a GPU
    row = bench_train.run_in_process(toggle, cfg, args, cpu)
    assert row["status"] == "skipped" and "its build failed: ValueError: '0a'" in row["reason"]
    fast = bench_train.Variant("fast-test", "siasam-fast", "baseline-amp + FusedAdam (a fast row)",
                               optimizer="fused", precision="amp", base="baseline-amp")
    plan = bench_train.resolve(fast, cpu, 2)
    plan.optimizer, plan.notes, plan.substituted = "fused", [], []
    row = bench_train.run_in_process(plan, cfg, args, cpu)
    assert row["status"] == "ok" and row["optimizer"] == "torch AdamW (fused)", row
    assert "its build failed" in row["notes"], row["notes"]


def test_a_variant_out_of_time_leaves_its_stacks_in_its_log(tmp_path):
    """A timed-out isolated variant is asked for its stacks before it is killed, so that its log
    says where it was (an H200 run's two timed-out rows left only their first line)."""
    log = tmp_path / "variant.log"
    script = tmp_path / "stuck.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import bench_train\n"
        "import faulthandler\n"
        "faulthandler.register(bench_train.STACK_SIGNAL, all_threads=True)  # as a worker does\n"
        "def building_the_optimizer():\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"
        "building_the_optimizer()\n")
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env=ENV)
        deadline = time.monotonic() + 120
        while "ready" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
        t0 = time.monotonic()
        bench_train.stop_with_stacks(proc)
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < bench_train.STACK_WAIT_S + 5
    text = log.read_text()
    assert "building_the_optimizer" in text and "stuck.py" in text, text


def test_a_stuck_fusedadam_build_gets_half_the_time_budget_and_is_killed(tmp_path, monkeypatch,
                                                                         capsys):
    """A build that hangs (a stale torch-extension lock, a stuck nvcc) is stopped within half of
    what is left of --time-budget, its process group with it (no compiler left running through
    the variants' timings), and said as the variants' reason. The lock it made goes too: torch
    would make every later FusedAdam load on the machine wait for it for ever."""
    _fused_plans(monkeypatch)
    monkeypatch.setenv(bench_train.FUSED_ADAM_PROBLEM_ENV, "")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    lock = tmp_path / "ext" / "fused_adam" / "lock"
    marker = tmp_path / "compiler_still_running"
    monkeypatch.setattr(bench_train, "fused_adam_build_cmd", lambda args: [
        "bash", "-c",
        f"mkdir -p {lock.parent}; touch {lock}; (sleep 4; touch {marker}) & wait"])
    args = bench_train.parse_args(["--config", str(ROOT / "configs" / "bench_tiny.yaml"),
                                   "--time-budget", "60"])
    t0 = time.perf_counter()
    bench_train.prebuild_fused_adam(["fast-fp16"], args, torch.device("cuda", 0), t0 - 56)
    assert time.perf_counter() - t0 < 4
    assert "the build took over 2 s" in os.environ[bench_train.FUSED_ADAM_PROBLEM_ENV]
    assert not lock.exists() and f"removed {lock}" in capsys.readouterr().out
    time.sleep(5)
    assert not marker.exists()  # the build's children went with it


def test_a_multi_task_config_is_refused_with_what_to_give(capsys):
    assert bench_train.main(["--config", str(ROOT / "configs" / "tgif_pretrain.yaml")]) == 2
    assert "is a task=multi config; bench_train.py times one task's steps" in \
        capsys.readouterr().err


class _ShortBatches:
    """A loader whose epochs give only batches shorter than asked (too few examples)."""

    def __init__(self, sizes):
        self.sizes, self.epochs = sizes, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        return iter({"example_index": list(range(n))} for n in self.sizes)


def test_endless_stops_on_a_loader_that_gives_no_full_batch():
    """It looped for ever (a benchmark hung when PyAV failed every video: no examples left)."""
    with pytest.raises(RuntimeError, match="no full batch of 4 videos in epoch 0"):
        next(bench_train.endless(_ShortBatches([3]), 4))
    with pytest.raises(RuntimeError, match="no full batch"):
        next(bench_train.endless(_ShortBatches([]), 4))
    loader = _ShortBatches([4, 4, 2])
    batches = bench_train.endless(loader, 4)
    assert [len(next(batches)["example_index"]) for _ in range(5)] == [4] * 5
    assert loader.epochs == [0, 1, 2]  # epochs wrap around, the short batch dropped


def test_a_variant_process_ends_with_the_script_even_killed(tmp_path):
    """popen_own_session's child (a variant, the FusedAdam build) dies when this script is killed
    with SIGKILL (its own session keeps it from the terminal's signals: it was left running)."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path[:0] = [{str(ROOT / 'benchmarks')!r}, {str(ROOT)!r}]
import bench_train
child = bench_train.popen_own_session([sys.executable, "-c", "import time; time.sleep(120)"])
open({str(pid_file)!r}, "w").write(str(child.pid))
time.sleep(120)
"""])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(child, 0)  # running
        parent.kill()
        parent.wait()
        if not ended(child, 10):  # (reaped by init once it ends, or a zombie)
            os.kill(child, signal.SIGKILL)
            pytest.fail("the variant process outlived its killed parent")
    finally:
        parent.kill()


class _PhasedTrainer(_SleepyTrainer):
    """A trainer whose phases take distinct, known minimum times (seconds)."""

    def __init__(self, prepare_s, forward_s, backward_s, step_s):
        super().__init__(forward_s)
        self.prepare_s, self.backward_s, self.opt_s = prepare_s, backward_s, step_s

    def prepare(self, raw):
        time.sleep(self.prepare_s)
        return raw, raw, 5

    def backward(self, loss):
        time.sleep(self.backward_s)

    def step(self):
        time.sleep(self.opt_s)


def test_run_step_phases_add_up_to_the_step_and_data_includes_the_wait():
    """step_ms_synced = data + forward + backward + optimizer (the README's split): each phase is
    billed to its own column, and the data phase holds the loader wait and the preparation."""

    def slow_loader():
        while True:
            time.sleep(0.02)
            yield {}

    trainer = _PhasedTrainer(prepare_s=0.01, forward_s=0.03, backward_s=0.05, step_s=0.015)
    for timing in (False, True):
        times, _, encoded = bench_train.run_step(trainer, slow_loader(), timing=timing)
        assert encoded == 5
        parts = times["data"] + times["forward"] + times["backward"] + times["optimizer"]
        assert times["step"] == pytest.approx(parts, rel=1e-9, abs=1e-9)
        assert times["wait"] >= 0.02 and times["data"] >= times["wait"] + 0.01
        assert times["forward"] >= 0.03 and times["backward"] >= 0.05
        assert times["optimizer"] >= 0.015


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_a_rows_throughput_and_flop_columns_follow_from_its_timings(tmp_path, monkeypatch):
    """run_variant's arithmetic, on timings and FLOP counts fixed here (the real ones vary):
    videos/s and clips/s over the unsynchronised pass's mean step, the wait share of that pass,
    the phase means of the synchronised one, and achieved TFLOP/s and HFU over the step time."""
    cfg, args = _tiny_setup(tmp_path)
    args.steps = 3
    V, N = cfg.train.batch_size, cfg.sampling.num_clips
    phases = [{"wait": 0.001, "data": 0.002, "forward": 0.010, "backward": 0.030,
               "optimizer": 0.004, "step": 0.046},
              {"wait": 0.003, "data": 0.006, "forward": 0.020, "backward": 0.050,
               "optimizer": 0.008, "step": 0.084},
              {"wait": 0.002, "data": 0.004, "forward": 0.015, "backward": 0.076,
               "optimizer": 0.005, "step": 0.100}]
    timed = {"total": 0.6, "gaps": [0.1, 0.15, 0.35], "waits": [0.05, 0.15, 0.1],
             "phases": phases, "encoded": [V * 40, V * 50, V * 60, V * 70, V * 80, V * 30],
             "loss": 1.25, "skipped": 0.0, "warmup_s": 1.0, "warmup_steps": 3, "drained": 2,
             "drain_s": 0.1}
    monkeypatch.setattr(bench_train, "measure", lambda *a, **k: timed)
    monkeypatch.setattr(bench_train, "count_flops", lambda *a, **k: 6e12)
    monkeypatch.setattr(bench_train, "count_model_flops", lambda *a, **k: 4e12)
    monkeypatch.setattr(bench_train, "peak_tflops", lambda device: 100.0)
    monkeypatch.setattr(bench_train.resource, "getrusage",
                        lambda who: types.SimpleNamespace(ru_maxrss=3_000_000))
    plan = bench_train.resolve(bench_train.BY_NAME["baseline-amp"], torch.device("cpu"), 2)
    row = bench_train.run_variant(plan, cfg, args, torch.device("cpu"))
    step_s = 0.6 / 3  # the pass's total over its steps
    assert row["status"] == "ok"
    assert row["videos_per_s"] == pytest.approx(V / step_s)
    assert row["clips_per_s"] == pytest.approx(V * N / step_s)
    assert row["step_ms"] == pytest.approx(200.0)
    assert row["step_ms_p50"] == pytest.approx(150.0)  # the median of the step gaps
    assert row["data_wait_frac"] == pytest.approx(0.3 / 0.6)
    assert row["data_wait_ms_nosync"] == pytest.approx(100.0)  # mean wait per step
    assert row["step_ms_synced"] == pytest.approx(1e3 * (0.046 + 0.084 + 0.1) / 3)
    assert row["step_ms_synced_p50"] == pytest.approx(84.0)
    assert row["data_ms"] == pytest.approx(4.0)
    assert row["forward_ms"] == pytest.approx(15.0)
    assert row["backward_ms"] == pytest.approx(52.0)
    assert row["optimizer_ms"] == pytest.approx(17.0 / 3)
    assert row["tflop_per_step"] == pytest.approx(6.0)
    assert row["model_tflop_counted"] == pytest.approx(4.0)
    assert row["achieved_tflops"] == pytest.approx(6.0 / step_s)
    assert row["hfu"] == pytest.approx(6.0 / step_s / 100.0)
    assert row["peak_tflops"] == 100.0
    assert row["frames_encoded_per_video"] == pytest.approx(55.0)
    assert row["warmup_steps"] == 3 and row["drained_batches"] == 2
    # Linux gives ru_maxrss in KiB; the column is in GB (1e9 bytes), as the GPU memory columns are
    assert row["peak_host_rss_gb"] == pytest.approx(3_000_000 * 1024 / 1e9)


def test_speedups_are_each_rows_rate_over_its_references():
    rows = [{"variant": "baseline-fp32", "status": "ok", "base": "", "videos_per_s": 10.0},
            {"variant": "baseline-amp", "status": "ok", "base": "baseline-fp32",
             "videos_per_s": 20.0},
            {"variant": "amp-dedup", "status": "ok", "base": "baseline-amp", "videos_per_s": 30.0},
            {"variant": "amp-dali", "status": "skipped", "base": "baseline-amp"},
            {"variant": "fast-bf16", "status": "ok", "base": "amp-dali", "videos_per_s": 50.0}]
    bench_train.add_speedups(rows)
    by = {r["variant"]: r for r in rows}
    assert by["amp-dedup"]["speedup_vs_baseline_fp32"] == pytest.approx(3.0)
    assert by["amp-dedup"]["speedup_vs_base"] == pytest.approx(1.5)
    assert by["baseline-amp"]["speedup_vs_base"] == pytest.approx(2.0)
    assert by["baseline-fp32"]["speedup_vs_baseline_fp32"] == pytest.approx(1.0)
    assert by["baseline-fp32"]["speedup_vs_base"] == "n/a"  # no base
    assert by["fast-bf16"]["speedup_vs_base"] == "n/a"  # its base did not run
    assert by["fast-bf16"]["speedup_vs_baseline_fp32"] == pytest.approx(5.0)
    assert "speedup_vs_base" not in by["amp-dali"]


def test_table_shows_the_fractions_as_percentages():
    row = {"variant": "baseline-amp", "status": "ok", "data_wait_frac": 0.25, "mfu": 0.125,
           "hfu": "n/a", "videos_per_s": 3.0}
    (out,) = bench_train.table_rows([row])
    assert out["wait%"] == "25.0%" and out["MFU"] == "12.5%" and out["HFU"] == "n/a"
    assert out["videos/s"] == 3.0


class _CountingTrainer(_SleepyTrainer):
    """Counts its optimizer steps; the fp16 loss scaler of this one skips every step."""

    def __init__(self, step_s: float):
        super().__init__(step_s)
        self.steps = 0

    def step(self):
        self.steps += 1

    def skipped_steps(self):
        return float(self.steps)


def test_measure_counts_each_timed_step_and_only_the_timed_skips():
    def batches():
        while True:
            yield {}

    trainer = _CountingTrainer(0.002)
    m = bench_train.measure(trainer, batches(), torch.device("cpu"), warmup=1, steps=1,
                            prefetch=0)
    assert len(m["gaps"]) == 1 and m["gaps"][0] >= 0.002  # one step: one gap, its own time
    assert m["skipped"] == 2.0  # the two timed passes' steps, not the warm-up's
    m = bench_train.measure(_CountingTrainer(0.002), batches(), torch.device("cpu"), warmup=2,
                            steps=3, prefetch=0)
    assert len(m["gaps"]) == 3 and min(m["gaps"]) >= 0.002 and sum(m["gaps"]) <= m["total"]
    assert m["skipped"] == 6.0 and len(m["phases"]) == 3 and len(m["encoded"]) == 6


class _MatmulTrainer(_SleepyTrainer):
    """A forward of one [4, 8] x [8, 16] product (1024 FLOPs); ``seen``: whether its backward
    runs where FlopCounterMode sees it."""

    def __init__(self, seen: bool):
        super().__init__(0.0)
        self.seen = seen
        self.w = torch.ones(8, 16, requires_grad=True)

    def forward(self, batch, targets):
        return (torch.ones(4, 8) @ self.w).sum(), {}

    def backward(self, loss):
        if self.seen:
            loss.backward()


def test_flop_count_takes_the_backward_as_twice_the_forward_when_it_is_not_seen():
    notes = []
    assert bench_train.count_flops(_MatmulTrainer(seen=True), iter([{}]), notes) == 2048.0
    assert notes == []  # forward 1024 + the weight's gradient 1024, both seen
    assert bench_train.count_flops(_MatmulTrainer(seen=False), iter([{}]), notes) == 3072.0
    assert len(notes) == 1 and "counted as 2x the forward" in notes[0]


class _TwoLayerModule(torch.nn.Module):
    """x [4, 8] through two bias-free linear layers (8 -> 16 -> 16): a forward of 2 x 4 x 8 x 16
    + 2 x 4 x 16 x 16 = 3072 FLOPs."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 16, bias=False)
        self.second = torch.nn.Linear(16, 16, bias=False)

    def forward(self, batch):
        return {"logits": self.second(self.first(batch["x"])), "count": torch.tensor(3)}


def test_model_flops_take_the_backward_to_every_trainable_parameter():
    """count_model_flops: the forward, then the backward to every trainable parameter: the second
    layer's weight (2048 FLOPs) and its input (2048), the first layer's weight (1024); the
    input needs no gradient. A parameter frozen leaves its weight gradient out."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    module = _TwoLayerModule()
    trainer = SimpleNamespace(module=module, device=torch.device("cpu"), dtype=torch.float32,
                              text=lambda raw: {}, autocast=nullcontext)
    raw = {"x": torch.ones(4, 8)}
    notes = []
    forward = 2 * 4 * 8 * 16 + 2 * 4 * 16 * 16
    backward = 2 * 4 * 16 * 16 * 2 + 2 * 4 * 8 * 16
    assert bench_train.count_model_flops(trainer, raw, notes) == forward + backward
    module.first.weight.requires_grad_(False)  # frozen: no gradient for it, nor below layer 2
    assert bench_train.count_model_flops(trainer, raw, notes) == forward + 2 * 4 * 16 * 16
    assert notes == []


def test_speedups_are_written_only_with_every_row(tmp_path):
    """The partial files (rows so far) carry no speed-up columns: a base still to run would read
    as n/a; the finished run's files have them."""
    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml")
    args = bench_train.parse_args(["--out", str(tmp_path)])
    args.out_dir, args.stem = tmp_path, "bt"
    rows = [{"variant": "baseline-fp32", "status": "ok", "base": "", "videos_per_s": 10.0,
             "step_ms": 100.0}]
    csv_path, _ = bench_train.save_rows(rows, args, {"device": "cpu"}, cfg, [], final=False)
    with csv_path.open() as fh:
        assert "speedup_vs_base" not in next(csv.DictReader(fh))
    csv_path, _ = bench_train.save_rows(rows, args, {"device": "cpu"}, cfg, [], final=True)
    with csv_path.open() as fh:
        assert next(csv.DictReader(fh))["speedup_vs_baseline_fp32"] == "1.0"


class _LoggingTrainer(_SleepyTrainer):
    """Logs each step's forward in ``log`` (the peak-memory reset is logged there too)."""

    def __init__(self, log: list):
        super().__init__(0.0)
        self.log = log

    def forward(self, batch, targets):
        self.log.append("step")
        return torch.zeros(()), {}


def test_peak_gpu_memory_is_reset_after_the_warm_up_on_the_cuda_path(monkeypatch):
    """On CUDA the warm-up holds one-off allocations that no timed step makes (cuDNN's autotuning
    tries each algorithm with its own workspace; Triton's first launch; the loader's start):
    peak_gpu_mem_gb is the timed steps' peak, so the counter is reset once the warm-up and the
    settling steps are done (and synchronised), before the first timed step. torch.cuda stood in."""
    log: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(
        synchronize=lambda: None))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: log.append(("reset", device)))
    cuda = torch.device("cuda", 0)

    def batches():
        while True:
            yield {}

    trainer = _LoggingTrainer(log)
    bench_train.measure(trainer, batches(), cuda, warmup=2, steps=3, prefetch=1)
    untimed = 2 + bench_train.SETTLE_STEPS
    resets = [i for i, e in enumerate(log) if isinstance(e, tuple)]
    assert [log[i] for i in resets] == [("reset", cuda)], log
    (i,) = resets
    assert log[:i].count("step") == untimed and log[i - 1] == "sync", log
    assert log[i + 1:].count("step") == 2 * 3, log


def test_the_throughput_pass_ends_waiting_for_torchs_stream_not_the_whole_device(monkeypatch):
    """The unsynchronised pass is closed by a wait for torch's current stream only: a device-wide
    synchronize would also wait for DALI's prefetch of later batches on its own streams and bill
    that to the timed steps (as phase_sync leaves it out of the phases). torch.cuda stood in."""
    log: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("device"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(
        synchronize=lambda: log.append("stream")))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)

    def batches():
        while True:
            yield {}

    bench_train.measure(_LoggingTrainer(log), batches(), torch.device("cuda", 0), warmup=1,
                        steps=2, prefetch=1)
    first = [i for i, e in enumerate(log) if e == "step"]
    pass1_end = first[-2 * 2 + 1]  # the last 2 x 2 steps are the two timed passes
    after = next(e for e in log[pass1_end + 1:] if e in ("device", "stream"))
    assert after == "stream", log


def test_each_toggle_differs_from_its_base_row_in_one_setting():
    """The attribution rows: every toggle (and baseline-amp) changes exactly one of the variant's
    settings relative to the row named in its ``base``, so that ``speedup_vs_base`` is that one
    optimisation's gain (amp-dedup's de-duplicated forward embeds the question once too: its base
    is amp-question-once, not baseline-amp)."""
    import dataclasses

    settings = [f.name for f in dataclasses.fields(bench_train.Variant)
                if f.name not in ("name", "group", "description", "base")]
    for v in bench_train.VARIANTS:
        if v.group == "siasam-fast" or not v.base:
            continue
        base = bench_train.BY_NAME[v.base]
        changed = [s for s in settings if getattr(v, s) != getattr(base, s)]
        assert len(changed) == 1, (v.name, v.base, changed)
