"""One-shot GPU check of the DALI backend (issue 5): correctness on NVDEC, then throughput.

    python scripts/gpu_check_dali.py [--out DIR] [--skip-bench]

Run from the repository root on a CUDA machine with nvidia-dali and PyAV importable (for example
installed with ``pip install --target DIR`` from staged wheels and DIR on PYTHONPATH). Sections,
each reported as ``PASS`` / ``FAIL`` / ``SKIP`` with its own time; an exception fails its section
and the script goes on:

1. environment: versions, GPU, that DALI's mixed video decoder is there;
2. H.264 fixtures with B-frames (GOP 12 with 3 B-frames, variable frame rate, GOP 100), whose
   frames show their own index (tests/videos.py), and their manifest;
3. exact frames through ``device="gpu"`` (NVDEC): every sampled frame index, dedup on / off, frames
   and clips, three epochs, a decode group of 2 batches, trimmed files (``trim=True``: only the
   stretch the frames need, remuxed by PyAV), with 2 reader processes (spawned: CUDA is
   initialised); 3b: a clip cut without re-encoding (frames hidden by an mp4 edit list), whole
   and trimmed;
4. fp16 frames on the device through DLPack without a copy: dtype, device, torch's allocator
   untouched, the pointer is device memory (CuPy, where installed), no device-to-host copy in a
   profiled batch;
5. pixels against the PyAV backend (grey content: resize / crop / normalise; NVDEC converts YUV to
   RGB its own way, so the bound is looser than on the CPU);
6. a stream damaged after indexing (same size and mtime): skipped with a warning, its examples get
   stand-ins (the next example), every batch stays full and the epoch goes on (in a subprocess:
   a decoder crash must not end the check); 6b: what NVDEC refuses (codec, pixel format, frame
   size: 4:4:4, 10-bit and 4:2:2 H.264, H.264 under 48 px, HEVC 4:4:4 and under 144 px, VP9
   4:4:4 and under 128 px, AV1, MJPEG) against ``siasam_fast/pipeline/nvdec.py``'s table, each video
   decoded by the DALI loader beside a control it stands in for (in a subprocess too);
7. the throughput comparison of benchmarks/bench_pipeline.py on the activitynet-like (1280x720,
   first) and msrvtt-like (320x240) H.264 sets, batches of 8: pyav with 1, 4, 16 workers and
   dali, dedup on; pyav with 16 workers and dali, dedup off; then dali with 4 and 16 threads
   (dedup on) against its default of one thread per video, dali decoding two batches per
   iteration (``decode_group=2``, 16 threads), and dali on whole files (groups of 1 and 2; the
   other DALI cells trim, the loader's default).
   Cells are sized by rounds (a warm-up of the batches queued at the start, then 4 whole rounds:
   one batch per PyAV worker, one DALI iteration; at least 256 videos) and compared on
   ``steady_videos_per_s`` (whole rounds after the warm-up); a soft cap of 9 s ends a cell that
   holds its rounds, a hard cap (45 s for dedup on, 20 s for dedup off, 27 s for DALI's variants)
   any other, flagged ``short``. Every cell gives a row (``status`` ok / short / skipped /
   failed, with a ``reason``; a failing cell ends no other), and the CSV is rewritten after
   each one, so a run cut short keeps what finished. ``device_mem_mb`` is taken against a fresh
   baseline per cell (DALI's pools and torch's cache emptied first).

A summary of the sections and the benchmark table are printed last. Sized for an H100 host
(16 cores) to finish in about 5 minutes; ``--skip-bench`` stops after section 6.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

RESULTS: list[tuple[str, str, float, str]] = []  # (section, status, seconds, detail)


def section(name: str):
    """Run the decorated function now as a section; record PASS / FAIL / SKIP."""

    def run(fn):
        print(f"\n=== {name}", flush=True)
        start = time.perf_counter()
        try:
            detail = fn() or ""
            status = "PASS"
            if isinstance(detail, tuple):
                status, detail = detail
        except Exception as err:  # noqa: BLE001 - a failed section must not stop the others
            traceback.print_exc()
            status, detail = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300]
        seconds = time.perf_counter() - start
        RESULTS.append((name, status, seconds, detail))
        print(f"{status} {name} ({seconds:.1f} s) {detail}", flush=True)
        return fn

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSV and a JSON log")
    parser.add_argument("--skip-bench", action="store_true", help="correctness sections only")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--nvdec-table", type=Path, default=None,
                        help="only section 6b's comparison, its videos in this folder")
    args = parser.parse_args()
    if args.nvdec_table:
        print(check_nvdec_table(args.nvdec_table), flush=True)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_dali_"))
    work.mkdir(parents=True, exist_ok=True)
    state: dict = {}

    @section("1 environment")
    def _():
        import av
        import nvidia.dali
        import torch
        from nvidia.dali import fn

        assert torch.cuda.is_available(), "torch sees no CUDA device"
        assert hasattr(fn.decoders, "video"), "this DALI has no fn.decoders.video"
        state["torch"] = torch
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), DALI {nvidia.dali.__version__}"
            f", PyAV {av.__version__}, {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
        )

    if "torch" not in state:
        return summary(args.out)

    @section("2 H.264 fixtures with B-frames")
    def _():
        from videos import write_index_video

        from siasam_fast.pipeline.manifest import build_manifest

        folder = work / "h264"
        folder.mkdir(exist_ok=True)
        write_index_video(folder / "bframes.mp4", 160, codec="h264", size=64, gop=12, bframes=3)
        write_index_video(folder / "vfr.mp4", 120, codec="h264", size=64, gop=10, bframes=2,
                          vfr=True)
        write_index_video(folder / "long_gop.mp4", 300, codec="h264", size=64, gop=100,
                          bframes=3)
        write_index_video(folder / "hd.mp4", 90, codec="h264", size=(256, 448), gop=30,
                          bframes=3)
        manifest = build_manifest(folder, folder / "manifest.jsonl", workers=4, progress=False)
        bad = [vid for vid, r in manifest.items() if not r.ok]
        assert not bad, f"fixtures not ok in the manifest: {bad}"
        state["manifest"] = manifest
        return ", ".join(f"{v}: {r.num_frames} frames, keyframes {r.keyframes[:4]}..."
                         for v, r in sorted(manifest.items()))

    @section("3 exact frames on NVDEC (device='mixed')")
    def _():
        from siasam_fast.pipeline.dali import build_dali_loader
        from siasam_fast.sampling import SamplingConfig, example_rng, sample_siamese_clips

        manifest = state["manifest"]
        cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)
        names = ["bframes", "vfr", "long_gop"] * 3
        checked = 0
        for dedup, output, group, trim in ((True, "clips", 1, False), (False, "clips", 1, False),
                                           (True, "frames", 1, False), (True, "clips", 2, False),
                                           (True, "clips", 1, True), (False, "clips", 1, True)):
            loader = build_dali_loader(
                examples_for(names), manifest, cfg, "train", 3, image_size=32, device="gpu",
                num_workers=2, dedup=dedup, output=output, seed=11, decode_group=group,
                trim=trim,
            )
            if trim and not loader.trim:  # the loader's own NVDEC check turned trimming off
                from siasam_fast.pipeline.dali_check import gpu_trims_exactly

                raise AssertionError("trimmed files were not checked: the loader's check of "
                                     f"trimmed decoding failed: {gpu_trims_exactly(0)[1]}")
            three = dedup and output == "clips" and group == 1
            for epoch in range(3 if three else 1):
                loader.set_epoch(epoch)
                for batch in loader:
                    checked += check_frames(batch, dedup)
                    for v, index in enumerate(batch["example_index"].tolist()):
                        record = manifest[names[index]]
                        want = sample_siamese_clips(
                            record.num_frames, cfg, example_rng(11, epoch, index)
                        )
                        assert batch["frame_ids"][v].tolist() == want.clips.tolist()
            assert not loader.skipped, loader.skipped
        return f"{checked} frame indices read back, all equal to the sampler's"

    @section("3b a clip cut without re-encoding (mp4 edit list) on NVDEC")
    def _():
        return check_cut_clip(work / "cut", "gpu", "h264")

    @section("4 fp16 on the device, DLPack without a copy")
    def _():
        import torch

        from siasam_fast.pipeline.dali import build_dali_loader
        from siasam_fast.sampling import SamplingConfig

        cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)
        loader = build_dali_loader(
            examples_for(["hd", "bframes", "vfr", "long_gop"] * 3), state["manifest"], cfg,
            "train", 4, image_size=224, device="gpu", num_workers=0,
        )
        it = iter(loader)
        next(it)  # warm-up: pipeline built, decoders created
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            batch = next(it)
            torch.cuda.synchronize()
        frames = batch["frames"]
        nbytes = frames.numel() * frames.element_size()
        assert frames.dtype == torch.float16, frames.dtype
        assert frames.is_cuda and frames.__dlpack_device__()[0] == 2, frames.device
        grown = torch.cuda.memory_allocated() - before
        assert grown < nbytes, f"torch allocated {grown} bytes for {nbytes} bytes of frames"
        pointer = "not checked (no CuPy)"
        try:
            import cupy
        except ImportError:
            cupy = None
        if cupy is not None:
            attrs = cupy.cuda.runtime.pointerGetAttributes(frames.data_ptr())
            assert attrs.type == cupy.cuda.runtime.memoryTypeDevice, attrs.type
            pointer = "device memory (cudaPointerGetAttributes)"
        names = [e.name for e in prof.events()]
        dtoh = [n for n in names if "DtoH" in n or "Device -> Host" in n]
        htod = [n for n in names if "HtoD" in n or "Host -> Device" in n]
        assert not dtoh, f"device-to-host copies in a batch: {sorted(set(dtoh))}"
        shown = f"frames {tuple(frames.shape)} fp16 on {frames.device}"
        # DALI's buffer stays referenced by the loader after the consumer drops it, until torch's
        # stream has passed the next request (pipeline/dali.py, _StreamRelease), then goes.
        output = weakref.ref(frames)
        del batch, frames
        assert output() is not None, "the loader let DALI's output go before the next request"
        list(it)  # the next request, then the pass's end
        torch.cuda.synchronize()
        loader._release.mark()
        assert output() is None, "DALI's output is still held after torch's stream passed it"
        # The proof of zero copy is the allocator and the pointer; the profiler only sees the
        # copies that CUPTI attributes to this process's streams (DALI's may not show).
        return (f"{shown}, {nbytes / 2**20:.1f} MiB, torch allocator +{grown} B, pointer "
                f"{pointer}; the profiler saw {len(dtoh)} device-to-host and {len(htod)} "
                "host-to-device copies; the output held until torch passed the next request")

    @section("5 pixels against PyAV")
    def _():
        import torch

        from siasam_fast.pipeline.dali import build_dali_loader
        from siasam_fast.pipeline.dataset import build_loader
        from siasam_fast.pipeline.transforms import denormalize
        from siasam_fast.sampling import SamplingConfig

        cfg = SamplingConfig(num_clips=3, frames_per_clip=4, stride=4)
        out = []
        for names, size in ((["bframes", "vfr", "long_gop"], 32), (["hd"], 224)):
            ex = examples_for(names)
            a = next(iter(build_dali_loader(ex, state["manifest"], cfg, "val", len(names),
                                            image_size=size, device="gpu", num_workers=0,
                                            dtype=torch.float32)))
            b = next(iter(build_loader(ex, state["manifest"], cfg, "val", len(names),
                                       image_size=size, num_workers=0)))
            fa = denormalize(a["frames"].cpu().reshape(-1, 3, size, size))
            fb = denormalize(b["frames"].reshape(-1, 3, size, size))
            diff = (fa - fb).abs()
            out.append(f"{'+'.join(names)} @{size}: max {diff.max():.1f} mean {diff.mean():.3f} "
                       f"p99 {diff.flatten().quantile(0.99):.1f}")
            assert diff.mean() <= 1.5 and diff.flatten().quantile(0.99) <= 4, out[-1]
        return "; ".join(out) + " (grey levels)"

    @section("6 damaged stream after indexing (same size and mtime)")
    def _():
        folder = work / "damaged"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        for name in ("bframes", "vfr", "long_gop"):
            shutil.copy2(work / "h264" / f"{name}.mp4", folder / f"{name}.mp4")
        code = DAMAGED_CHILD.format(root=str(ROOT), folder=str(folder))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
        print("\n".join(tail))
        if proc.returncode < 0:
            raise RuntimeError(f"the decoder killed the process (signal {-proc.returncode})")
        assert proc.returncode == 0, f"exit status {proc.returncode}"
        result = json.loads([line for line in proc.stdout.splitlines()
                             if line.startswith("{")][-1])
        # bframes (examples 0 and 3) stand in for by the next examples, at their batch's end
        assert result["got"] == [1, 2, 1, 4, 5, 4] and result["stand_ins"] == [1, 4], result
        assert result["skipped"] and all("bframes" in p for p in result["skipped"]), result
        return (f"yielded {result['got']} (stand-ins {result['stand_ins']}), skipped "
                f"{result['reasons'][0][:120]}")

    @section("6b what NVDEC refuses, against pipeline/nvdec.py's table")
    def _():
        # In a child process: a decoder that crashes on a format it lacks must not end the check
        proc = subprocess.run([sys.executable, __file__, "--nvdec-table", str(work / "formats")],
                              capture_output=True, text=True, timeout=180)
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        if proc.returncode < 0:
            raise RuntimeError(f"the decoder killed the process (signal {-proc.returncode})")
        assert proc.returncode == 0, "\n".join(tail[-6:])
        return tail[-1]

    rows: list[dict] = []
    if not args.skip_bench:

        @section("7 throughput: pyav (1, 4, 16 workers) vs dali, dedup on / off")
        def _():
            import bench_pipeline as bench

            from siasam_fast.benchutil import environment, results_path, write_csv

            env = environment()
            path = results_path("pipeline_pyav_dali_gpu_check.csv", args.out)

            def add(row: dict) -> None:  # after every cell: a run cut short keeps what finished
                rows.append(row)
                write_csv(rows, path, env)

            def failed(name: str, what: str, err: Exception) -> None:
                traceback.print_exc()
                add({"set": name, "status": "failed",
                     "reason": f"{what}: {type(err).__name__}: {err}".splitlines()[0][:300]})

            sets = []
            # 720p first: issue 5's target is there, and a run cut short keeps what finished.
            for spec in (bench.VideoSet("activitynet-like", 1280, 720, 4, 300),
                         bench.VideoSet("msrvtt-like", 320, 240, 8, 300)):
                try:
                    sets.append((spec.name, bench.prepare_set(spec, work / "bench", 16), "h264"))
                except Exception as err:  # noqa: BLE001 - the other set still runs
                    failed(spec.name, "generating the set", err)
            # Cells are sized by rounds (bench_pipeline: a warm-up of W x 2 batches for PyAV, 2
            # iterations for DALI, then 4 whole rounds; at least 256 videos). The soft cap (9 s)
            # ends a cell that holds those rounds; the hard cap bounds the rest: 45 s for the
            # dedup-on comparison (pyav 16 workers at 720p needs ~6 rounds of ~5 s), 20 s for
            # dedup off (at 720p a PyAV round or a DALI batch takes 7-18 s there: flagged
            # short, no steady rate), 27 s for DALI's variants. One failing cell ends no other.
            plans = [
                # dedup on: the comparison of issue 5
                dict(backend_names=["pyav", "dali"], worker_counts=[1, 4, 16],
                     dedup_modes=(True,), hard_max_seconds=45.0),
                # dedup off: pyav 16 workers and dali, for the dedup speed-ups
                dict(backend_names=["pyav", "dali"], worker_counts=[16], dedup_modes=(False,),
                     hard_max_seconds=20.0),
                # DALI's thread count bounds the NVDEC sessions in flight (one video per thread;
                # the default above is one per video of the batch): 4 (the old default) and 16.
                dict(backend_names=["dali"], worker_counts=[], dali_threads=[4, 16],
                     dedup_modes=(True,), hard_max_seconds=27.0),
                # A DALI iteration bounds the decodes in flight too (and waits for its slowest
                # video): batches of 8 decoded two at a time (decode_group=2, 16 threads).
                dict(backend_names=["dali"], worker_counts=[], dali_groups=[2],
                     dedup_modes=(True,), hard_max_seconds=27.0),
                # Whole files (data.dali_trim=false; the cells above trim, the loader's default):
                # DALI's decoder then decodes each file from its first frame.
                dict(backend_names=["dali"], worker_counts=[], dali_groups=[1, 2],
                     dali_trims=(False,), dedup_modes=(True,), hard_max_seconds=27.0),
            ]
            for name, records, codec in sets:
                for plan in plans:
                    try:
                        bench.run_benchmark(
                            sets=[(name, records, codec)], dali_workers=4, batch_size=8,
                            image_size=224, min_videos=256, max_seconds=9.0, on_row=add,
                            **plan,
                        )
                    except Exception as err:  # noqa: BLE001 - cells fail alone; this is the rest
                        failed(name, f"run_benchmark({plan})", err)
            if not rows:
                write_csv(rows, path, env)
            bad = [r for r in rows if r.get("status") == "failed"]
            detail = f"{len(rows)} rows ({len(bad)} failed) -> {path}"
            return ("FAIL", detail) if bad else detail

    return summary(args.out, rows)


def examples_for(names):
    from siasam_fast.data.examples import QAExample

    return [QAExample(qid=f"q{i}", video_id=v, question="what?") for i, v in enumerate(names)]


def check_cut_clip(folder: Path, device: str, codec: str) -> str:
    """A clip cut without re-encoding (``ffmpeg -ss T -c copy``: the 5 frames before the cut stay
    in the file, hidden by the mp4 edit list) decoded by the DALI loader on ``device``, whole and
    trimmed: every frame must be the one the manifest's numbering names (frame i shows i + 5).
    ``codec`` "h264" for NVDEC, "vp9" (in mp4) for DALI's CPU decoder. Raises AssertionError."""
    from videos import cut_copy, read_indices, write_index_video

    from siasam_fast.pipeline.dali import build_dali_loader
    from siasam_fast.pipeline.manifest import build_manifest
    from siasam_fast.pipeline.transforms import denormalize
    from siasam_fast.sampling import SamplingConfig

    folder.mkdir(parents=True, exist_ok=True)
    # NVDEC decodes no H.264 narrower than 48 pixels (DALI: "Video is too small in at least one
    # dimension"); DALI's CPU decoder reads the 32-pixel VP9 clip faster.
    size = 64 if codec == "h264" else 32
    whole = write_index_video(folder / "whole.mp4", 48, codec=codec, size=size, gop=12,
                              bframes=0)
    (folder / "cut").mkdir(exist_ok=True)
    cut_copy(whole, folder / "cut" / "cut.mp4", 5)
    manifest = build_manifest(folder / "cut", folder / "cut" / "manifest.jsonl", workers=1,
                              progress=False)
    record = manifest["cut"]
    assert record.ok and record.num_frames == 43, (record.status, record.reason)
    cfg = SamplingConfig(num_clips=3, frames_per_clip=4, stride=4)
    seen: set[int] = set()
    for trim in (False, True):
        loader = build_dali_loader(examples_for(["cut"] * 8), manifest, cfg, "train", 4,
                                   image_size=32, device=device, num_workers=0, trim=trim,
                                   seed=3)
        for batch in loader:
            for v in range(batch["frames"].shape[0]):
                u = int(batch["num_unique"][v])
                got = read_indices(denormalize(batch["frames"][v, :u].float().cpu()))
                want = sorted(set(batch["frame_ids"][v][batch["frame_mask"][v]].tolist()))
                assert got == [f + 5 for f in want], (
                    f"trim={trim}: decoded {got}, want {[f + 5 for f in want]} (frames {want})")
                seen.update(want)
        assert not loader.skipped, loader.skipped
    first = min(seen)
    assert first < 7, f"no frame before the first visible keyframe (7) was sampled: {first}"
    return (f"a 43-frame cut (edit list hides 5 frames, keyframes {record.keyframes}): frames "
            f"{first}..{max(seen)} right, whole and trimmed")


