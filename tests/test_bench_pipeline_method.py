"""How the pipeline benchmarks measure: the steady rate counts whole rounds after the warm-up
(many-worker PyAV delivers a round of batches at once), cells are sized by rounds, the caps stop
a cell where they say, every cell gives a row (skipped and failed ones too) and the partial
CSV is rewritten after each (the CSV once the run ends); bench_transcode's disk growth compares
the same videos, encoded with the originals' settings."""

import csv
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_pipeline  # noqa: E402
import bench_transcode  # noqa: E402

from siasam_fast import benchutil  # noqa: E402
from siasam_fast.benchutil import (  # noqa: E402
    MIN_STEADY_ROUNDS,
    Rounds,
    dali_rounds,
    pyav_rounds,
    steady_rate,
    stop_now,
)


def round_timeline(workers, rounds, *, start_up=3.0, batch_s=1.0, videos=4, jitter=0.01):
    """Arrival times of ``rounds`` rounds of W workers started together: worker k's batches
    arrive every ``batch_s`` after the start-up, the W batches of a round a few ms apart."""
    arrivals = [start_up + (i // workers + 1) * batch_s + (i % workers) * jitter
                for i in range(workers * rounds)]
    return arrivals, [videos] * len(arrivals)


# ------------------------------------------------------------------------------------------------
# the steady rate


@pytest.mark.parametrize("workers", [1, 2, 4, 16])
def test_steady_rate_is_the_true_rate_of_a_round_timeline(workers):
    arrivals, videos = round_timeline(workers, rounds=8)
    rounds = pyav_rounds(workers)
    steady = steady_rate(arrivals, videos, rounds)
    true_rate = workers * 4 / 1.0  # W batches of 4 videos per second
    assert steady.videos_per_s == pytest.approx(true_rate, rel=1e-9)
    assert steady.rounds == 8 - 2  # the warm-up: W x prefetch_factor (2) batches = 2 rounds
    # The old figure, (videos - first batch's) / (seconds - first batch), counts the first
    # round's W-1 batches that arrive right after the first over almost no time.
    old = (sum(videos) - videos[0]) / (arrivals[-1] - arrivals[0])
    if workers > 1:
        assert old > true_rate * 1.05  # 8 rounds: R / (R - 1); one round: unbounded


def test_steady_rate_of_one_round_is_none_as_in_runbook_run_3():
    """--workers 16 --batch-size 8 --min-videos 128 measured one round: no steady figure."""
    arrivals, videos = round_timeline(16, rounds=1)
    steady = steady_rate(arrivals, videos, pyav_rounds(16))
    assert steady.videos_per_s is None and steady.rounds == 0
    # ... and a cell is now sized for its warm-up and MIN_STEADY_ROUNDS rounds after it
    assert bench_pipeline.cell_videos(pyav_rounds(16), 8, 128) == (32 + 16 * MIN_STEADY_ROUNDS) * 8
    assert bench_pipeline.cell_videos(pyav_rounds(1), 8, 256) == 256  # --min-videos: a floor


def test_steady_rate_leaves_out_a_partial_last_round():
    arrivals, videos = round_timeline(4, rounds=6)
    whole = steady_rate(arrivals, videos, pyav_rounds(4))
    # the cap stopped the cell just after the first batch of a seventh round
    arrivals.append(arrivals[-1] + 1.0)
    videos.append(4)
    partial = steady_rate(arrivals, videos, pyav_rounds(4))
    assert partial == whole
    # a bunched arrival right after a round's end counts no time either
    arrivals[-1] = arrivals[-2] + 0.001
    assert steady_rate(arrivals, videos, pyav_rounds(4)) == whole


def test_rounds_of_the_backends():
    assert pyav_rounds(16) == Rounds(16, 32)
    assert pyav_rounds(4, prefetch_factor=3) == Rounds(4, 12)
    assert pyav_rounds(0) == Rounds(1, 1)  # in this process: the first batch is the start-up
    assert dali_rounds(1) == Rounds(1, 2)  # DALI's prefetch depth, in iterations
    assert dali_rounds(2) == Rounds(2, 4)  # a decode group arrives at once
    assert Rounds(4, 8).cell_batches() == 8 + 4 * MIN_STEADY_ROUNDS
    with pytest.raises(ValueError, match="whole rounds"):
        Rounds(4, 6)


def test_bench_rounds_use_the_loader_factories_prefetch_depth():
    backend = bench_pipeline.BACKENDS
    assert bench_pipeline.cell_rounds(backend["pyav"], 16) == Rounds(16, 32)
    assert bench_pipeline.cell_rounds(backend["dali"], 4, group=2) == Rounds(2, 4)
    assert bench_transcode.loader_rounds("pyav", 16) == Rounds(16, 32)
    assert bench_transcode.loader_rounds("dali", 4, 1) == Rounds(1, 2)


# ------------------------------------------------------------------------------------------------
# the caps


def test_soft_cap_waits_for_the_steady_rounds():
    rounds = pyav_rounds(2)  # rounds of 2 batches, warm-up 4 batches
    arrivals, _ = round_timeline(2, rounds=8, start_up=0.0, batch_s=1.0, jitter=0.0)
    stops = [n for n in range(1, len(arrivals) + 1)
             if stop_now(arrivals[:n], rounds, max_seconds=2.5)]
    # 2 + 4 rounds hold the warm-up and MIN_STEADY_ROUNDS: the first stop is at that round's end,
    # long past the soft cap, and never inside a round
    assert stops[0] == 2 * (2 + MIN_STEADY_ROUNDS)
    assert all(n % 2 == 0 for n in stops)


def test_soft_cap_stops_before_it_once_the_rounds_are_in():
    rounds = dali_rounds(1)
    arrivals = [3.0 + 0.5 * i for i in range(40)]  # DALI: start-up 3 s, then a batch each 0.5 s
    first = next(n for n in range(1, 41) if stop_now(arrivals[:n], rounds, max_seconds=9.0))
    assert arrivals[first - 1] <= 9.0 < arrivals[first - 1] + 0.5


def test_hard_cap_stops_before_a_round_that_would_overrun_it():
    rounds = pyav_rounds(16)
    # 720p without dedup: the first round arrives at 18.5 s, the next would at 37 s
    arrivals, _ = round_timeline(16, rounds=3, start_up=0.0, batch_s=18.5, jitter=0.0)
    assert not stop_now(arrivals[:15], rounds, hard_max_seconds=20.0)  # inside the round
    assert stop_now(arrivals[:16], rounds, hard_max_seconds=20.0)  # 18.5 + 18.5 > 20
    assert not stop_now(arrivals[:16], rounds, hard_max_seconds=40.0)
    assert stop_now([41.0], rounds, hard_max_seconds=40.0)  # past it: at any batch
    assert stop_now([40.0], rounds, hard_max_seconds=40.0)  # at it, too


def fake_batches(count, *, size=2, sleep=0.0, frames_dtype=torch.float16):
    for _ in range(count):
        if sleep:
            time.sleep(sleep)
        yield {"example_index": torch.arange(size),
               "frame_mask": torch.ones(size, 3, 2, dtype=torch.bool),
               "num_unique": torch.full((size,), 4),
               "frames": torch.zeros(size, 1, dtype=frames_dtype)}


def test_time_epoch_records_rounds_dtype_and_a_short_cell():
    row = bench_pipeline.time_epoch(lambda: fake_batches(3 + 4 * 2), Rounds(2, 2))
    assert row["status"] == "ok" and row["steady_rounds"] == 4 and row["batches"] == 11
    assert row["videos"] == 22 and row["out_dtype"] == "float16" and row["out_device"] == "cpu"
    assert row["transformed_per_video"] == 4 and row["stopped_by"] == "epoch"
    short = bench_pipeline.time_epoch(lambda: fake_batches(5), Rounds(2, 2))
    assert short["status"] == "short" and short["steady_rounds"] == 1
    assert "1 whole rounds" in short["reason"] and "end of the epoch" in short["reason"]
    none = bench_pipeline.time_epoch(lambda: fake_batches(2), Rounds(2, 2))
    assert none["steady_videos_per_s"] is None and "no steady rate" in none["reason"]


def test_time_epoch_hard_cap_ends_an_endless_loader():
    start = time.perf_counter()
    row = bench_pipeline.time_epoch(lambda: fake_batches(10**6, sleep=0.01), Rounds(1, 1),
                                    max_seconds=0.05, hard_max_seconds=0.3,
                                    min_steady_rounds=10**6)
    assert row["stopped_by"] == "cap" and row["status"] == "short"
    # stopped near the 0.3 s cap, not after 10**6 batches (a loaded CI machine may add a stall)
    assert row["seconds"] < 1.0 and time.perf_counter() - start < 3


def test_release_device_memory_runs_here_with_dali_imported():
    pytest.importorskip("nvidia.dali")
    import nvidia.dali.backend as dali_backend

    assert hasattr(dali_backend, "ReleaseUnusedMemory")  # present in DALI 2.4
    bench_pipeline.release_device_memory()


# ------------------------------------------------------------------------------------------------
# rows for every cell, the CSV after each


def fake_records(ok=True, codec="h264"):
    return {"v0": SimpleNamespace(ok=ok, width=32, height=24, codec=codec)}


def fake_result(videos_per_s=10.0, steady=12.0, rounds=MIN_STEADY_ROUNDS):
    return {"status": "ok" if rounds >= MIN_STEADY_ROUNDS else "short", "reason": "",
            "videos": 8, "seconds": 0.8, "videos_per_s": videos_per_s,
            "steady_videos_per_s": steady, "steady_rounds": rounds}


@pytest.mark.skipif(torch.cuda.is_available(), reason="DALI's CPU decoder: no H.264")
def test_skipped_and_failed_cells_are_rows_and_the_rest_runs(monkeypatch):
    calls = []

    def measure(backend, records, *, workers, dedup, **kwargs):
        calls.append((backend.name, workers, dedup))
        if workers == 1 and dedup:
            raise RuntimeError("decoder crashed\nsecond line")
        return fake_result()

    monkeypatch.setattr(bench_pipeline, "measure", measure)
    seen = []
    rows = bench_pipeline.run_benchmark(
        ["pyav", "dali"], [("empty", fake_records(ok=False), "h264"),
                           ("h264-set", fake_records(), "h264")],
        worker_counts=[1, 2], dali_workers=0, batch_size=2, image_size=32, min_videos=4,
        log=lambda text: None, on_row=seen.append)
    assert seen == rows
    status = [(r["set"], r["backend"], r.get("workers"), r.get("dedup"), r["status"])
              for r in rows]
    assert status == [
        ("empty", "pyav", None, None, "skipped"),
        ("empty", "dali", None, None, "skipped"),
        ("h264-set", "pyav", 1, True, "failed"),
        ("h264-set", "pyav", 2, True, "ok"),
        ("h264-set", "pyav", 1, False, "ok"),
        ("h264-set", "pyav", 2, False, "ok"),
        ("h264-set", "dali", None, None, "skipped"),
    ]
    assert rows[2]["reason"] == "RuntimeError: decoder crashed"
    assert "cannot decode h264" in rows[-1]["reason"] and "no readable" in rows[0]["reason"]
    assert len(calls) == 4  # the failing cell ended no other


def run_pipeline_main(tmp_path, monkeypatch, measure):
    out = tmp_path / "out"
    monkeypatch.setattr(bench_pipeline, "measure", measure)
    monkeypatch.setattr(bench_pipeline, "prepare_set", lambda spec, work_dir, workers:
                        fake_records())
    monkeypatch.setattr(bench_pipeline, "environment_isolated", lambda: {"device": "cpu",
                                                                         "cpu_count": 2})
    return bench_pipeline.main(["--quick", "--sets", "msrvtt-like", "--workers", "1", "2",
                                "--work-dir", str(tmp_path / "work"), "--out-dir", str(out)])


def test_main_rewrites_the_partial_csv_after_every_cell(tmp_path, monkeypatch):
    """The rows so far are in NAME.partial.csv after every cell; the finished run writes NAME.csv
    (replacing an earlier run's) and drops the partial file."""
    out = tmp_path / "out"
    csv_path = out / "pipeline_pyav_quick.csv"
    partial = out / "pipeline_pyav_quick.partial.csv"
    out.mkdir()
    csv_path.write_text("set,status\nearlier,ok\n")
    seen_before = []

    def measure(backend, records, *, workers, dedup, **kwargs):
        # the partial CSV on disk holds every cell before this one (none before the first)
        seen_before.append(len(read_rows(partial)) if partial.exists() else 0)
        assert csv_path.read_text() == "set,status\nearlier,ok\n"  # until the run ends
        if workers == 2 and not dedup:
            raise ValueError("boom")
        return fake_result(steady=None if workers == 2 else 12.0, rounds=0 if workers == 2 else 4)

    assert run_pipeline_main(tmp_path, monkeypatch, measure) == 0
    assert seen_before == [0, 1, 2, 3]
    rows = read_rows(csv_path)
    assert [(r["workers"], r["dedup"], r["status"]) for r in rows] == [
        ("1", "True", "ok"), ("2", "True", "short"), ("1", "False", "ok"),
        ("2", "False", "failed")]
    assert rows[-1]["reason"] == "ValueError: boom" and rows[0]["device"] == "cpu"
    assert [p.name for p in out.iterdir()] == [csv_path.name]  # no partial or temp file


def test_main_stopped_by_ctrl_c_keeps_the_earlier_csv(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the third cell: exit 130, the two measured rows in NAME.partial.csv, an earlier
    finished NAME.csv as it was; Ctrl-C before any cell leaves no partial file."""
    out = tmp_path / "out"
    out.mkdir()
    csv_path = out / "pipeline_pyav_quick.csv"
    csv_path.write_text("set,status\nearlier,ok\n")
    cells = []

    def measure(backend, records, *, workers, dedup, **kwargs):
        cells.append(workers)
        if len(cells) == 3:
            raise KeyboardInterrupt
        return fake_result()

    assert run_pipeline_main(tmp_path, monkeypatch, measure) == 130
    err = capsys.readouterr().err
    assert "interrupted: the rows measured so far are in" in err and "Traceback" not in err
    assert csv_path.read_text() == "set,status\nearlier,ok\n"
    partial = out / "pipeline_pyav_quick.partial.csv"
    assert [r["workers"] for r in read_rows(partial)] == ["1", "2"]

    partial.unlink()

    def stop_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    assert run_pipeline_main(tmp_path, monkeypatch, stop_at_once) == 130
    assert "interrupted before the first measurement" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [csv_path.name]


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_csv_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.csv"
    benchutil.write_csv([{"a": 1}], path)

    def torn(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", torn)
    with pytest.raises(OSError):
        benchutil.write_csv([{"a": 2}, {"a": 3}], path)
    assert path.read_text().splitlines() == ["a", "1"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


# The fields of a summary row that the tests do not vary.
SUMMARY_CELL = {"set": "s", "resolution": "x", "threads": "", "group": "", "trim": "",
                "batch_size": 8, "decoder": "gpu"}


def test_summary_compares_steady_rates_and_flags_short_cells():
    base = SUMMARY_CELL
    rows = [
        {**base, "backend": "pyav", "workers": 16, "dedup": True, **fake_result(50, 20)},
        {**base, "backend": "pyav", "workers": 4, "dedup": True, **fake_result(30, 10)},
        {**base, "backend": "pyav", "workers": 16, "dedup": False, **fake_result(5, None, 0)},
        {**base, "backend": "dali", "workers": 4, "threads": 8, "group": 1, "trim": False,
         "dedup": True, **fake_result(30, 90, 2)},
        {**base, "backend": "dali", "workers": 4, "dedup": False, "status": "skipped"},
    ]
    lines = bench_pipeline.summary_lines(rows)
    compare = [line for line in lines if "the best pyav" in line]
    # on the steady rates (90 / 20), not the overall ones (30 / 50); DALI's cell is short
    assert len(compare) == 1 and "4.50x the best pyav (16 workers)" in compare[0]
    assert "start-up bound" in compare[0]
    assert any("dedup speed-up not measured" in line and "pyav 16 workers dedup=False" in line
               for line in lines)
    assert bench_pipeline.start_up_bound(rows[3]) and not bench_pipeline.start_up_bound(rows[0])


# ------------------------------------------------------------------------------------------------
# bench_transcode


def test_growth_compares_the_same_videos():
    def rec(size, ok=True):
        return SimpleNamespace(size=size, ok=ok)

    original = {"a": rec(100), "b": rec(100), "c": rec(100), "d": rec(50, ok=False)}
    copy = {"a": rec(150), "b": rec(170)}  # c's transcode failed, d was corrupt
    ratio, compared = bench_transcode.growth(copy, original)
    assert compared == 2 and ratio == pytest.approx(320 / 200)
    assert bench_transcode.growth({}, original) == (None, 0)
    # against a control whose copy of b failed: b counts on neither side
    control = {"a": rec(120), "c": rec(130)}
    full_copy = {"a": rec(150), "b": rec(170), "c": rec(140)}
    assert bench_transcode.growth(full_copy, control) == (pytest.approx(290 / 250), 2)
    assert bench_transcode.set_bytes(original) == 300  # the ok videos only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour (no DALI)")
def test_transcode_bench_copies_like_the_originals_and_records_every_cell(tmp_path,
                                                                         monkeypatch):
    """Tiny videos: the copies and the control are made with the generator's preset, B-frames
    and CRF; a copy that lost a video is compared on the others; DALI without a GPU gives
    skipped rows; the CSV holds the disk rows first, then every cell."""
    calls = []
    real_transcode, real_load = bench_transcode.transcode, bench_transcode.load_manifest

    def transcode(src, dst, **kwargs):
        calls.append((Path(dst).name, kwargs))
        return real_transcode(src, dst, progress=False, **kwargs)

    def load_manifest(path):  # the GOP-8 copy of video1 "failed"
        records = real_load(path)
        if "gop8" in str(path):
            records.pop("video1")
        return records

    monkeypatch.setattr(bench_transcode, "original_set",
                        lambda quick, *a: bench_pipeline.VideoSet("tiny", 64, 48, 2, 40, gop=20))
    monkeypatch.setattr(bench_transcode, "transcode", transcode)
    monkeypatch.setattr(bench_transcode, "load_manifest", load_manifest)
    monkeypatch.setattr(bench_transcode, "environment_isolated",
                        lambda: {"device": "cpu", "cpu_count": 2})
    out = tmp_path / "out"
    status = bench_transcode.main([
        "--quick", "--gops", "8", "--samplings", "paper", "--backend", "dali", "--workers", "0",
        "--draws", "2", "--measure-draws", "2", "--min-videos", "2", "--batch-size", "2",
        "--image-size", "16", "--encoder", "cpu", "--work-dir", str(tmp_path / "work"),
        "--out-dir", str(out)])
    assert status == 0
    assert [name for name, _ in calls] == ["tiny-gop8-libx264-veryfast",
                                           "tiny-gop20-libx264-veryfast"]
    for _, kwargs in calls:
        assert kwargs["preset"] == "veryfast" and kwargs["bframes"] == 3 and kwargs["crf"] == 23
    rows = read_rows(out / "transcode_quick.csv")
    assert (out / "transcode_quick.png").stat().st_size > 1000  # (issue 7: a table, CSV, PNG)
    disk = {r["set"]: r for r in rows if r["status"] == "disk"}
    assert list(disk) == ["gop20 (original)", "gop8",
                          "gop20 (control: re-encoded like the copies)"]
    original = real_load(tmp_path / "work" / "tiny" / "manifest.jsonl")
    copy = real_load(tmp_path / "work" / "tiny-gop8-libx264-veryfast" / "manifest.jsonl")
    assert disk["gop8"]["compared_videos"] == "1"  # video0 only, on both sides
    assert float(disk["gop8"]["growth"]) == pytest.approx(copy["video0"].size
                                                          / original["video0"].size)
    assert disk["gop8"]["failed_transcodes"] == "0" and disk["gop8"]["preset"] == "veryfast"
    cells = [(r["set"], r["backend"], r["status"]) for r in rows if r["status"] != "disk"]
    assert cells == [("gop20 (original)", "dali", "skipped"), ("gop20 (original)", "pyav", "ok"),
                     ("gop8", "dali", "skipped"), ("gop8", "pyav", "ok")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all("no CUDA GPU" in r["reason"] for r in skipped)
    for r in rows:  # the measured ratio: on the model's very draws (--measure-draws = --draws)
        if r["status"] == "ok":
            assert r["model_exact"] == "True"
            measured = float(r["measured_decoded_per_needed"])
            assert measured == pytest.approx(float(r["model_decoded_per_needed"]))
            assert measured > 1  # decoded per needed: the pre-roll from each keyframe
    assert float(disk["gop8"]["transcode_s"]) > 0 and disk["gop8"]["cached_copies"] == "0"
    # Again: the copies are cached, so this run encoded nothing and has no time of its own (it
    # reported the cache check's 0.1 s as the copy's transcode_s)
    assert bench_transcode.main([
        "--quick", "--gops", "8", "--samplings", "paper", "--backend", "pyav", "--workers", "0",
        "--draws", "2", "--measure-draws", "2", "--min-videos", "2", "--batch-size", "2",
        "--image-size", "16", "--encoder", "cpu", "--work-dir", str(tmp_path / "work"),
        "--out-dir", str(out)]) == 0
    again = {r["set"]: r for r in read_rows(out / "transcode_quick.csv") if r["status"] == "disk"}
    assert again["gop8"]["transcode_s"] == "" and again["gop8"]["cached_copies"] == "2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour (no DALI)")
def test_transcode_bench_stopped_by_ctrl_c_keeps_the_earlier_csv(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the first throughput cell: exit 130, the disk rows (written first) in the
    partial CSV, an earlier finished CSV as it was."""
    monkeypatch.setattr(bench_transcode, "original_set",
                        lambda quick, *a: bench_pipeline.VideoSet("tiny", 64, 48, 2, 40, gop=20))
    monkeypatch.setattr(bench_transcode, "environment_isolated",
                        lambda: {"device": "cpu", "cpu_count": 2})

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_transcode, "loader_rate", stopped)
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "transcode_quick.csv"
    earlier.write_text("set,status\nearlier,ok\n")
    status = bench_transcode.main([
        "--quick", "--gops", "8", "--samplings", "paper", "--workers", "1", "--no-control",
        "--draws", "2", "--measure-draws", "1", "--min-videos", "2", "--batch-size", "2",
        "--image-size", "16", "--encoder", "cpu", "--work-dir", str(tmp_path / "work"),
        "--out-dir", str(out)])
    assert status == 130
    assert "interrupted: the rows measured so far are in" in capsys.readouterr().err
    assert earlier.read_text() == "set,status\nearlier,ok\n"
    assert not (out / "transcode_quick.png").exists()
    rows = read_rows(out / "transcode_quick.partial.csv")
    assert [(r["set"], r["status"]) for r in rows] == [("gop20 (original)", "disk"),
                                                      ("gop8", "disk")]


def test_prepare_set_generates_in_parallel_the_videos_it_makes_one_by_one(tmp_path, monkeypatch):
    """Several workers generate the same videos (the same decoded frames per seed) as one worker
    does, in a pool of spawned processes, and leave no partial file (an H200 run spent 55 s
    making 8 videos one by one)."""
    import concurrent.futures as cf

    import av

    pools = []

    class Pool(cf.ProcessPoolExecutor):
        def __init__(self, max_workers=None, mp_context=None, **kwargs):
            pools.append((max_workers, mp_context.get_start_method()))
            super().__init__(max_workers, mp_context, **kwargs)

    monkeypatch.setattr(cf, "ProcessPoolExecutor", Pool)
    spec = bench_pipeline.VideoSet("tiny-par", 64, 48, 3, 12, 25, 6, "h264")

    def frames(path):
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

    one = bench_pipeline.prepare_set(spec, tmp_path / "one", workers=1)
    assert pools == []  # one worker: in this process
    many = bench_pipeline.prepare_set(spec, tmp_path / "many", workers=3)
    assert pools == [(3, "spawn")]  # spawn: safe after CUDA or DALI started in the caller
    assert sorted(one) == sorted(many) and len(many) == 3
    for vid in one:
        a, b = frames(one[vid].path), frames(many[vid].path)
        assert len(a) == len(b) == 12, vid
        # The same content, not always the same bytes: at 64 px libx264's macroblock-tree rate
        # control is not bit-reproducible from run to run (a CI run decoded other pixels from the
        # same seed). Re-encoding one seed's frames differently (crf 22, mbtree off) moves a frame
        # by 5 to 7 grey levels on average; another seed's video is about 47 away.
        diff = [np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b)]
        assert max(diff) < 12, (vid, diff)
    folder = tmp_path / "many" / spec.folder_name
    assert not list(folder.glob("*.partial*"))


