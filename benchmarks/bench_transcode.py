"""Fast random access: short-GOP transcodes and keyframe-aware sampling vs the original videos.

    python benchmarks/bench_transcode.py --quick              # CPU sanity run, 320x240
    python benchmarks/bench_transcode.py --workers 1 4 16     # 1280x720, GOP 100 -> 8 / 16 / 32
    python benchmarks/bench_transcode.py --backend dali       # + DALI videos/s (GPU)

The original set is bench_pipeline's generator (textured, panning, noisy H.264 with B-frames, GOP
100: ``activitynet-like`` 1280x720, 8 videos of 300 frames; ``--quick``: 320x240, 4 videos), and
``transcode.py`` makes copies with a keyframe every 8, 16 and 32 frames (``--gops``). For each set
and each sampling variant (``paper``: the uniform anchor of the paper; ``shift16``:
``keyframe_max_shift=16``; ``tau16``: ``preroll_temperature=16``; N=9 clips x B=8 frames, stride 4)
the rows give:

- ``model_decoded_per_needed``: frames decoded per frame the clips need, from the cost model
  (``planner.sampling_cost``, ``--draws`` draws per video);
- ``measured_decoded_per_needed``: the same through ``decode_frames``' DecodeStats on
  ``--measure-draws`` draws per video; ``model_exact``: whether the model predicted every one of
  those decodes exactly;
- ``anchor_choices``: the effective number of anchor starts (exp of the entropy of
  ``anchor_distribution``, mean over videos): what a sampling option costs in randomness;
- ``videos_per_s``: a training epoch through the loader, pyav at each ``--workers`` count and,
  with ``--backend dali`` where DALI and a GPU are present, DALI on NVDEC (else skipped, noted);
  start-up included; ``steady_videos_per_s`` leaves out the first batch (worker or pipeline
  start-up), the rate of a long run: raise ``--min-videos`` where start-up weighs in;
- ``bytes``, ``growth``: disk size of the set and its ratio to the original; ``transcode_s`` and
  ``encoder``: how the copy was made. The copies use ``--crf 23`` by default, the generator's own
  quality, so the growth is what the shorter GOP costs rather than a change of quality (the
  generated sensor noise makes every keyframe expensive: real footage grows less).

The measured ratio comes from the first ``--measure-draws`` of the model's draws (the same random
numbers), so it is the noisier of the two; ``model_exact`` says the model matched each decode.

Rows go to benchmarks/results/transcode[_quick].csv with the environment.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_pipeline, when imported

from bench_pipeline import VideoSet, bench_examples, prepare_set  # noqa: E402 - not a copy

from siasam_fast.benchutil import (  # noqa: E402
    DALI_TRIM_MODES,
    environment,
    format_table,
    int_in_range,
    nonneg_int,
    positive_int,
    report_no_rows,
    results_path,
    write_csv,
)
from siasam_fast.pipeline.dataset import build_loader  # noqa: E402
from siasam_fast.pipeline.manifest import load_manifest  # noqa: E402
from siasam_fast.pipeline.planner import decode_cost, sampling_cost  # noqa: E402
from siasam_fast.pipeline.pyav_decode import DecodeStats, decode_frames  # noqa: E402
from siasam_fast.pipeline.transcode import nvenc_available, summary_row, transcode  # noqa: E402
from siasam_fast.sampling import (  # noqa: E402
    SamplingConfig,
    anchor_distribution,
    example_rng,
    sample_siamese_clips,
)

ROOT = Path(__file__).resolve().parent.parent
PAPER = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)
SAMPLINGS = {
    "paper": PAPER,
    "shift16": SamplingConfig(**{**PAPER.__dict__, "keyframe_max_shift": 16}),
    "tau16": SamplingConfig(**{**PAPER.__dict__, "preroll_temperature": 16.0}),
}


def original_set(quick: bool) -> VideoSet:
    if quick:
        return VideoSet("msrvtt-like", 320, 240, 4, 300, gop=100)
    return VideoSet("activitynet-like", 1280, 720, 8, 300, gop=100)


# ----------------------------------------------------------------------------------------------
# Measuring


def decode_ratios(records: dict, cfg: SamplingConfig, draws: int, seed: int = 0) -> dict:
    """Decoded per needed frame through the real decoder, and whether the model predicted it."""
    needed = decoded = 0
    exact = True
    for v, record in enumerate(r for _, r in sorted(records.items()) if r.ok):
        for i in range(draws):
            clips = sample_siamese_clips(record.num_frames, cfg, example_rng(seed, i, v),
                                         keyframes=record.keyframes)
            if clips.skipped:
                continue
            stats = DecodeStats()
            decode_frames(record, clips.unique, stats=stats)
            model = decode_cost(record.keyframes, clips.unique)
            exact &= model.decoded == stats.decoded and stats.restarts == 0
            needed += len(clips.unique)
            decoded += stats.decoded
    return {"measured_decoded_per_needed": decoded / max(needed, 1), "model_exact": exact}


def anchor_choices(records: dict, cfg: SamplingConfig) -> float:
    """Mean over videos of exp(entropy) of the anchor distribution (effective anchor count)."""
    values = []
    for record in records.values():
        if not record.ok:
            continue
        _, p = anchor_distribution(record.num_frames, cfg, record.keyframes)
        if p.size:
            values.append(math.exp(-(p * np.log(p)).sum()))
    return float(np.mean(values)) if values else float("nan")


def dali_loader_factory():
    """DALI's loader factory when DALI, its loader module and a GPU are all here, else why not."""
    if not torch.cuda.is_available():
        return None, "no CUDA GPU (DALI's CPU decoder has no H.264)"
    try:
        from siasam_fast.pipeline.dali import build_dali_loader
    except ImportError as err:
        return None, f"DALI loader unavailable ({err})"
    return build_dali_loader, ""


