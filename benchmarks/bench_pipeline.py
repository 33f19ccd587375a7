"""Decoding-pipeline throughput: videos/s and frames/s, with and without frame de-duplication.

    python benchmarks/bench_pipeline.py --backend pyav                  # full sweep
    python benchmarks/bench_pipeline.py --backend pyav dali             # both, in one run
    python benchmarks/bench_pipeline.py --backend pyav dali --quick     # CPU sanity check
    python benchmarks/bench_pipeline.py --synthetic data/synthetic --workers 1 4 16

Each video yields the siamese clips of training (N=9 clips x B=8 frames, stride 4, the same
sampling function as training). "dedup" decodes the sorted unique frames U of the clips once and
gathers clips from them; "no dedup" decodes every clip on its own (the naive baseline). Sets:

- ``synthetic``: an existing folder (``--synthetic DIR``) with ``manifest.jsonl`` (built into the
  work dir if absent); one example per video. Skipped when not given.
- ``msrvtt-like``: 320x240, 30 fps; ``activitynet-like``: 1280x720, 30 fps. Textured background
  panning under moving shapes and sensor noise (so the bitrate is realistic), a few hundred frames,
  GOP 100 (H.264 with B-frames), like the real datasets. Generated once and cached under
  ``--work-dir``.

Backends (a registry, ``BACKENDS``): ``pyav`` (DataLoader workers, swept over ``--workers``) and
``dali`` (``fn.decoders.video`` on NVDEC with a GPU, else DALI's CPU decoder; ``--dali-workers``
file-reading processes, run once). DALI's CPU decoder reads VP8 / VP9 / MJPEG only: when DALI runs
on the CPU the generated sets are VP9 variants (``--codec auto``; every backend reads the same
files, so the comparison stays like for like) and the synthetic set (H.264) is skipped for DALI.

Cells (one backend, dedup mode, worker count, ...) are sized by rounds, not by videos. A loader
delivers its batches in rounds: PyAV's W workers, started together, finish a batch each at about
the same time (a round of W batches, then nothing for a batch's decode time); DALI delivers one
iteration (a decode group of batches) at a time. A cell runs its warm-up (the batches queued
before the first is taken: W x prefetch_factor for PyAV, DALI's prefetch depth in iterations)
and ``--min-steady-rounds`` (4) whole rounds after it, or ``--min-videos`` when more (rounded up
to whole passes over the set). ``steady_videos_per_s`` counts the whole rounds after the warm-up
only, from a round's end to a later round's end (``benchutil.steady_rate``): the rate a long run
sees, and the one the summary compares backends and dedup modes on. ``videos_per_s`` is the
overall rate, start-up (``first_batch_s``) and the work in flight at a stop included. A cell with
fewer whole rounds than ``--min-steady-rounds`` after its warm-up is ``status`` ``short`` (its
steady rate missing or rough; the summary flags it).

Caps (``benchutil.stop_now``, checked as each batch arrives, so that a batch is never cut and the
first, the start-up, always counts): ``--max-seconds`` is soft, a cell that holds its steady
rounds stops at a round's end before it (more rounds where they are cheap, as with DALI);
``--hard-max-seconds`` (default 3x that) stops a cell whatever it holds, at the first batch past
it or at a round's end when the next round (as long as the last) would end past it.

Every cell gives a row with a ``status``: ``ok``, ``short``, ``skipped`` (a codec the backend
cannot decode here, a set without readable videos) or ``failed`` (the cell raised; ``reason``
says why, the next cells run). The CSV, benchmarks/results/pipeline_<backends>.csv with the
environment, is written when the run ends. Until then the rows go to
pipeline_<backends>.partial.csv, rewritten atomically after every row once a cell has been
measured: a run cut short (Ctrl-C: exit status 130) keeps what finished there and leaves an
earlier finished CSV as it was, and so does a run that measures nothing.

Other columns: ``cpu_util``, CPU seconds of this process and its children (workers, DALI's
readers) per wall second, i.e. cores kept busy; ``transformed_per_s`` and
``transformed_per_video``: frames the decoder handed on to the transform (the unique frames with
dedup, every clip frame without), not the frames it decoded (it also decodes the pre-roll from
the keyframe before each: bench_transcode measures that); ``out_dtype`` / ``out_device``: of the
frames the loader yields (DALI on the GPU: float16 on the device; PyAV: float32 on the host,
pinned when CUDA is here); ``torch_mem_mb``, ``torch.cuda.max_memory_allocated`` during the cell:
torch's caching allocator only, which cannot see DALI's buffers (DALI's output reaches torch
through DLPack from DALI's own pool); ``device_mem_mb``, the peak of the GPU memory in use by any
allocator (DALI's pool included: it has no query of its own in 2.4), sampled as each batch
arrives, less what was in use at the cell's start, after DALI's pools
(``nvidia.dali.backend.ReleaseUnusedMemory``) and torch's cache were emptied of what earlier
cells left, so it does not depend on the order of the cells. Both memory columns are in MiB
(2^20 bytes), whatever their ``_mb`` says.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import itertools
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siasam_fast.benchutil import (
    DALI_TRIM_MODES,
    MIN_STEADY_ROUNDS,
    Rounds,
    RowLog,
    dali_rounds,
    environment_isolated,
    format_table,
    nonneg_int,
    positive_float,
    positive_int,
    pyav_rounds,
    report_no_rows,
    results_path,
    steady_rate,
    stop_now,
)
from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.dataset import build_loader
from siasam_fast.pipeline.loaders import DALI_CPU_CODECS  # DALI's CPU decoder has no H.264
from siasam_fast.pipeline.manifest import build_manifest, load_manifest
from siasam_fast.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLING = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)


# ----------------------------------------------------------------------------------------------
# Backends: name -> how to build a loader. A backend yields batches in the batch contract.


@dataclass(frozen=True)
class Backend:
    name: str
    make_loader: Callable[..., Iterable[dict]]
    uses_workers: bool = True  # False: the worker count is not a parameter (run once)


def _pyav_loader(examples, manifest, cfg, *, batch_size, image_size, workers, dedup, seed,
                 threads=None, group=1, trim=False):
    del threads, group, trim  # DALI's knobs: one decode thread per worker process, batch by batch
    return build_loader(
        examples,
        manifest,
        cfg,
        "train",
        batch_size=batch_size,
        image_size=image_size,
        num_workers=workers,
        seed=seed,
        backend="pyav",
        dedup=dedup,
    )


def _dali_loader(examples, manifest, cfg, *, batch_size, image_size, workers, dedup, seed,
                 threads=None, group=1, trim=False):
    from siasam_fast.pipeline.dali import build_dali_loader

    loader = build_dali_loader(
        examples,
        manifest,
        cfg,
        "train",
        batch_size=batch_size,
        image_size=image_size,
        num_workers=workers,
        seed=seed,
        dedup=dedup,
        device=dali_device(),
        num_threads=threads,
        decode_group=group,
        trim=trim,
    )
    return check_trimmed(loader, trim)


def check_trimmed(loader, trim: bool):
    """``loader``, refused when it was asked to ``trim`` and decodes whole files (its NVDEC check
    of trimmed decoding failed): such a cell would measure whole files under the trim label."""
    if trim and not loader.trim:
        raise RuntimeError("trim was asked for, but the loader decodes whole files: its check of "
                           "trimmed decoding on this GPU failed (the warning above says why); "
                           "--dali-trim off measures whole files")
    return loader


def dali_device() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


BACKENDS: dict[str, Backend] = {
    "pyav": Backend("pyav", _pyav_loader),
    "dali": Backend("dali", _dali_loader, uses_workers=False),
}


def decodes(backend: str, codec: str) -> bool:
    if backend == "dali" and dali_device() == "cpu":
        return codec in DALI_CPU_CODECS
    return True


# ----------------------------------------------------------------------------------------------
# Realistic-content test videos


@dataclass(frozen=True)
class VideoSet:
    name: str
    width: int
    height: int
    num_videos: int
    num_frames: int
    fps: int = 30
    gop: int = 100
    codec: str = "h264"  # "h264" (libx264, B-frames) or "vp9" (libvpx, for DALI on the CPU)

    @property
    def folder_name(self) -> str:
        return self.name if self.codec == "h264" else f"{self.name}-{self.codec}"

    @property
    def extension(self) -> str:
        return ".mp4" if self.codec == "h264" else ".webm"


# libx264 settings of the generated H.264 sets (bench_transcode encodes its copies alike)
H264_OPTIONS = {"preset": "veryfast", "crf": "23", "bf": "3"}


def video_sets(quick: bool, codec: str = "h264", frames: int | None = None,
               gop: int | None = None) -> list[VideoSet]:
    """The generated sets; ``frames`` / ``gop`` replace their length and keyframe spacing (sets of
    another length or spacing are cached under names of their own)."""
    if quick:
        sets = [
            VideoSet("msrvtt-like", 320, 240, 4, 150, codec=codec),
            VideoSet("activitynet-like", 1280, 720, 2, 150, codec=codec),
        ]
    else:
        sets = [
            VideoSet("msrvtt-like", 320, 240, 32, 300, codec=codec),
            VideoSet("activitynet-like", 1280, 720, 8, 300, codec=codec),
        ]
    if frames is None and gop is None:
        return sets
    out = []
    for spec in sets:
        n, g = frames or spec.num_frames, gop or spec.gop
        name = spec.name + (f"-gop{g}" if g != spec.gop else "") + (
            f"-{n}f" if n != spec.num_frames else "")
        out.append(VideoSet(name, spec.width, spec.height, spec.num_videos, n, spec.fps, g,
                            spec.codec))
    return out


def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A colourful multi-scale noise texture, uint8 [height, width, 3]."""
    img = torch.zeros(1, 3, height, width)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.15), (256, 0.05)):
        grid = torch.from_numpy(rng.random((1, 3, cells, cells * width // height + 1))).float()
        img += weight * torch.nn.functional.interpolate(
            grid, size=(height, width), mode="bicubic", align_corners=False
        )
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy()


def write_textured_video(path: Path, spec: VideoSet, seed: int) -> None:
    """Panning textured background, moving shapes and noise; H.264 (B-frames) or VP9, GOP
    ``spec.gop``."""
    import av

    rng = np.random.default_rng(seed)
    h, w = spec.height, spec.width
    margin = max(h, w) // 4
    background = _texture(h + 2 * margin, w + 2 * margin, rng)
    shapes = [
        (
            rng.uniform(0, w),
            rng.uniform(0, h),
            rng.uniform(-4, 4) * w / 320,
            rng.uniform(-3, 3) * h / 240,
            int(rng.uniform(0.05, 0.15) * h),
            rng.integers(0, 256, 3).astype(np.uint8),
        )
        for _ in range(5)
    ]
    tmp = path.with_suffix(".partial" + spec.extension)
    container = av.open(str(tmp), "w")
    if spec.codec == "h264":
        stream = container.add_stream("libx264", rate=spec.fps)
        stream.options = {**H264_OPTIONS, "g": str(spec.gop)}
    elif spec.codec == "vp9":
        stream = container.add_stream("libvpx-vp9", rate=spec.fps)
        stream.options = {"crf": "32", "b": "0", "g": str(spec.gop), "deadline": "realtime",
                          "cpu-used": "8", "row-mt": "1"}
    else:
        raise ValueError(f"codec={spec.codec!r}: the generated sets are h264 or vp9")
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for t in range(spec.num_frames):
        dy = int(margin * (1 + np.sin(t / 40.0)) / 2)
        dx = int(margin * (1 + np.cos(t / 55.0)) / 2)
        frame = background[dy : dy + h, dx : dx + w].copy()
        for x0, y0, vx, vy, r, colour in shapes:
            cx, cy = int(x0 + vx * t) % w, int(y0 + vy * t) % h
            frame[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = colour
        noise = rng.integers(-6, 7, size=frame.shape, dtype=np.int16)
        frame = np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    tmp.replace(path)


def prepare_set(spec: VideoSet, work_dir: Path, workers: int) -> dict:
    """Generate (once) and index a video set, ``workers`` videos at a time (processes); returns
    the manifest records."""
    folder = work_dir / spec.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "spec.json"
    wanted = json.dumps(spec.__dict__, sort_keys=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        for old in [*folder.glob("*.mp4"), *folder.glob("*.webm")]:
            old.unlink()
        stamp.unlink(missing_ok=True)
    name = "video{}" + spec.extension
    missing = [i for i in range(spec.num_videos) if not (folder / name.format(i)).exists()]
    if missing:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=f"generating {spec.folder_name}", unit="video")
        with bar:
            if workers <= 1 or len(missing) == 1:
                for i in missing:
                    write_textured_video(folder / name.format(i), spec, seed=i)
                    bar.update()
            else:  # one encoder thread each: 8 videos at 1280x720 took 55 s one by one
                import concurrent.futures as cf
                import multiprocessing as mp

                with cf.ProcessPoolExecutor(min(workers, len(missing)),
                                            mp_context=mp.get_context("spawn")) as pool:
                    jobs = [pool.submit(write_textured_video, folder / name.format(i), spec, i)
                            for i in missing]
                    try:
                        for job in cf.as_completed(jobs):
                            job.result()  # the first failure stops the set (as one by one)
                            bar.update()
                    except BaseException:
                        for job in jobs:
                            job.cancel()
                        raise
        stamp.write_text(wanted)
    return build_manifest(folder, folder / "manifest.jsonl", workers=workers, progress=False)


def synthetic_set(directory: Path, work_dir: Path, workers: int) -> dict | None:
    if not directory.is_dir():
        print(f"--synthetic {directory}: not a folder, skipping the synthetic set", file=sys.stderr)
        return None
    manifest = directory / "manifest.jsonl"
    if manifest.is_file():
        return load_manifest(manifest)
    videos = directory / "videos" if (directory / "videos").is_dir() else directory
    out = work_dir / "synthetic-manifest.jsonl"
    return build_manifest(videos, out, workers=workers, progress=False)


# ----------------------------------------------------------------------------------------------
# Measuring


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its children, alive or reaped."""
    try:
        import psutil
    except ImportError:  # reaped children only: workers still alive are missed
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    proc = psutil.Process()
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:  # exited meanwhile: counted with the reaped ones, or lost
            pass
    return total


def device_memory_in_use() -> int:
    """Bytes of GPU memory in use by every allocator of every process (DALI's pool included)."""
    free, total = torch.cuda.mem_get_info()
    return total - free


def release_device_memory() -> None:
    """Give back the GPU memory that the cells before kept cached: the loaders freed (gc), DALI's
    memory pools (``nvidia.dali.backend.ReleaseUnusedMemory``, where this DALI has it; only when
    DALI is already imported) and torch's cache. Called before and after every cell, so that each
    cell's ``device_mem_mb`` starts from a fresh baseline whatever ran before it."""
    gc.collect()
    if "nvidia.dali" in sys.modules:
        try:
            from nvidia.dali import backend as dali_backend

            release = getattr(dali_backend, "ReleaseUnusedMemory", None)
            if release is not None:
                release()
        except Exception as err:  # noqa: BLE001 - a missing or failing release: just a baseline
            print(f"nvidia.dali.backend.ReleaseUnusedMemory failed: {err}", file=sys.stderr)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench_examples(records: dict, min_videos: int) -> list[QAExample]:
    """One question per ok video, repeated in whole passes until there are ``min_videos``."""
    ok = [vid for vid, r in sorted(records.items()) if r.ok]
    repeats = max(1, -(-min_videos // len(ok)))
    return [
        QAExample(qid=f"{vid}#{k}", video_id=vid, question="what happens?")
        for k in range(repeats)
        for vid in ok
    ]


def cell_videos(rounds: Rounds, batch_size: int, min_videos: int = 0,
                min_steady_rounds: int = MIN_STEADY_ROUNDS) -> int:
    """Videos of a cell: its warm-up and ``min_steady_rounds`` whole rounds after it, or
    ``min_videos`` when more (``bench_examples`` rounds it up to whole passes over the set)."""
    return max(min_videos, rounds.cell_batches(min_steady_rounds) * batch_size)


def time_epoch(
    make_loader: Callable[[], Iterable[dict]],
    rounds: Rounds,
    *,
    max_seconds: float | None = None,
    hard_max_seconds: float | None = None,
    min_steady_rounds: int = MIN_STEADY_ROUNDS,
) -> dict:
    """Time one epoch of the loader that ``make_loader()`` builds (its start-up included), or
    what ``stop_now`` lets run of it; returns the measured columns of a row.

    ``rounds``: how its batches arrive (``pyav_rounds`` / ``dali_rounds``);
    ``steady_videos_per_s`` counts whole rounds after the warm-up only (``steady_rate``); a cell
    with fewer than ``min_steady_rounds`` of them is ``status="short"``. GPU memory: the caches of
    earlier cells are released first and the peak is taken against the memory in use then."""
    cuda = torch.cuda.is_available()
    release_device_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch_before = torch.cuda.memory_allocated()
        device_before = device_peak = device_memory_in_use()
    arrivals: list[float] = []
    sizes: list[int] = []
    clip_frames = unique = 0
    out_dtype = out_device = ""
    stopped_by = "epoch"
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    loader = batches = batch = None
    try:
        loader = make_loader()
        batches = iter(loader)
        for batch in batches:
            arrivals.append(time.perf_counter() - start)
            sizes.append(len(batch["example_index"]))
            clip_frames += int(batch["frame_mask"].sum())
            unique += int(batch["num_unique"].sum())
            if not out_dtype:
                frames = batch["frames"]
                out_dtype = str(frames.dtype).removeprefix("torch.")
                out_device = frames.device.type
            if cuda:
                device_peak = max(device_peak, device_memory_in_use())
            if stop_now(arrivals, rounds, max_seconds=max_seconds,
                        hard_max_seconds=hard_max_seconds, min_steady_rounds=min_steady_rounds):
                stopped_by = "cap"
                break
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_start
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # a DALI pass: its pipeline and reader processes end now
            close()
        del batch, batches, loader  # stops the workers / the pipeline
        if cuda:
            torch_peak = torch.cuda.max_memory_allocated()
        release_device_memory()
    videos = sum(sizes)
    steady = steady_rate(arrivals, sizes, rounds)
    short = steady.rounds < min_steady_rounds
    row = {
        "status": "short" if short else "ok",
        "reason": (f"{steady.rounds} whole rounds of {rounds.round_batches} batches after a "
                   f"warm-up of {rounds.warmup_batches} (< {min_steady_rounds}; stopped by the "
                   f"{'time cap' if stopped_by == 'cap' else 'end of the epoch'}): "
                   + ("no steady rate" if steady.videos_per_s is None else "a rough steady rate")
                   ) if short else "",
        "videos": videos,
        "batches": len(sizes),
        "seconds": seconds,
        "videos_per_s": videos / seconds,  # start-up and the work in flight at a stop included
        "steady_videos_per_s": steady.videos_per_s,
        "steady_rounds": steady.rounds,
        "steady_s": steady.seconds,
        "round_batches": rounds.round_batches,
        "warmup_batches": rounds.warmup_batches,
        "stopped_by": stopped_by,
        "frames_per_s": clip_frames / seconds,  # output clip frames (N x B per video)
        # frames the decoder handed to the transform (the unique frames with dedup, every clip
        # frame without); the decoder decodes more (its pre-roll from the keyframe before each)
        "transformed_per_s": unique / seconds,
        "transformed_per_video": unique / max(videos, 1),
        "first_batch_s": arrivals[0] if arrivals else None,  # start-up and the first batch
        "cpu_util": cpu / seconds,  # cores kept busy (this process and its children)
        "out_dtype": out_dtype,
        "out_device": out_device,
    }
    if cuda:
        row["torch_mem_mb"] = (torch_peak - torch_before) / 2**20
        row["device_mem_mb"] = (device_peak - device_before) / 2**20
    return row


def _default(factory: Callable, name: str):
    return inspect.signature(factory).parameters[name].default


def cell_rounds(backend: Backend, workers: int, group: int = 1) -> Rounds:
    """How the backend's loader delivers batches, with the loader factory's own prefetch
    depth (``prefetch_factor``, which the benchmark leaves at its default)."""
    if backend.name == "dali":
        from siasam_fast.pipeline.dali import build_dali_loader

        return dali_rounds(group, _default(build_dali_loader, "prefetch_factor"))
    return pyav_rounds(workers, _default(build_loader, "prefetch_factor"))


def measure(
    backend: Backend,
    records: dict,
    *,
    workers: int,
    dedup: bool,
    batch_size: int,
    image_size: int,
    min_videos: int,
    seed: int = 0,
    max_seconds: float | None = None,
    hard_max_seconds: float | None = None,
    threads: int | None = None,
    group: int = 1,
    trim: bool = False,
    min_steady_rounds: int = MIN_STEADY_ROUNDS,
) -> dict:
    """One epoch sized by rounds (``cell_videos``: the warm-up and ``min_steady_rounds`` whole
    rounds, at least ``min_videos``, rounded up to whole passes over the set), or what the caps
    let run of it (``stop_now``); the columns of ``time_epoch``."""
    rounds = cell_rounds(backend, workers, group)
    examples = bench_examples(
        records, cell_videos(rounds, batch_size, min_videos, min_steady_rounds))

    def make():
        return backend.make_loader(
            examples,
            records,
            SAMPLING,
            batch_size=batch_size,
            image_size=image_size,
            workers=workers,
            dedup=dedup,
            seed=seed,
            threads=threads,
            group=group,
            trim=trim,
        )

    return time_epoch(make, rounds, max_seconds=max_seconds, hard_max_seconds=hard_max_seconds,
                      min_steady_rounds=min_steady_rounds)


MEASURED = ("ok", "short")  # statuses of the rows that hold a measurement


def failure_reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def record_failure(add: Callable, log: Callable, cell: dict, label: str,
                   err: BaseException) -> None:
    """A cell that raised: its traceback in the log, and a ``failed`` row with the reason."""
    log(traceback.format_exc())
    add({**cell, "status": "failed", "reason": failure_reason(err)})
    log(f"{label}: FAILED {failure_reason(err)}")


def rate_line(label: str, result: dict) -> str:
    """One measured cell as the log shows it."""
    steady = result["steady_videos_per_s"]
    return (f"{label}: {result['videos_per_s']:.2f} videos/s, steady "
            f"{'-' if steady is None else f'{steady:.2f}'} over {result['steady_rounds']} rounds"
            f"{' (short)' if result['status'] == 'short' else ''}")


def run_benchmark(
    backend_names: list[str],
    sets: list[tuple[str, dict, str]],
    *,
    worker_counts: list[int],
    dali_workers: int,
    batch_size: int,
    image_size: int,
    min_videos: int,
    max_seconds: float | None = None,
    hard_max_seconds: float | None = None,
    dali_threads: list[int] | None = None,
    dali_groups: list[int] | None = None,
    dali_trims: tuple[bool, ...] = (True,),
    dedup_modes: tuple[bool, ...] = (True, False),
    min_steady_rounds: int = MIN_STEADY_ROUNDS,
    log=print,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Rows for every (set, backend, dedup, workers, DALI threads); ``sets`` holds (name, records,
    codec). ``dali_threads``: DALI's thread counts to try (its mixed video decoder decodes one
    sample per thread, so they bound how many NVDEC sessions run at once); default: the
    loader's own (``default_num_threads``). ``dali_groups``: DALI decode groups to try (batches
    decoded per iteration, ``build_dali_loader(decode_group=...)``; default 1). ``dali_trims``:
    whether DALI gets each file whole or only the stretch its frames need
    (``build_dali_loader(trim=...)``; default trimmed only, as the loader).

    Every cell gives a row, ``status`` saying what it holds: ``ok`` / ``short`` (measured; short:
    fewer than ``min_steady_rounds`` whole rounds after the warm-up), ``skipped`` (a set without a
    readable video, a codec the backend cannot decode here) or ``failed`` (the cell raised: the
    error is in ``reason`` and the traceback in the log; the next cells still run). ``on_row``
    is called with each row as soon as it is made (main rewrites the CSV there)."""
    from siasam_fast.pipeline.dali import default_num_threads

    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for name, records, codec in sets:
        ok = [r for r in records.values() if r.ok]
        if not ok:
            log(f"{name}: no ok video, skipped")
            for backend_name in backend_names:
                add({"set": name, "codec": codec, "backend": backend_name, "status": "skipped",
                     "reason": "no readable video in the set"})
            continue
        resolution = f"{ok[0].width}x{ok[0].height}"
        for backend_name in backend_names:
            backend = BACKENDS[backend_name]
            device = dali_device() if backend_name == "dali" else "cpu"
            if not decodes(backend_name, codec):
                why = f"{backend_name} on {dali_device()} cannot decode {codec}"
                log(f"{name}: {why}, skipped")
                add({"set": name, "resolution": resolution, "codec": codec,
                     "backend": backend_name, "decoder": device, "batch_size": batch_size,
                     "status": "skipped", "reason": why})
                continue
            counts = worker_counts if backend.uses_workers else [dali_workers]
            thread_counts = [None] if backend.uses_workers else (dali_threads or [None])
            groups = [1] if backend.uses_workers else (dali_groups or [1])
            trims = (False,) if backend.uses_workers else dali_trims
            for dedup, workers, threads, group, trim in itertools.product(
                    dedup_modes, counts, thread_counts, groups, trims):
                where = (f"  {name} {backend_name} dedup={dedup} workers={workers}"
                         f"{'' if threads is None else f' threads={threads}'}"
                         f"{'' if group == 1 else f' group={group}'}"
                         f"{' trim' if trim else ''}")
                cell = {
                    "set": name,
                    "resolution": resolution,
                    "codec": codec,
                    "backend": backend_name,
                    "decoder": device,
                    "dedup": dedup,
                    "workers": workers,
                    "threads": "" if backend.uses_workers else (
                        threads or default_num_threads(dali_device(), batch_size * group)),
                    "group": "" if backend.uses_workers else group,
                    "trim": "" if backend.uses_workers else trim,
                    "batch_size": batch_size,
                }
                try:
                    result = measure(
                        backend,
                        records,
                        workers=workers,
                        dedup=dedup,
                        batch_size=batch_size,
                        image_size=image_size,
                        min_videos=min_videos,
                        max_seconds=max_seconds,
                        hard_max_seconds=hard_max_seconds,
                        threads=threads,
                        group=group,
                        trim=trim,
                        min_steady_rounds=min_steady_rounds,
                    )
                except Exception as err:  # noqa: BLE001 - one failing cell must not end the rest
                    record_failure(add, log, cell, where, err)
                    continue
                add({**cell, **result})
                log(rate_line(where, result))
    return rows


COLUMNS = [
    "set",
    "resolution",
    "codec",
    "backend",
    "decoder",
    "dedup",
    "workers",
    "threads",
    "group",
    "trim",
    "batch_size",
    "status",
    "videos",
    "seconds",
    "videos_per_s",
    "steady_videos_per_s",
    "steady_rounds",
    "frames_per_s",
    "transformed_per_s",
    "transformed_per_video",
    "first_batch_s",
    "cpu_util",
    "out_dtype",
    "out_device",
    "torch_mem_mb",
    "device_mem_mb",
    "reason",
]


def start_up_bound(row: dict, min_steady_rounds: int = MIN_STEADY_ROUNDS) -> bool:
    """Fewer than ``min_steady_rounds`` (the run's --min-steady-rounds) whole rounds measured
    after the warm-up (a cap hit during the start-up, or an epoch too short): no steady rate, or
    a rough one."""
    if "steady_rounds" in row and row["steady_rounds"] not in ("", None):
        return int(row["steady_rounds"]) < min_steady_rounds
    return True  # a row without the count (an older CSV): not to be trusted


def rate(row: dict) -> float | None:
    """The rate backends are compared on: the steady one (whole rounds after the warm-up)."""
    value = row.get("steady_videos_per_s")
    return None if value in ("", None) else float(value)


def summary_lines(rows: list[dict], min_steady_rounds: int = MIN_STEADY_ROUNDS) -> list[str]:
    """Dedup speed-ups per (set, backend, workers, threads) and the best DALI row against the
    best PyAV row, on the steady rates (``rate``); cells with fewer than ``min_steady_rounds``
    (the run's --min-steady-rounds) whole rounds after the warm-up are flagged, cells without a
    steady rate are named."""
    rows = [r for r in rows if r.get("status", "ok") in MEASURED]
    lines = []
    caveat = f" (start-up bound: fewer than {min_steady_rounds} whole rounds after the warm-up)"

    def key(r):
        return (r["set"], r["backend"], r["workers"], r.get("threads", ""), r.get("group", ""),
                r.get("trim", ""), r.get("batch_size"))

    def none_steady(*cells) -> str:
        return ", ".join(f"{r['backend']} {r['workers']} workers dedup={r['dedup']}"
                         for r in cells if rate(r) is None)

    for k in sorted({key(r) for r in rows}, key=str):
        name, backend, workers, threads, group, trim = k[:6]
        pair = {r["dedup"]: r for r in rows if key(r) == k}
        if len(pair) != 2:
            continue
        where = f"{workers} workers" + (f", {threads} threads" if threads != "" else "")
        where += f", groups of {group}" if group not in ("", 1) else ""
        where += ", trimmed" if trim is True else ""
        missing = none_steady(*pair.values())
        if missing:
            lines.append(f"{name}, {backend}, {where}: dedup speed-up not measured (no steady "
                         f"rate: {missing})")
            continue
        speedup = rate(pair[True]) / rate(pair[False])
        note = caveat if any(start_up_bound(r, min_steady_rounds) for r in pair.values()) else ""
        lines.append(f"{name}, {backend}, {where}: dedup is {speedup:.2f}x faster (steady "
                     f"rates){note}")
    for name in sorted({r["set"] for r in rows}):
        dali = [r for r in rows if r["set"] == name and r["backend"] == "dali" and r["dedup"]]
        pyav = [r for r in rows if r["set"] == name and r["backend"] == "pyav" and r["dedup"]]
        if not (dali and pyav):
            continue
        dali_steady = [r for r in dali if rate(r) is not None]
        pyav_steady = [r for r in pyav if rate(r) is not None]
        if not (dali_steady and pyav_steady):
            lines.append(f"{name}: dali against pyav not measured (no steady rate: "
                         f"{none_steady(*dali, *pyav)})")
            continue
        best = max(pyav_steady, key=rate)
        top = max(dali_steady, key=rate)
        ratio = rate(top) / rate(best)
        note = caveat if start_up_bound(top, min_steady_rounds) or start_up_bound(
            best, min_steady_rounds) else ""
        threads = f", {top['threads']} threads" if top.get("threads", "") != "" else ""
        threads += f", batches of {top['batch_size']}" if "batch_size" in top else ""
        threads += f" in groups of {top['group']}" if top.get("group", 1) not in (1, "") else ""
        threads += ", trimmed" if top.get("trim") is True else ""
        lines.append(
            f"{name}: dali ({top['decoder']}{threads}) {ratio:.2f}x the best pyav "
            f"({best['workers']} workers), steady rates {rate(top):.1f} / {rate(best):.1f} "
            f"videos/s, dedup on both{note}"
        )
        missing = none_steady(*dali, *pyav)
        if missing:
            lines.append(f"{name}: left out of that comparison (no steady rate): {missing}")
    return lines


SET_NAMES = ("synthetic", *(spec.name for spec in video_sets(False)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend",
        nargs="+",
        default=["pyav"],
        choices=sorted(BACKENDS),
        help="one or more backends, measured in the same run (default pyav)",
    )
    parser.add_argument(
        "--workers",
        type=nonneg_int,
        nargs="+",
        default=None,
        help="pyav DataLoader worker counts (default 1 4 16; --quick: 1 2; 0: in this process)",
    )
    parser.add_argument(
        "--dali-workers",
        type=nonneg_int,
        default=None,
        help="DALI's file-reading processes (default 4; --quick: 2; 0: in this process)",
    )
    parser.add_argument(
        "--dali-threads",
        type=positive_int,
        nargs="+",
        default=None,
        help="DALI thread counts to compare (its mixed decoder decodes one video per thread; "
        "default: the loader's own, one per video of the batch on the GPU, 4 to 16)",
    )
    parser.add_argument(
        "--dali-groups",
        type=positive_int,
        nargs="+",
        default=None,
        help="DALI decode groups to compare: batches decoded per DALI iteration (default 1)",
    )
    parser.add_argument(
        "--dali-trim",
        choices=list(DALI_TRIM_MODES),
        default="on",
        help="DALI gets only the stretch of each file that its frames need (on, the default, "
        "as data.dali_trim), each file whole (off), or both, compared",
    )
    parser.add_argument(
        "--codec",
        choices=["auto", "h264", "vp9"],
        default="auto",
        help="codec of the generated sets (auto: vp9 when DALI decodes on the CPU, else h264)",
    )
    parser.add_argument(
        "--synthetic",
        type=Path,
        default=None,
        help="folder of the synthetic VideoQA set (videos + manifest.jsonl)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / "data" / "bench_pipeline",
        help="where generated videos are cached",
    )
    parser.add_argument(
        "--sets",
        nargs="+",
        default=None,
        choices=SET_NAMES,
        help=f"only these sets ({', '.join(SET_NAMES)}; synthetic needs --synthetic)",
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=None,
        help="frames per generated video (default 300; --quick: 150): real MSRVTT clips are "
        "10-30 s, ActivityNet videos minutes long, so seeking matters more than at 300",
    )
    parser.add_argument(
        "--gop",
        type=positive_int,
        default=None,
        help="keyframe spacing of the generated videos in frames (default 100)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument(
        "--min-videos",
        type=positive_int,
        default=None,
        help="at least this many videos per cell (default 64; --quick: 16); a cell also holds "
        "its warm-up and --min-steady-rounds whole rounds (one batch per worker; DALI: one "
        "iteration) after it, whichever is more",
    )
    parser.add_argument(
        "--min-steady-rounds",
        type=positive_int,
        default=MIN_STEADY_ROUNDS,
        help=f"whole rounds after the warm-up that a cell is sized for, and below which it is "
        f"flagged short (default {MIN_STEADY_ROUNDS})",
    )
    parser.add_argument(
        "--max-seconds",
        type=positive_float,
        default=None,
        help="soft cap: a cell that holds its --min-steady-rounds stops at a round's end before "
        "this (default: none, the whole sized epoch)",
    )
    parser.add_argument(
        "--hard-max-seconds",
        type=positive_float,
        default=None,
        help="hard cap: a cell stops at the first batch past this, or at a round's end when the "
        "next round would end past it, whatever it holds (default: 3 x --max-seconds, or none)",
    )
    parser.add_argument("--quick", action="store_true", help="few small videos: a CPU sanity run")
    parser.add_argument("--out-dir", "--out", type=Path, default=None,
                        help="CSV folder (default benchmarks/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sets and "synthetic" in args.sets and args.synthetic is None:
        parser.error("--sets synthetic needs --synthetic DIR (the folder of the synthetic set)")

    backend_names = list(dict.fromkeys(args.backend))
    if "dali" in backend_names:
        from siasam_fast.pipeline.dali import dali_available

        if not dali_available():
            parser.error("--backend dali needs nvidia-dali (pip install 'siasam-fast[gpu]')")
    worker_counts = args.workers or ([1, 2] if args.quick else [1, 4, 16])
    if args.dali_workers is not None:
        dali_workers = args.dali_workers
    else:
        dali_workers = 2 if args.quick else 4
    min_videos = args.min_videos or (16 if args.quick else 64)
    probe_workers = max(1, min(8, os.cpu_count() or 1))
    codec = args.codec
    if codec == "auto":
        codec = "vp9" if "dali" in backend_names and dali_device() == "cpu" else "h264"
    if codec == "vp9" and "dali" in backend_names and dali_device() == "cpu":
        print(
            "DALI decodes on the CPU here (no GPU), where it reads VP8 / VP9 / MJPEG only: the "
            "generated sets are VP9 for every backend in this run",
            file=sys.stderr,
        )

    hard_max_seconds = args.hard_max_seconds
    if hard_max_seconds is None and args.max_seconds is not None:
        hard_max_seconds = 3 * args.max_seconds
    suffix = "_quick" if args.quick else ""
    path = results_path(f"pipeline_{'_'.join(backend_names)}{suffix}.csv", args.out_dir)
    # Rows go to NAME.partial.csv once a cell has been measured (environment_isolated: a child
    # process, so that its heavy imports stay out of the workers); NAME.csv is written when the
    # run ends, so an interrupted run leaves an earlier finished one as it was.
    results = RowLog(path, environment_isolated, lambda r: r.get("status") in MEASURED)
    rows, env, add = results.rows, results.env, results.add

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        sets: list[tuple[str, dict, str]] = []
        if args.synthetic is not None and (not args.sets or "synthetic" in args.sets):
            records = synthetic_set(args.synthetic, args.work_dir, probe_workers)
            if records:
                codecs = {r.codec for r in records.values() if r.ok}
                sets.append(("synthetic", records, codecs.pop() if len(codecs) == 1 else "mixed"))
            else:
                add({"set": "synthetic", "status": "skipped",
                     "reason": f"--synthetic {args.synthetic}: not a folder"})
        for spec, named in zip(video_sets(args.quick, codec, args.frames, args.gop),
                               video_sets(args.quick, codec)):
            if args.sets and named.name not in args.sets:
                continue
            try:
                sets.append((spec.name, prepare_set(spec, args.work_dir, probe_workers), codec))
            except Exception as err:  # noqa: BLE001 - the other sets still run
                log(traceback.format_exc())
                add({"set": spec.name, "resolution": f"{spec.width}x{spec.height}", "codec": codec,
                     "status": "failed", "reason": f"generating the set: {failure_reason(err)}"})

        run_benchmark(
            backend_names,
            sets,
            worker_counts=worker_counts,
            dali_workers=dali_workers,
            batch_size=args.batch_size,
            image_size=args.image_size,
            min_videos=min_videos,
            max_seconds=args.max_seconds,
            hard_max_seconds=hard_max_seconds,
            dali_threads=args.dali_threads,
            dali_groups=args.dali_groups,
            dali_trims=DALI_TRIM_MODES[args.dali_trim],
            min_steady_rounds=args.min_steady_rounds,
            log=log,
            on_row=add,
        )
    except KeyboardInterrupt:
        return results.interrupted()
    if not results.measured():  # an earlier CSV stays as it was
        reasons = "; ".join(f"{r['set']} {r.get('backend', '')}: {r['reason']}".replace(" :", ":")
                            for r in rows)
        return report_no_rows(path, reasons or "nothing to measure")

    print(
        f"\npipeline backends={' '.join(backend_names)} on {env['device']} "
        f"({env['cpu_count']} CPUs), N={SAMPLING.num_clips} clips x "
        f"B={SAMPLING.frames_per_clip} frames, stride {SAMPLING.stride}, image {args.image_size}, "
        f"batch {args.batch_size}"
    )
    print(format_table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    for line in summary_lines(rows, args.min_steady_rounds):
        print(line)
    print(f"wrote {results.finish()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