def test_generated_sets_take_another_length_and_keyframe_spacing(monkeypatch):
    """--frames / --gop: long videos (real MSRVTT clips run 10-30 s, ActivityNet videos minutes),
    cached under names of their own; --sets still picks them by their plain names."""
    plain = bench_pipeline.video_sets(False, "vp9")
    long = bench_pipeline.video_sets(False, "vp9", frames=1800, gop=250)
    assert [s.name for s in long] == ["msrvtt-like-gop250-1800f", "activitynet-like-gop250-1800f"]
    assert all(s.num_frames == 1800 and s.gop == 250 and s.codec == "vp9" for s in long)
    assert [(s.width, s.height, s.num_videos) for s in long] == \
        [(s.width, s.height, s.num_videos) for s in plain]
    assert bench_pipeline.video_sets(True, frames=150) == bench_pipeline.video_sets(True)
    assert len({s.folder_name for s in [*plain, *long]}) == 4
    args = bench_pipeline.build_parser().parse_args(["--frames", "900", "--gop", "16"])
    assert (args.frames, args.gop, args.dali_trim) == (900, 16, "on")


def test_summary_flags_the_cells_below_the_runs_min_steady_rounds(tmp_path, monkeypatch, capsys):
    """--min-steady-rounds decides which cells are short, and the summary's flag follows it: a
    cell of 2 whole rounds is ok (no flag) under --min-steady-rounds 2, one of 5 is short (and
    flagged) under 8."""
    for min_rounds, rounds, flagged in ((2, 2, False), (8, 5, True)):
        def measure(backend, records, *, workers, dedup, min_steady_rounds, want=min_rounds,
                    held=rounds, **kwargs):
            assert min_steady_rounds == want
            status = "ok" if held >= min_steady_rounds else "short"
            return {**fake_result(steady=20.0 if dedup else 10.0, rounds=held), "status": status}

        monkeypatch.setattr(bench_pipeline, "measure", measure)
        monkeypatch.setattr(bench_pipeline, "prepare_set", lambda spec, work_dir, workers:
                            fake_records())
        monkeypatch.setattr(bench_pipeline, "environment_isolated",
                            lambda: {"device": "cpu", "cpu_count": 2})
        out = tmp_path / f"out{min_rounds}"
        assert bench_pipeline.main(["--quick", "--sets", "msrvtt-like", "--workers", "1",
                                    "--min-steady-rounds", str(min_rounds),
                                    "--work-dir", str(tmp_path / "work"),
                                    "--out-dir", str(out)]) == 0
        rows = read_rows(out / "pipeline_pyav_quick.csv")
        assert {r["status"] for r in rows} == {"ok" if not flagged else "short"}
        (line,) = [line for line in capsys.readouterr().out.splitlines()
                   if "dedup is 2.00x faster" in line]
        assert ("start-up bound" in line) == flagged, line
        if flagged:
            assert f"fewer than {min_rounds} whole rounds" in line