# Section 6b: name -> (encoder, pixel format, width, height). "control" decodes on every NVDEC.
NVDEC_CASES = {
    "control": ("libx264", "yuv420p", 64, 64),
    "h264_444": ("libx264", "yuv444p", 64, 64),
    "h264_10bit": ("libx264", "yuv420p10le", 64, 64),
    "h264_422": ("libx264", "yuv422p", 64, 64),
    "h264_32px": ("libx264", "yuv420p", 32, 32),
    "hevc_10bit": ("libx265", "yuv420p10le", 160, 160),
    "hevc_444": ("libx265", "yuv444p", 160, 160),
    "hevc_128px": ("libx265", "yuv420p", 128, 128),
    "vp9_128px": ("libvpx-vp9", "yuv420p", 128, 128),
    "vp9_96px": ("libvpx-vp9", "yuv420p", 96, 96),
    "vp9_444": ("libvpx-vp9", "yuv444p", 128, 128),
    "av1": ("libsvtav1", "yuv420p", 128, 128),
    "mjpeg": ("mjpeg", "yuvj420p", 64, 64),  # NVDEC decodes JPEG; DALI's GPU decoder does not
}


def nvdec_cases(folder: Path, cc: tuple[int, int]) -> tuple[dict, dict]:
    """Write :data:`NVDEC_CASES` (24 frames each, keyframe every 12; the encoders PyAV lacks are
    left out) and index them; returns the manifest and what ``nvdec.problem`` predicts for a GPU
    of compute capability ``cc`` (None: decodes)."""
    import av
    import numpy as np

    from siasam_fast.pipeline import nvdec
    from siasam_fast.pipeline.manifest import build_manifest

    folder.mkdir(parents=True, exist_ok=True)
    for name, (encoder, pix_fmt, width, height) in NVDEC_CASES.items():
        if encoder not in av.codecs_available:
            continue
        with av.open(str(folder / f"{name}.mp4"), "w") as container:
            stream = container.add_stream(encoder, rate=12)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.options = {"g": "12"} if encoder != "libx265" else {"x265-params":
                                                                        "keyint=12:log-level=0"}
            for i in range(24):
                rgb = np.full((height, width, 3), (i * 10) % 250, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    manifest = build_manifest(folder, folder / "manifest.jsonl", workers=4, progress=False)
    bad = [vid for vid, r in manifest.items() if not r.ok]
    assert not bad, f"fixtures not ok in the manifest: {bad}"
    return manifest, {vid: nvdec.problem(r, cc) for vid, r in manifest.items()}


def check_nvdec_table(folder: Path) -> str:
    """Each case of :func:`nvdec_cases` through the DALI loader on NVDEC, with the control as the
    dataset's other example (its stand-in when NVDEC refuses the case): refused when the loader
    left it out. Raises AssertionError listing where NVDEC and the table disagree."""
    import torch

    from siasam_fast.pipeline.dali import build_dali_loader
    from siasam_fast.sampling import SamplingConfig

    cc = tuple(torch.cuda.get_device_capability())
    manifest, predicted = nvdec_cases(folder, cc)
    cfg = SamplingConfig(num_clips=2, frames_per_clip=2, stride=2)
    seen, wrong = [], []
    for name in sorted(manifest):
        if name == "control":
            continue
        loader = build_dali_loader(examples_for([name, "control"]), manifest, cfg, "val", 2,
                                   image_size=32, device="gpu", num_workers=0)
        for _ in loader:
            pass
        reasons = [reason for path, reason in loader.skipped if Path(path).stem == name]
        refused = bool(reasons)
        seen.append(f"{name}: {'refused' if refused else 'decoded'}")
        if refused != (predicted[name] is not None):
            wrong.append(f"{name}: NVDEC {'refused' if refused else 'decoded'} it "
                         f"({reasons[0][:120] if reasons else 'no error'}), the table says "
                         f"{predicted[name] or 'decodes'}")
        assert not [p for p, _ in loader.skipped if Path(p).stem == "control"], loader.skipped
    assert not wrong, "; ".join(wrong)
    return f"sm_{cc[0]}{cc[1]}: " + ", ".join(seen) + " (all as the table says)"


def check_frames(batch, dedup: bool) -> int:
    """Read every decoded frame's index back; returns how many were checked."""
    from videos import read_index, read_indices

    from siasam_fast.pipeline.transforms import denormalize

    frames = batch["frames"].float().cpu()
    clips = batch["clips"].float().cpu() if "clips" in batch else None
    checked = 0
    for v in range(frames.shape[0]):
        u = int(batch["num_unique"][v])
        ids = read_indices(denormalize(frames[v, :u]))
        real = batch["frame_ids"][v][batch["frame_mask"][v]].tolist()
        want = sorted(set(real)) if dedup else real
        assert ids == want, f"{batch['video_id'][v]}: decoded {ids}, sampled {want}"
        assert (frames[v, u:] == 0).all()
        checked += len(ids)
        if clips is not None:
            N, B = batch["clip_index"].shape[1:]
            for n in range(N):
                for b in range(B):
                    if batch["frame_mask"][v, n, b]:
                        got = read_index(denormalize(clips[v, n, b]))
                        assert got == int(batch["frame_ids"][v, n, b])
    return checked


DAMAGED_CHILD = r"""
import json, logging, os, sys
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
logging.basicConfig(level=logging.WARNING)
from pathlib import Path
from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.dali import build_dali_loader
from siasam_fast.pipeline.manifest import build_manifest
from siasam_fast.sampling import SamplingConfig
folder = Path({folder!r})
manifest = build_manifest(folder, folder / "manifest.jsonl", workers=1, progress=False)
path = folder / "bframes.mp4"
st = os.stat(path)
data = bytearray(path.read_bytes())
data[len(data) // 5:] = bytes(len(data) - len(data) // 5)
path.write_bytes(bytes(data))
os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
names = ["bframes", "vfr", "long_gop"] * 2
examples = [QAExample(qid=f"q{{i}}", video_id=v, question="?") for i, v in enumerate(names)]
cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)
loader = build_dali_loader(examples, manifest, cfg, "train", 3, image_size=32, device="gpu",
                           num_workers=2, shuffle=False)
batches = list(loader)
got = [i for b in batches for i in b["example_index"].tolist()]
stand_ins = [i for b in batches for i, s in zip(b["example_index"].tolist(),
                                                 b["stand_in"].tolist()) if s]
print(json.dumps({{"got": got, "stand_ins": stand_ins,
                  "skipped": [p for p, _ in loader.skipped],
                  "reasons": [r for _, r in loader.skipped]}}))
"""


def summary(out: Path | None, rows: list[dict] | None = None) -> int:
    print("\n=== summary", flush=True)
    for name, status, seconds, detail in RESULTS:
        print(f"{status:4s} {name} ({seconds:.1f} s) {detail[:160]}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check_dali.json").write_text(json.dumps(
            [{"section": n, "status": s, "seconds": t, "detail": d} for n, s, t, d in RESULTS],
            indent=1,
        ))
    if rows:
        import bench_pipeline as bench

        from siasam_fast.benchutil import format_table

        columns = [c for c in bench.COLUMNS if any(c in r for r in rows)]
        print()
        print(format_table(rows, columns))
        for line in bench.summary_lines(rows):
            print(line)
    failed = [name for name, status, _, _ in RESULTS if status == "FAIL"]
    print(f"\n{'FAIL' if failed else 'PASS'}: {len(RESULTS) - len(failed)} of {len(RESULTS)} "
          f"sections passed{'; failed: ' + ', '.join(failed) if failed else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
