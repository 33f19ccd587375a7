"""Decoding-pipeline throughput: videos/s and frames/s, with and without frame de-duplication.

    python benchmarks/bench_pipeline.py --backend pyav                  # full sweep
    python benchmarks/bench_pipeline.py --backend pyav --quick          # CPU sanity check
    python benchmarks/bench_pipeline.py --synthetic data/synthetic --workers 1 4 16

Each video yields the siamese clips of training (N=9 clips x B=8 frames, stride 4, the same
sampling function as training). "dedup" decodes the sorted unique frames U of the clips once and
gathers clips from them; "no dedup" decodes every clip on its own (the naive baseline). Sets:

- ``synthetic``: an existing folder (``--synthetic DIR``) with ``manifest.jsonl`` (built into the
  work dir if absent); one example per video. Skipped when not given.
- ``msrvtt-like``: 320x240 H.264, 30 fps; ``activitynet-like``: 1280x720 H.264, 30 fps. Textured
  background panning under moving shapes and sensor noise (so the bitrate is realistic), a few
  hundred frames, GOP 100 with B-frames, like the real datasets. Generated once and cached under
  ``--work-dir``.

Timing covers a whole epoch of the loader, worker start-up included (fork: tens of ms). Rows go to
benchmarks/results/pipeline_<backend>.csv with the environment. Backends are a registry
(``BACKENDS``): a DALI entry only needs a loader factory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siasam_fast.benchutil import environment, format_table, results_path, write_csv
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


def _pyav_loader(examples, manifest, cfg, *, batch_size, image_size, workers, dedup, seed):
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


BACKENDS: dict[str, Backend] = {"pyav": Backend("pyav", _pyav_loader)}


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


def video_sets(quick: bool) -> list[VideoSet]:
    if quick:
        return [
            VideoSet("msrvtt-like", 320, 240, 4, 150),
            VideoSet("activitynet-like", 1280, 720, 2, 150),
        ]
    return [
        VideoSet("msrvtt-like", 320, 240, 32, 300),
        VideoSet("activitynet-like", 1280, 720, 8, 300),
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
    """Panning textured background, moving shapes and noise, H.264 (B-frames, GOP ``spec.gop``)."""
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
    tmp = path.with_suffix(".partial.mp4")
    container = av.open(str(tmp), "w")
    stream = container.add_stream("libx264", rate=spec.fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"preset": "veryfast", "crf": "23", "g": str(spec.gop), "bf": "3"}
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
    folder = work_dir / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "spec.json"
    wanted = json.dumps(spec.__dict__, sort_keys=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        for old in folder.glob("*.mp4"):
            old.unlink()
        stamp.unlink(missing_ok=True)
    missing = [i for i in range(spec.num_videos) if not (folder / f"video{i}.mp4").exists()]
    if missing:
        from tqdm.auto import tqdm

        for i in tqdm(missing, desc=f"generating {spec.name}", unit="video"):
            write_textured_video(folder / f"video{i}.mp4", spec, seed=i)
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
) -> dict:
    ok = [vid for vid, r in sorted(records.items()) if r.ok]
    repeats = max(1, -(-min_videos // len(ok)))
    examples = [
        QAExample(qid=f"{vid}#{k}", video_id=vid, question="what happens?")
        for k in range(repeats)
        for vid in ok
    ]
    loader = backend.make_loader(
        examples,
        records,
        SAMPLING,
        batch_size=batch_size,
        image_size=image_size,
        workers=workers,
        dedup=dedup,
        seed=seed,
    )
    videos = clip_frames = unique = 0
    first_batch = None
    start = time.perf_counter()
    for batch in loader:
        if first_batch is None:
            first_batch = time.perf_counter() - start
        videos += len(batch["example_index"])
        clip_frames += int(batch["frame_mask"].sum())
        unique += int(batch["num_unique"].sum())
    seconds = time.perf_counter() - start
    del loader
    return {
        "videos": videos,
        "seconds": seconds,
        "videos_per_s": videos / seconds,
        "frames_per_s": clip_frames / seconds,  # output clip frames (N x B per video)
        "decoded_per_s": unique / seconds,  # frames decoded and transformed
        "unique_per_video": unique / max(videos, 1),
        "first_batch_s": first_batch,  # worker start-up and the first batch
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="pyav", choices=sorted(BACKENDS))
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="DataLoader worker counts (default 1 4 16; --quick: 1 2)",
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
        help="only these sets (synthetic, msrvtt-like, activitynet-like)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--min-videos",
        type=int,
        default=None,
        help="videos per measurement (default 64; --quick: 16)",
    )
    parser.add_argument("--quick", action="store_true", help="few small videos: a CPU sanity run")
    parser.add_argument("--out-dir", type=Path, default=None, help="CSV folder")
    args = parser.parse_args(argv)

    backend = BACKENDS[args.backend]
    worker_counts = args.workers or ([1, 2] if args.quick else [1, 4, 16])
    if not backend.uses_workers:
        worker_counts = [0]
    min_videos = args.min_videos or (16 if args.quick else 64)
    probe_workers = max(1, min(8, torch.multiprocessing.cpu_count()))

    sets: list[tuple[str, dict]] = []
    if args.synthetic is not None:
        records = synthetic_set(args.synthetic, args.work_dir, probe_workers)
        if records:
            sets.append(("synthetic", records))
    for spec in video_sets(args.quick):
        sets.append((spec.name, prepare_set(spec, args.work_dir, probe_workers)))
    if args.sets:
        sets = [(name, r) for name, r in sets if name in args.sets]

    rows = []
    for name, records in sets:
        ok = [r for r in records.values() if r.ok]
        if not ok:
            print(f"{name}: no ok video, skipped", file=sys.stderr)
            continue
        resolution = f"{ok[0].width}x{ok[0].height}"
        for dedup in (True, False):
            for workers in worker_counts:
                result = measure(
                    backend,
                    records,
                    workers=workers,
                    dedup=dedup,
                    batch_size=args.batch_size,
                    image_size=args.image_size,
                    min_videos=min_videos,
                )
                row = {
                    "set": name,
                    "resolution": resolution,
                    "backend": backend.name,
                    "dedup": dedup,
                    "workers": workers,
                    **result,
                }
                rows.append(row)
                print(
                    f"  {name} dedup={dedup} workers={workers}: "
                    f"{result['videos_per_s']:.2f} videos/s",
                    file=sys.stderr,
                )

    env = environment()  # after measuring: it imports heavy libraries the workers need not fork
    columns = [
        "set",
        "resolution",
        "dedup",
        "workers",
        "videos",
        "seconds",
        "videos_per_s",
        "frames_per_s",
        "decoded_per_s",
        "unique_per_video",
        "first_batch_s",
    ]
    print(
        f"\npipeline backend={backend.name} on {env['device']} ({env['cpu_count']} CPUs), "
        f"N={SAMPLING.num_clips} clips x B={SAMPLING.frames_per_clip} frames, "
        f"stride {SAMPLING.stride}, image {args.image_size}"
    )
    print(format_table(rows, columns))
    for name, _ in sets:
        for workers in worker_counts:
            pair = {r["dedup"]: r for r in rows if r["set"] == name and r["workers"] == workers}
            if len(pair) == 2:
                speedup = pair[True]["videos_per_s"] / pair[False]["videos_per_s"]
                print(f"{name}, {workers} workers: dedup is {speedup:.2f}x faster")
    suffix = "_quick" if args.quick else ""
    path = write_csv(rows, results_path(f"pipeline_{backend.name}{suffix}.csv", args.out_dir), env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