def test_bench_examples_are_whole_passes_holding_at_least_min_videos():
    records = {f"v{i}": SimpleNamespace(ok=i != 2) for i in range(5)}  # v2 unreadable: 4 ok
    examples = bench_pipeline.bench_examples(records, 10)
    assert len(examples) == 12  # 3 whole passes over the 4 ok videos: 10 rounded up
    assert [e.video_id for e in examples[:4]] == ["v0", "v1", "v3", "v4"]
    assert len(bench_pipeline.bench_examples(records, 8)) == 8
    assert len(bench_pipeline.bench_examples(records, 1)) == 4  # one pass at least


def test_time_epoch_rates_are_per_second_of_the_epoch(monkeypatch):
    """Videos, output clip frames (the mask's true entries, padding left out) and transformed
    frames (num_unique) per second of the same epoch; the first batch's arrival; CPU seconds
    per wall second."""
    cpu = iter([100.0, 103.0])  # this process and its children: 3 CPU seconds over the epoch
    monkeypatch.setattr(bench_pipeline, "cpu_seconds", lambda: next(cpu))

    def batches():
        for i in range(6):
            if i:  # the first batch at once, the others 20 ms apart
                time.sleep(0.02)
            mask = torch.ones(3, 2, 4, dtype=torch.bool)
            mask[:, :, 3] = False  # padding: 3 x 2 x 3 = 18 clip frames per batch
            yield {"example_index": torch.arange(3), "frame_mask": mask,
                   "num_unique": torch.full((3,), 5), "frames": torch.zeros(3, 1)}

    row = bench_pipeline.time_epoch(batches, Rounds(1, 1))
    seconds = row["seconds"]
    assert row["videos"] == 18 and row["batches"] == 6
    assert row["videos_per_s"] == pytest.approx(18 / seconds)
    assert row["frames_per_s"] == pytest.approx(6 * 18 / seconds)
    assert row["transformed_per_s"] == pytest.approx(6 * 15 / seconds)
    assert row["transformed_per_video"] == pytest.approx(5.0)
    assert row["cpu_util"] == pytest.approx(3.0 / seconds)
    assert 0 <= row["first_batch_s"] <= seconds - 0.1  # 5 batches of 20 ms came after it
    assert row["steady_rounds"] == 5 and row["steady_s"] <= seconds