def loader_rate(make_loader, records: dict, cfg: SamplingConfig, *, workers: int,
                batch_size: int, image_size: int, min_videos: int, seed: int = 0) -> dict:
    """Videos/s over one training epoch of ``min_videos`` or more examples, start-up included
    (``videos_per_s``) and after the first batch (``steady_videos_per_s``: the rate a long
    training run sees once the workers or DALI's pipeline are up)."""
    examples = bench_examples(records, min_videos)
    start = time.perf_counter()
    loader = make_loader(examples, records, cfg, "train", batch_size=batch_size,
                         image_size=image_size, num_workers=workers, seed=seed)
    videos = first_videos = 0
    first = None
    for batch in loader:
        videos += len(batch["example_index"])
        if first is None:
            first, first_videos = time.perf_counter() - start, videos
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del loader
    steady = ((videos - first_videos) / (seconds - first)
              if first is not None and videos > first_videos else None)
    return {"videos": videos, "seconds": seconds, "videos_per_s": videos / seconds,
            "steady_videos_per_s": steady, "first_batch_s": first}


def set_bytes(records: dict) -> int:
    return sum(r.size for r in records.values() if r.ok)


# ----------------------------------------------------------------------------------------------


def even_height(text: str) -> int:
    """An argparse type: an even height >= 2 (4:2:0 chroma halves it)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 2 or value % 2:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be an even integer >= 2 "
                                          "(4:2:0 chroma)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small 320x240 set: a CPU run")
    parser.add_argument("--gops", type=positive_int, nargs="+", default=[8, 16, 32],
                        help="keyframe spacings of the transcoded copies (default 8 16 32)")
    parser.add_argument("--backend", choices=("pyav", "dali"), default="pyav",
                        help="dali: also measure DALI videos/s (needs DALI and a GPU)")
    parser.add_argument("--workers", type=nonneg_int, nargs="+", default=None,
                        help="pyav DataLoader worker counts (default 1 4 16; --quick: 1 2; "
                        "0: in this process)")
    parser.add_argument("--samplings", nargs="+", choices=sorted(SAMPLINGS),
                        default=list(SAMPLINGS), help="sampling variants (default: all)")
    parser.add_argument("--dali-groups", type=positive_int, nargs="+", default=[1],
                        help="DALI decode groups to measure (batches per DALI iteration; "
                        "default 1)")
    parser.add_argument("--dali-trim", choices=list(DALI_TRIM_MODES), default="off",
                        help="DALI gets each file whole (off, the default), only the stretch its "
                        "frames need (on: data.dali_trim), or both, compared")
    parser.add_argument("--encoder", choices=("auto", "cpu", "nvenc"), default="auto")
    parser.add_argument("--crf", type=int_in_range(0, 51), default=23,
                        help="quality of the copies, 0 to 51 (default 23: the generator's own)")
    parser.add_argument("--height", type=even_height, default=None,
                        help="also downscale the copies to this even height (default: keep)")
    parser.add_argument("--draws", type=positive_int, default=64,
                        help="cost-model draws per video")
    parser.add_argument("--measure-draws", type=positive_int, default=None,
                        help="decoded draws per video (default 8; --quick: 4)")
    parser.add_argument("--min-videos", type=positive_int, default=None,
                        help="videos per throughput measurement (default 64; --quick: 16)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench_transcode",
                        help="where the generated and transcoded videos are cached")
    parser.add_argument("--out-dir", "--out", type=Path, default=None,
                        help="CSV folder (default benchmarks/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.encoder == "nvenc":  # refused now rather than after generating the original set
        ok, why = nvenc_available("h264")
        if not ok:
            parser.error(f"--encoder nvenc: {why}; use --encoder cpu or auto")

    worker_counts = args.workers or ([1, 2] if args.quick else [1, 4, 16])
    measure_draws = args.measure_draws or (4 if args.quick else 8)
    min_videos = args.min_videos or (16 if args.quick else 64)
    cpus = torch.multiprocessing.cpu_count()
    backends = {"pyav": build_loader}
    notes = []
    if args.backend == "dali":
        factory, why = dali_loader_factory()
        if factory is None:
            notes.append(f"dali skipped: {why}")
            print(notes[-1], file=sys.stderr)
        else:
            backends["dali"] = factory

    spec = original_set(args.quick)
    original = prepare_set(spec, args.work_dir, workers=max(1, min(8, cpus)))
    folder = Path(next(iter(original.values())).path).parent
    sets = [(f"gop{spec.gop} (original)", spec.gop, original, {})]
    for gop in args.gops:
        suffix = f"-h{args.height}" if args.height else ""
        dst = args.work_dir / f"{folder.name}-gop{gop}{suffix}"
        summary = transcode(folder, dst, gop=gop, height=args.height, encoder=args.encoder,
                            crf=args.crf, workers=cpus, source_manifest=folder / "manifest.jsonl")
        print(summary.summary(), file=sys.stderr)
        info = summary_row(summary)
        sets.append((f"gop{gop}", gop, load_manifest(dst / "manifest.jsonl"),
                     {"encoder": info["encoder"], "transcode_s": info["seconds"]}))

    base_bytes = set_bytes(original)
    rows = []
    for name, gop, records, made in sets:
        ok = [r for r in records.values() if r.ok]
        if not ok:
            notes.append(f"{name}: no video could be read, skipped")
            print(notes[-1], file=sys.stderr)
            continue
        resolution = f"{ok[0].width}x{ok[0].height}"
        for sampling in args.samplings:
            cfg = SAMPLINGS[sampling]
            model = sampling_cost(records.values(), cfg, draws=args.draws)
            common = {
                "set": name,
                "gop": gop,
                "resolution": resolution,
                "sampling": sampling,
                "bytes": set_bytes(records),
                "growth": set_bytes(records) / base_bytes if base_bytes else None,
                **made,
                "needed": model.needed,
                "model_decoded_per_needed": model.ratio,
                "model_preroll": model.preroll,
                **decode_ratios(records, cfg, measure_draws),
                "anchor_choices": anchor_choices(records, cfg),
            }
            for backend, factory in backends.items():
                trims = DALI_TRIM_MODES[args.dali_trim]
                runs = ([(w, 1, False) for w in worker_counts] if backend == "pyav"
                        else [(min(4, cpus), g, t) for g in args.dali_groups for t in trims])
                for workers, group, trim in runs:
                    knobs = {"decode_group": group} if group != 1 else {}
                    knobs.update({"trim": True} if trim else {})
                    make = functools.partial(factory, **knobs) if knobs else factory
                    rate = loader_rate(make, records, cfg, workers=workers,
                                       batch_size=args.batch_size, image_size=args.image_size,
                                       min_videos=min_videos)
                    rows.append({**common, "backend": backend, "workers": workers,
                                 "group": "" if backend == "pyav" else group,
                                 "trim": "" if backend == "pyav" else trim, **rate})
                    print(f"  {name} {sampling} {backend} workers={workers}"
                          f"{'' if group == 1 else f' group={group}'}{' trim' if trim else ''}: "
                          f"{rate['videos_per_s']:.2f} videos/s", file=sys.stderr)

    path = results_path(f"transcode{'_quick' if args.quick else ''}.csv", args.out_dir)
    if not rows:  # an earlier run's CSV stays as it was
        return report_no_rows(path, "; ".join(notes))
    env = environment()
    columns = ["set", "resolution", "sampling", "bytes", "growth", "model_decoded_per_needed",
               "measured_decoded_per_needed", "model_exact", "anchor_choices", "backend",
               "workers", "group", "trim", "videos_per_s", "steady_videos_per_s"]
    print(f"\ntranscode benchmark on {env['device']} ({env['cpu_count']} CPUs): N=9 clips x B=8 "
          f"frames, stride 4, {len(original)} videos of {spec.num_frames} frames, "
          f"image {args.image_size}")
    print(format_table(rows, columns))
    for note in notes:
        print(note)
    path = write_csv(rows, path, env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
