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

Timing covers a whole epoch of the loader (or ``--max-seconds`` of it), worker / pipeline start-up
included (``first_batch_s`` shows it); ``steady_videos_per_s`` leaves the first batch out. Other
columns: ``cpu_util``, CPU seconds of this process and its children
(workers, DALI's readers) per wall second, i.e. cores kept busy; ``torch_mem_mb``,
``torch.cuda.max_memory_allocated`` during the run; ``device_mem_mb``, the peak of the GPU memory
in use by any allocator (DALI's pool included: it has no query of its own in 2.4) over the run, less
what was in use before. Rows go to benchmarks/results/pipeline_<backends>.csv with the environment.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siasam_fast.benchutil import (
    DALI_TRIM_MODES,
    environment,
    format_table,
    nonneg_int,
    positive_float,
    positive_int,
    report_no_rows,
    results_path,
    write_csv,
)
from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.dataset import build_loader
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

    return build_dali_loader(
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


def dali_device() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


BACKENDS: dict[str, Backend] = {
    "pyav": Backend("pyav", _pyav_loader),
    "dali": Backend("dali", _dali_loader, uses_workers=False),
}
# Codecs each backend decodes here: DALI's CPU decoder has no H.264.
DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")


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


def video_sets(quick: bool, codec: str = "h264") -> list[VideoSet]:
    if quick:
        return [
            VideoSet("msrvtt-like", 320, 240, 4, 150, codec=codec),
            VideoSet("activitynet-like", 1280, 720, 2, 150, codec=codec),
        ]
    return [
        VideoSet("msrvtt-like", 320, 240, 32, 300, codec=codec),
        VideoSet("activitynet-like", 1280, 720, 8, 300, codec=codec),
    ]


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
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(spec.gop), "bf": "3"}
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
    """Generate (once) and index a video set; returns the manifest records."""
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

        for i in tqdm(missing, desc=f"generating {spec.folder_name}", unit="video"):
            write_textured_video(folder / name.format(i), spec, seed=i)
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


def bench_examples(records: dict, min_videos: int) -> list[QAExample]:
    """One question per ok video, repeated in whole passes until there are ``min_videos``."""
    ok = [vid for vid, r in sorted(records.items()) if r.ok]
    repeats = max(1, -(-min_videos // len(ok)))
    return [
        QAExample(qid=f"{vid}#{k}", video_id=vid, question="what happens?")
        for k in range(repeats)
        for vid in ok
    ]


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
    threads: int | None = None,
    group: int = 1,
    trim: bool = False,
) -> dict:
    """One epoch of ``min_videos`` (rounded up to whole passes over the set), or what fits in
    ``max_seconds``. ``steady_videos_per_s`` leaves out the first batch (start-up)."""
    examples = bench_examples(records, min_videos)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch_before = torch.cuda.memory_allocated()
        device_before = device_peak = device_memory_in_use()
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    loader = backend.make_loader(
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
    videos = clip_frames = unique = first_videos = 0
    first_batch = None
    batches = iter(loader)
    for batch in batches:
        videos += len(batch["example_index"])
        clip_frames += int(batch["frame_mask"].sum())
        unique += int(batch["num_unique"].sum())
        if first_batch is None:
            first_batch, first_videos = time.perf_counter() - start, videos
        if cuda:
            device_peak = max(device_peak, device_memory_in_use())
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    del batches, loader  # stops the workers / the pipeline
    steady = (videos - first_videos) / (seconds - first_batch) if videos > first_videos else None
    row = {
        "videos": videos,
        "seconds": seconds,
        "videos_per_s": videos / seconds,
        "steady_videos_per_s": steady,
        "frames_per_s": clip_frames / seconds,  # output clip frames (N x B per video)
        "decoded_per_s": unique / seconds,  # frames decoded and transformed
        "unique_per_video": unique / max(videos, 1),
        "first_batch_s": first_batch,  # worker / pipeline start-up and the first batch
        "cpu_util": cpu / seconds,  # cores kept busy (this process and its children)
    }
    if cuda:
        row["torch_mem_mb"] = (torch.cuda.max_memory_allocated() - torch_before) / 2**20
        row["device_mem_mb"] = (device_peak - device_before) / 2**20
    return row


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
    dali_threads: list[int] | None = None,
    dali_groups: list[int] | None = None,
    dali_trims: tuple[bool, ...] = (False,),
    dedup_modes: tuple[bool, ...] = (True, False),
    log=print,
) -> list[dict]:
    """Rows for every (set, backend, dedup, workers, DALI threads); ``sets`` holds (name, records,
    codec). ``dali_threads``: DALI's thread counts to try (its mixed video decoder decodes one
    sample per thread, so they bound how many NVDEC sessions run at once); default: the
    loader's own (``default_num_threads``). ``dali_groups``: DALI decode groups to try (batches
    decoded per iteration, ``build_dali_loader(decode_group=...)``; default 1). ``dali_trims``:
    whether DALI gets each file whole or only the stretch its frames need
    (``build_dali_loader(trim=...)``; default whole only)."""
    from siasam_fast.pipeline.dali import default_num_threads

    rows = []
    for name, records, codec in sets:
        ok = [r for r in records.values() if r.ok]
        if not ok:
            log(f"{name}: no ok video, skipped")
            continue
        resolution = f"{ok[0].width}x{ok[0].height}"
        for backend_name in backend_names:
            backend = BACKENDS[backend_name]
            if not decodes(backend_name, codec):
                log(f"{name}: {backend_name} on {dali_device()} cannot decode {codec}, skipped")
                continue
            counts = worker_counts if backend.uses_workers else [dali_workers]
            thread_counts = [None] if backend.uses_workers else (dali_threads or [None])
            groups = [1] if backend.uses_workers else (dali_groups or [1])
            trims = (False,) if backend.uses_workers else dali_trims
            for dedup, workers, threads, group, trim in itertools.product(
                    dedup_modes, counts, thread_counts, groups, trims):
                result = measure(
                    backend,
                    records,
                    workers=workers,
                    dedup=dedup,
                    batch_size=batch_size,
                    image_size=image_size,
                    min_videos=min_videos,
                    max_seconds=max_seconds,
                    threads=threads,
                    group=group,
                    trim=trim,
                )
                device = dali_device() if backend_name == "dali" else "cpu"
                rows.append(
                    {
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
                        **result,
                    }
                )
                log(
                    f"  {name} {backend_name} dedup={dedup} workers={workers}"
                    f"{'' if threads is None else f' threads={threads}'}"
                    f"{'' if group == 1 else f' group={group}'}"
                    f"{' trim' if trim else ''}: "
                    f"{result['videos_per_s']:.2f} videos/s"
                )
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
    "videos",
    "seconds",
    "videos_per_s",
    "steady_videos_per_s",
    "frames_per_s",
    "decoded_per_s",
    "unique_per_video",
    "first_batch_s",
    "cpu_util",
    "torch_mem_mb",
    "device_mem_mb",
]


def start_up_bound(row: dict) -> bool:
    """Fewer than 3 batches measured (a --max-seconds cap hit during start-up): the rate mostly
    measures the start-up and the work still in flight is not counted."""
    return row["videos"] < 3 * row.get("batch_size", 1)


def summary_lines(rows: list[dict]) -> list[str]:
    """Dedup speed-ups per (set, backend, workers, threads) and the best DALI row against the
    best PyAV row."""
    lines = []
    caveat = " (start-up bound: fewer than 3 batches measured)"

    def key(r):
        return (r["set"], r["backend"], r["workers"], r.get("threads", ""), r.get("group", ""),
                r.get("trim", ""), r.get("batch_size"))

    for k in sorted({key(r) for r in rows}, key=str):
        name, backend, workers, threads, group, trim = k[:6]
        pair = {r["dedup"]: r for r in rows if key(r) == k}
        if len(pair) == 2:
            speedup = pair[True]["videos_per_s"] / pair[False]["videos_per_s"]
            note = caveat if any(start_up_bound(r) for r in pair.values()) else ""
            where = f"{workers} workers" + (f", {threads} threads" if threads != "" else "")
            where += f", groups of {group}" if group not in ("", 1) else ""
            where += ", trimmed" if trim is True else ""
            lines.append(f"{name}, {backend}, {where}: dedup is {speedup:.2f}x faster{note}")
    for name in sorted({r["set"] for r in rows}):
        dali = [r for r in rows if r["set"] == name and r["backend"] == "dali" and r["dedup"]]
        pyav = [r for r in rows if r["set"] == name and r["backend"] == "pyav" and r["dedup"]]
        if dali and pyav:
            best = max(pyav, key=lambda r: r["videos_per_s"])
            top = max(dali, key=lambda r: r["videos_per_s"])
            ratio = top["videos_per_s"] / best["videos_per_s"]
            note = caveat if start_up_bound(top) or start_up_bound(best) else ""
            threads = f", {top['threads']} threads" if top.get("threads", "") != "" else ""
            threads += f", batches of {top['batch_size']}" if "batch_size" in top else ""
            threads += f" in groups of {top['group']}" if top.get("group", 1) not in (1, "") else ""
            threads += ", trimmed" if top.get("trim") is True else ""
            lines.append(
                f"{name}: dali ({top['decoder']}{threads}) {ratio:.2f}x the best pyav "
                f"({best['workers']} workers), dedup on both{note}"
            )
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
        default="off",
        help="DALI gets each file whole (off, the default), only the stretch its frames need "
        "(on: data.dali_trim), or both, compared",
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
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument(
        "--min-videos",
        type=positive_int,
        default=None,
        help="videos per measurement (default 64; --quick: 16)",
    )
    parser.add_argument(
        "--max-seconds",
        type=positive_float,
        default=None,
        help="stop a measurement after this long (default: whole epoch of --min-videos)",
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

    sets: list[tuple[str, dict, str]] = []
    if args.synthetic is not None and (not args.sets or "synthetic" in args.sets):
        records = synthetic_set(args.synthetic, args.work_dir, probe_workers)
        if records:
            codecs = {r.codec for r in records.values() if r.ok}
            sets.append(("synthetic", records, codecs.pop() if len(codecs) == 1 else "mixed"))
    for spec in video_sets(args.quick, codec):
        if not args.sets or spec.name in args.sets:
            sets.append((spec.name, prepare_set(spec, args.work_dir, probe_workers), codec))

    rows = run_benchmark(
        backend_names,
        sets,
        worker_counts=worker_counts,
        dali_workers=dali_workers,
        batch_size=args.batch_size,
        image_size=args.image_size,
        min_videos=min_videos,
        max_seconds=args.max_seconds,
        dali_threads=args.dali_threads,
        dali_groups=args.dali_groups,
        dali_trims=DALI_TRIM_MODES[args.dali_trim],
        log=lambda text: print(text, file=sys.stderr),
    )
    suffix = "_quick" if args.quick else ""
    name = f"pipeline_{'_'.join(backend_names)}{suffix}.csv"
    if not rows:  # every set skipped: an earlier run's CSV stays as it was
        return report_no_rows(results_path(name, args.out_dir), "every set was skipped: see above")

    env = environment()  # after measuring: it imports heavy libraries the workers need not fork
    print(
        f"\npipeline backends={' '.join(backend_names)} on {env['device']} "
        f"({env['cpu_count']} CPUs), N={SAMPLING.num_clips} clips x "
        f"B={SAMPLING.frames_per_clip} frames, stride {SAMPLING.stride}, image {args.image_size}, "
        f"batch {args.batch_size}"
    )
    print(format_table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    for line in summary_lines(rows):
        print(line)
    path = write_csv(rows, results_path(name, args.out_dir), env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