def test_summary_compares_the_best_cells_the_right_way_round():
    base = SUMMARY_CELL
    rows = [
        {**base, "backend": "pyav", "workers": 4, "dedup": True, **fake_result(10, 30)},
        {**base, "backend": "pyav", "workers": 4, "dedup": False, **fake_result(10, 15)},
        {**base, "backend": "pyav", "workers": 8, "dedup": True, **fake_result(10, 40, 2)},
        # without dedup, faster than every dedup pyav cell: not the dali comparison's reference
        {**base, "backend": "pyav", "workers": 16, "dedup": False, **fake_result(10, 100)},
        {**base, "backend": "dali", "workers": 2, "dedup": True, **fake_result(10, 60)},
        {**base, "backend": "dali", "workers": 4, "dedup": True, **fake_result(10, 120)},
        # failed and skipped cells are not compared, whatever they hold
        {**base, "backend": "dali", "workers": 8, "dedup": True, "status": "failed",
         "steady_videos_per_s": 900.0, "steady_rounds": 9},
    ]
    lines = bench_pipeline.summary_lines(rows)
    (dedup,) = [line for line in lines if "dedup is" in line]
    assert "4 workers: dedup is 2.00x faster" in dedup and "start-up bound" not in dedup
    (compare,) = [line for line in lines if "the best pyav" in line]
    # the best dali (120, 4 workers) against the best dedup pyav (40, 8 workers, short)
    assert "3.00x the best pyav (8 workers)" in compare and "120.0 / 40.0" in compare
    assert "start-up bound" in compare  # the pyav side is short
    rows[2]["steady_rounds"] = MIN_STEADY_ROUNDS
    rows[1]["steady_rounds"] = 1  # one side of the dedup pair short: flagged
    lines = bench_pipeline.summary_lines(rows)
    assert "start-up bound" in next(line for line in lines if "dedup is" in line)
    assert "start-up bound" not in next(line for line in lines if "the best pyav" in line)
    assert bench_pipeline.start_up_bound({}) and bench_pipeline.start_up_bound(
        {"steady_rounds": ""})  # no count (an older CSV): not trusted


def test_transcode_hard_cap_defaults_to_three_times_the_soft_cap(tmp_path, monkeypatch):
    seen = {}

    def stopped(*args, hard_max_seconds=None, max_seconds=None, **kwargs):
        seen.update(hard=hard_max_seconds, soft=max_seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_transcode, "original_set",
                        lambda quick, *a: bench_pipeline.VideoSet("tiny", 64, 48, 2, 40, gop=20))
    monkeypatch.setattr(bench_transcode, "environment_isolated",
                        lambda: {"device": "cpu", "cpu_count": 2})
    monkeypatch.setattr(bench_transcode, "loader_rate", stopped)
    status = bench_transcode.main([
        "--quick", "--gops", "8", "--samplings", "paper", "--workers", "1", "--no-control",
        "--draws", "1", "--measure-draws", "1", "--max-seconds", "2.5", "--image-size", "16",
        "--encoder", "cpu", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path)])
    assert status == 130 and seen == {"hard": 7.5, "soft": 2.5}


def test_pipeline_hard_cap_defaults_to_three_times_the_soft_cap(tmp_path, monkeypatch):
    seen = []

    def measure(backend, records, *, max_seconds, hard_max_seconds, **kwargs):
        seen.append((max_seconds, hard_max_seconds))
        return fake_result()

    monkeypatch.setattr(bench_pipeline, "measure", measure)
    monkeypatch.setattr(bench_pipeline, "prepare_set", lambda spec, work_dir, workers:
                        fake_records())
    monkeypatch.setattr(bench_pipeline, "environment_isolated", lambda: {"device": "cpu",
                                                                         "cpu_count": 2})
    assert bench_pipeline.main(["--quick", "--sets", "msrvtt-like", "--workers", "1",
                                "--max-seconds", "2.5", "--work-dir", str(tmp_path / "work"),
                                "--out-dir", str(tmp_path)]) == 0
    assert seen and set(seen) == {(2.5, 7.5)}


def test_anchor_choices_are_the_effective_number_of_starts_of_the_ok_videos():
    ok = SimpleNamespace(ok=True, num_frames=300, keyframes=[0, 100, 200])
    bad = SimpleNamespace(ok=False, num_frames=250, keyframes=[0, 100, 200])
    # the paper's anchor is uniform over the 100 starts of a 300-frame video: exp(H) = 100
    assert bench_transcode.anchor_choices({"a": ok, "b": bad}, bench_transcode.PAPER) == (
        pytest.approx(100.0))
    assert math.isnan(bench_transcode.anchor_choices({"b": bad}, bench_transcode.PAPER))


def test_transcode_dali_rounds_are_decode_groups():
    assert bench_transcode.loader_rounds("dali", 4, 2) == Rounds(2, 4)


def test_decode_ratios_are_exact_only_when_the_model_matched_every_decode(monkeypatch):
    """model_exact: every draw's modelled decode count equals the decoder's, with no restart;
    the ratio is decoded frames over needed frames of all the draws."""
    records = {"a": SimpleNamespace(ok=True, num_frames=300, keyframes=[0, 100, 200]),
               "b": SimpleNamespace(ok=False, num_frames=300, keyframes=[0])}
    decoded = []
    case = {}

    def decode(record, frames, stats):
        assert record.ok
        stats.decoded, stats.restarts = len(frames) + 3, case["restarts"]
        decoded.append(stats.decoded)

    def model(keyframes, frames):
        return SimpleNamespace(decoded=len(frames) + 3 + case["off_by"])

    monkeypatch.setattr(bench_transcode, "decode_frames", decode)
    monkeypatch.setattr(bench_transcode, "decode_cost", model)
    for off_by, restarts, exact in ((0, 0, True), (1, 0, False), (-1, 0, False), (0, 1, False)):
        decoded.clear()
        case.update(off_by=off_by, restarts=restarts)
        out = bench_transcode.decode_ratios(records, bench_transcode.PAPER, draws=3)
        assert out["model_exact"] is exact, case
        assert len(decoded) == 3  # the ok video's draws only
        needed = sum(n - 3 for n in decoded)
        assert out["measured_decoded_per_needed"] == pytest.approx(sum(decoded) / needed)


def test_transcode_bench_passes_each_dali_cell_its_own_trim():
    """DALI's loader trims by default: a whole-file cell must say trim=False to it, and a cell
    asked to trim must not measure a loader that turned trimming off (its NVDEC check failed)."""
    calls = []

    def factory(*args, trim=True, **kwargs):
        calls.append({"trim": trim, **kwargs})
        return SimpleNamespace(trim=trim and kwargs.get("nvdec_trims", True))

    bench_transcode.dali_cell_factory(factory, 1, False)("examples", num_workers=0)
    bench_transcode.dali_cell_factory(factory, 2, True)("examples", num_workers=0)
    assert calls == [{"trim": False, "decode_group": 1, "num_workers": 0},
                     {"trim": True, "decode_group": 2, "num_workers": 0}]
    with pytest.raises(RuntimeError, match="--dali-trim off"):
        bench_transcode.dali_cell_factory(factory, 1, True)("examples", nvdec_trims=False)


def test_copies_with_nvenc_keep_transcodes_nvenc_worker_default(tmp_path, monkeypatch):
    # A GeForce runs only a few NVENC sessions at once: the copies leave the worker count to
    # transcode (4 with NVENC, all CPUs without), never one process per CPU with NVENC.
    class Stop(BaseException):
        pass

    calls = []

    def fake_transcode(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    folder = tmp_path / "original"
    monkeypatch.setattr(bench_transcode, "prepare_set", lambda *a, **k: {
        "v": SimpleNamespace(path=str(folder / "v.mp4"))})
    monkeypatch.setattr(bench_transcode, "choose_encoder", lambda *a: ("h264_nvenc", True))
    monkeypatch.setattr(bench_transcode, "transcode", fake_transcode)
    with pytest.raises(Stop):
        bench_transcode.main(["--quick", "--work-dir", str(tmp_path), "--out-dir",
                              str(tmp_path / "out")])
    assert calls and calls[0]["workers"] is None
