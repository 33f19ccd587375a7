"""Fast random access: short-GOP transcodes and keyframe-aware sampling vs the original videos.

    python benchmarks/bench_transcode.py --quick              # CPU sanity run, 320x240
    python benchmarks/bench_transcode.py --workers 1 4 16     # 1280x720, GOP 100 -> 8 / 16 / 32
    python benchmarks/bench_transcode.py --backend dali       # + DALI videos/s (GPU)

The original set is bench_pipeline's generator (textured, panning, noisy H.264 with B-frames, GOP
100: ``activitynet-like`` 1280x720, 8 videos of 300 frames; ``--quick``: 320x240, 4 videos;
``--original-gop`` / ``--original-frames`` change the keyframe spacing and length: with GOP 100 a
draw decodes about 2.2 frames per needed frame, whatever the length, so no copy can be more than
about 2.2x cheaper to decode; x264's default GOP of 250 in 900-frame videos gives about 4), and
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
  with ``--backend dali`` where DALI and a GPU are present, DALI on NVDEC (measured first; else a
  ``skipped`` row per cell, with the reason); start-up included. ``steady_videos_per_s``: whole
  rounds after the warm-up only (bench_pipeline's cells: one batch per worker or one DALI
  iteration per round, a warm-up of the batches queued at the start, cells sized by rounds:
  ``--min-steady-rounds``, at least ``--min-videos``; ``steady_rounds`` below that: ``short``);
  ``--max-seconds`` / ``--hard-max-seconds`` cap cells as in bench_pipeline;
- ``bytes``, ``growth``: disk size of the set and its ratio to the original, both on the same
  videos (``compared_videos``: those whose copy succeeded, on both sides); ``failed_transcodes``
  counts the others. The copies are encoded like the originals (libx264, the generator's preset
  ``veryfast``, 3 B-frames, ``--crf 23``), only the GOP differs, so the growth is what the shorter
  GOP costs rather than a change of preset or quality (the generated sensor noise makes every
  keyframe expensive: real footage grows less). ``growth_vs_control``: against a control copy, the
  original GOP re-encoded with the copies' very settings (``--no-control`` skips it), which holds
  whatever a re-encode costs by itself (and the preset, where ``--preset`` or NVENC changes it);
  ``transcode_s``, ``encoder``, ``preset``: how the copy was made. The copies are cached per GOP,
  height, encoder and preset: ``cached_copies`` counts the videos an earlier run had already
  made, and ``transcode_s`` is empty when this run encoded none (its time is the earlier run's).

Every row has a ``status``: ``disk`` (a set's sizes, one row per set written first, so that a run
cut short keeps every copy's growth), ``ok`` / ``short`` (a throughput cell), ``skipped`` or
``failed`` (``reason`` says why; a failing transcode, sampling or cell ends no other).

Rows go to benchmarks/results/transcode[_quick].partial.csv, rewritten atomically after every row
once one holds a result, and to transcode[_quick].csv (with a plot, .png) when the run ends: a
run cut short (Ctrl-C: exit status 130) keeps what finished in the partial file and leaves an
earlier finished CSV as it was, and so does a run that measures nothing.

The measured ratio comes from the first ``--measure-draws`` of the model's draws (the same random
numbers), so it is the noisier of the two; ``model_exact`` says the model matched each decode.

Every row carries the environment (device, versions).
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_pipeline, when imported

from bench_pipeline import (  # noqa: E402 - not a copy
    H264_OPTIONS,
    VideoSet,
    bench_examples,
    cell_videos,
    check_trimmed,
    failure_reason,
    prepare_set,
    rate_line,
    record_failure,
    time_epoch,
)

from siasam_fast.benchutil import (  # noqa: E402
    DALI_TRIM_MODES,
    MIN_STEADY_ROUNDS,
    Rounds,
    RowLog,
    dali_rounds,
    environment_isolated,
    format_table,
    int_in_range,
    nonneg_int,
    positive_float,
    positive_int,
    pyav_rounds,
    report_no_rows,
    results_path,
    save_figure,
)
from siasam_fast.pipeline.dataset import build_loader  # noqa: E402
from siasam_fast.pipeline.manifest import load_manifest  # noqa: E402
from siasam_fast.pipeline.planner import decode_cost, sampling_cost  # noqa: E402
from siasam_fast.pipeline.pyav_decode import DecodeStats, decode_frames  # noqa: E402
from siasam_fast.pipeline.transcode import (  # noqa: E402
    NVENC_PRESETS,
    X26X_PRESETS,
    choose_encoder,
    nvenc_available,
    summary_row,
    transcode,
)
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


def original_set(quick: bool, gop: int = 100, frames: int = 300) -> VideoSet:
    """The original set: 1280x720 (``quick``: 320x240), ``frames`` frames a video, a keyframe
    every ``gop`` frames; other GOPs and lengths are cached under names of their own."""
    name, width, height, videos = (("msrvtt-like", 320, 240, 4) if quick else
                                   ("activitynet-like", 1280, 720, 8))
    if (gop, frames) != (100, 300):
        name += f"-gop{gop}-{frames}f"
    return VideoSet(name, width, height, videos, frames, gop=gop)


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


def dali_cell_factory(factory, group: int, trim: bool):
    """``factory`` (DALI's) building the loader of a cell with decode group ``group`` and ``trim``,
    both passed as they are (the loader trims by default: a whole-file cell says so). Raises
    when the loader was asked to trim and turned it off (its check of trimmed decoding on NVDEC
    failed): such a cell would measure whole files under the trim label."""

    def make(*args, **kwargs):
        return check_trimmed(factory(*args, decode_group=group, trim=trim, **kwargs), trim)

    return make


def loader_rounds(backend: str, workers: int, group: int = 1) -> Rounds:
    """How the loader's batches arrive (``benchutil.Rounds``), with the factories' own prefetch
    depth."""
    if backend == "dali":
        from siasam_fast.pipeline.dali import build_dali_loader

        depth = inspect.signature(build_dali_loader).parameters["prefetch_factor"].default
        return dali_rounds(group, depth)
    depth = inspect.signature(build_loader).parameters["prefetch_factor"].default
    return pyav_rounds(workers, depth)


def loader_rate(make_loader, records: dict, cfg: SamplingConfig, *, workers: int,
                batch_size: int, image_size: int, min_videos: int, rounds: Rounds,
                seed: int = 0, max_seconds: float | None = None,
                hard_max_seconds: float | None = None,
                min_steady_rounds: int = MIN_STEADY_ROUNDS) -> dict:
    """Videos/s over one training epoch sized by rounds (bench_pipeline's ``cell_videos``: the
    warm-up and ``min_steady_rounds`` whole rounds, at least ``min_videos``), or what the caps let
    run of it: ``videos_per_s`` with the start-up, ``steady_videos_per_s`` over the whole rounds
    after the warm-up (the rate a long training run sees); bench_pipeline's ``time_epoch``."""
    examples = bench_examples(records, cell_videos(rounds, batch_size, min_videos,
                                                   min_steady_rounds))

    def make():
        return make_loader(examples, records, cfg, "train", batch_size=batch_size,
                           image_size=image_size, num_workers=workers, seed=seed)

    return time_epoch(make, rounds, max_seconds=max_seconds, hard_max_seconds=hard_max_seconds,
                      min_steady_rounds=min_steady_rounds)


def set_bytes(records: dict, ids=None) -> int:
    """Bytes of the ok videos of ``records`` (only those in ``ids`` when given)."""
    return sum(r.size for vid, r in records.items() if r.ok and (ids is None or vid in ids))


def ok_ids(records: dict) -> set[str]:
    return {vid for vid, r in records.items() if r.ok}


def growth(copy: dict, base: dict) -> tuple[float | None, int]:
    """Disk growth of ``copy`` over ``base`` on the same videos: those ok on both sides (a video
    whose copy failed counts on neither); (ratio or None, videos compared)."""
    ids = ok_ids(copy) & ok_ids(base)
    base_bytes = set_bytes(base, ids)
    return (set_bytes(copy, ids) / base_bytes if base_bytes else None), len(ids)


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


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Left: videos/s (steady rounds) of each measured cell, grouped by set, for the first
    sampling measured; right: frames decoded per needed frame (the cost model) and the disk
    growth of each set. None when no cell was measured."""
    cells = [r for r in rows if r.get("status") in ("ok", "short")
             and isinstance(r.get("steady_videos_per_s"), (int, float))]
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampling = cells[0]["sampling"]
    cells = [r for r in cells if r["sampling"] == sampling]
    sets = list(dict.fromkeys(r["set"] for r in cells))

    def label(r: dict) -> str:
        if r["backend"] == "pyav":
            return f"pyav, {r['workers']} workers"
        return (f"dali{', group ' + str(r['group']) if r.get('group') not in ('', 1) else ''}"
                f"{', trimmed' if r.get('trim') else ''}")

    labels = list(dict.fromkeys(label(r) for r in cells))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(labels)
    for j, name in enumerate(labels):
        rate = {r["set"]: r["steady_videos_per_s"] for r in cells if label(r) == name}
        ax1.bar([i + j * width for i in range(len(sets))], [rate.get(s, 0) for s in sets],
                width, label=name)
    ax1.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(sets))], sets,
                   fontsize=8)
    ax1.set_ylabel(f"videos/s (steady rounds), sampling {sampling}")
    ax1.legend(fontsize=8)
    first = {r["set"]: r for r in reversed(cells)}  # (the set's model and disk columns)
    ratios = [first[s].get("model_decoded_per_needed") or 0 for s in sets]
    growth = [first[s].get("growth") or 0 for s in sets]
    ax2.bar([i - 0.2 for i in range(len(sets))], ratios, 0.4, label="decoded / needed frame")
    ax2.bar([i + 0.2 for i in range(len(sets))], growth, 0.4, label="disk vs original")
    ax2.set_xticks(range(len(sets)), sets, fontsize=8)
    ax2.axhline(1.0, color="grey", linewidth=0.8)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small 320x240 set: a CPU run")
    parser.add_argument("--gops", type=positive_int, nargs="+", default=[8, 16, 32],
                        help="keyframe spacings of the transcoded copies (default 8 16 32)")
    parser.add_argument("--original-gop", type=positive_int, default=100,
                        help="keyframe spacing of the generated originals (default 100; x264's "
                        "own default is 250, common in downloaded video)")
    parser.add_argument("--original-frames", type=int_in_range(64, 100_000), default=300,
                        help="frames per generated original, 64 to 100000 (default 300)")
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
    parser.add_argument("--dali-trim", choices=list(DALI_TRIM_MODES), default="on",
                        help="DALI gets only the stretch of each file that its frames need (on, "
                        "the default, as data.dali_trim), each file whole (off), or both, "
                        "compared")
    parser.add_argument("--encoder", choices=("auto", "cpu", "nvenc"), default="auto")
    parser.add_argument("--crf", type=int_in_range(0, 51), default=int(H264_OPTIONS["crf"]),
                        help="quality of the copies, 0 to 51 (default "
                        f"{H264_OPTIONS['crf']}: the generator's own)")
    parser.add_argument("--preset", choices=[*X26X_PRESETS, *NVENC_PRESETS], default=None,
                        help="encoder preset of the copies (default: the generator's own, "
                        f"{H264_OPTIONS['preset']}, with libx264; NVENC's default with NVENC)")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the control copy (the original GOP re-encoded with the copies' "
                        "settings) that growth_vs_control is measured against")
    parser.add_argument("--height", type=even_height, default=None,
                        help="also downscale the copies to this even height (default: keep)")
    parser.add_argument("--draws", type=positive_int, default=64,
                        help="cost-model draws per video")
    parser.add_argument("--measure-draws", type=positive_int, default=None,
                        help="decoded draws per video (default 8; --quick: 4)")
    parser.add_argument("--min-videos", type=positive_int, default=None,
                        help="at least this many videos per throughput cell (default 64; "
                        "--quick: 16); a cell also holds its warm-up and --min-steady-rounds "
                        "whole rounds after it, whichever is more")
    parser.add_argument("--min-steady-rounds", type=positive_int, default=MIN_STEADY_ROUNDS,
                        help="whole rounds after the warm-up a cell is sized for, and below "
                        f"which it is flagged short (default {MIN_STEADY_ROUNDS})")
    parser.add_argument("--max-seconds", type=positive_float, default=None,
                        help="soft cap: a cell that holds its --min-steady-rounds stops at a "
                        "round's end before this (default: none)")
    parser.add_argument("--hard-max-seconds", type=positive_float, default=None,
                        help="hard cap: a cell stops at the first batch past this, whatever it "
                        "holds (default: 3 x --max-seconds, or none)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench_transcode",
                        help="where the generated and transcoded videos are cached")
    parser.add_argument("--out-dir", "--out", type=Path, default=None,
                        help="CSV folder (default benchmarks/results)")
    return parser


STATUS_NO_RESULT = ("skipped", "failed")  # rows that hold neither a measurement nor sizes
COLUMNS = ["set", "resolution", "sampling", "status", "bytes", "compared_videos", "growth",
           "growth_vs_control", "failed_transcodes", "model_decoded_per_needed",
           "measured_decoded_per_needed", "model_exact", "anchor_choices", "backend", "workers",
           "group", "trim", "videos_per_s", "steady_videos_per_s", "steady_rounds", "out_dtype",
           "reason"]


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
    hard_max_seconds = args.hard_max_seconds
    if hard_max_seconds is None and args.max_seconds is not None:
        hard_max_seconds = 3 * args.max_seconds
    cpus = torch.multiprocessing.cpu_count()
    path = results_path(f"transcode{'_quick' if args.quick else ''}.csv", args.out_dir)
    # Rows go to NAME.partial.csv once one holds a result (environment_isolated: a child
    # process, so that its heavy imports stay out of the workers); NAME.csv is written when the
    # run ends, so an interrupted run leaves an earlier finished one as it was.
    results = RowLog(path, environment_isolated,
                     lambda r: r.get("status") not in STATUS_NO_RESULT)
    rows, env, add = results.rows, results.env, results.add

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    factories = {"pyav": build_loader}
    dali_why = ""
    if args.backend == "dali":
        factory, dali_why = dali_loader_factory()
        if factory is None:
            log(f"dali skipped: {dali_why}")
        factories = {"dali": factory, **factories}  # the target of --backend dali: measured first

    try:
        spec = original_set(args.quick, args.original_gop, args.original_frames)
        original = prepare_set(spec, args.work_dir, workers=max(1, min(8, cpus)))
        folder = Path(next(iter(original.values())).path).parent
        # The copies are made like the originals (libx264, the generator's preset, B-frames and
        # CRF), only the GOP differs; the control re-encodes the original GOP with those same
        # settings.
        encoder_name, hardware = choose_encoder("h264", args.encoder)
        preset = args.preset or (None if hardware else H264_OPTIONS["preset"])
        bframes = int(H264_OPTIONS["bf"])

        def copy(gop: int) -> tuple[dict | None, dict]:
            """Transcode the original set with a keyframe every ``gop`` frames (cached per GOP,
            height, encoder and preset; transcode's own stamp redoes a copy whose settings
            changed); (manifest records or None, what the rows say about the copy)."""
            tag = f"-h{args.height}" if args.height else ""
            tag += f"-{encoder_name}" + (f"-{preset}" if preset else "")
            dst = args.work_dir / f"{folder.name}-gop{gop}{tag}"
            try:
                # workers: transcode's default, every CPU, or a few with NVENC (a GeForce runs
                # only a few NVENC sessions at once)
                summary = transcode(folder, dst, gop=gop, height=args.height, encoder=args.encoder,
                                    crf=args.crf, preset=preset, bframes=bframes, workers=None,
                                    source_manifest=folder / "manifest.jsonl")
            except Exception as err:  # noqa: BLE001 - the other copies still run
                log(traceback.format_exc())
                return None, {"reason": f"transcode: {failure_reason(err)}"}
            log(summary.summary())
            info = summary_row(summary)
            # a copy cached by an earlier run: this run encoded nothing, so no time of its own
            made = {"encoder": info["encoder"], "preset": preset or "default", "crf": args.crf,
                    "transcode_s": info["seconds"] if info["transcoded"] else None,
                    "cached_copies": info["already_complete"],
                    "failed_transcodes": info["failed"]}
            return load_manifest(dst / "manifest.jsonl"), made

        generator = {"encoder": "libx264 (generator)", "preset": H264_OPTIONS["preset"],
                     "crf": int(H264_OPTIONS["crf"]), "failed_transcodes": 0}
        sets = [(f"gop{spec.gop} (original)", spec.gop, original, generator)]
        sets += [(f"gop{gop}", gop, *copy(gop)) for gop in args.gops]
        control, control_made = copy(spec.gop) if args.control else (None, {})

        def disk(records: dict) -> dict:
            """Sizes on the same videos: those ok in the original, in this set (and in the control,
            for growth_vs_control); a video whose copy failed counts on neither side."""
            grown, compared = growth(records, original)
            ids = ok_ids(records) & ok_ids(original)
            versus = growth(records, control)[0] if control is not None else None
            return {"bytes": set_bytes(records, ids), "compared_videos": compared, "growth": grown,
                    "growth_vs_control": versus}

        # Sizes first, one row per set: a run cut short keeps the disk growth of every copy.
        for name, gop, records, made in sets:
            if records is None:
                add({"set": name, "gop": gop, "status": "failed", **made})
            else:
                add({"set": name, "gop": gop, "status": "disk", **disk(records), **made})
        if args.control:
            name = f"gop{spec.gop} (control: re-encoded like the copies)"
            if control is None:
                add({"set": name, "gop": spec.gop, "status": "failed", **control_made})
            else:
                add({"set": name, "gop": spec.gop, "status": "disk", **disk(control),
                     **control_made})

        for name, gop, records, made in sets:
            if records is None:
                continue
            ok = [r for r in records.values() if r.ok]
            if not ok:
                add({"set": name, "gop": gop, "status": "skipped",
                     "reason": "no video of the set could be read", **made})
                continue
            resolution = f"{ok[0].width}x{ok[0].height}"
            for sampling in args.samplings:
                cfg = SAMPLINGS[sampling]
                where = {"set": name, "gop": gop, "resolution": resolution, "sampling": sampling}
                try:
                    model = sampling_cost(records.values(), cfg, draws=args.draws)
                    common = {
                        **where,
                        **disk(records),
                        **made,
                        "needed": model.needed,
                        "model_decoded_per_needed": model.ratio,
                        "model_preroll": model.preroll,
                        **decode_ratios(records, cfg, measure_draws),
                        "anchor_choices": anchor_choices(records, cfg),
                    }
                except Exception as err:  # noqa: BLE001 - the other samplings and sets still run
                    log(traceback.format_exc())
                    add({**where, "status": "failed", "reason": f"cost: {failure_reason(err)}"})
                    continue
                for backend, factory in factories.items():
                    trims = DALI_TRIM_MODES[args.dali_trim]
                    runs = ([(w, 1, False) for w in worker_counts] if backend == "pyav"
                            else [(min(4, cpus), g, t) for g in args.dali_groups for t in trims])
                    for workers, group, trim in runs:
                        cell = {**common, "backend": backend, "workers": workers,
                                "group": "" if backend == "pyav" else group,
                                "trim": "" if backend == "pyav" else trim,
                                "batch_size": args.batch_size}
                        label = (f"  {name} {sampling} {backend} workers={workers}"
                                 f"{'' if group == 1 else f' group={group}'}"
                                 f"{' trim' if trim else ''}")
                        if factory is None:
                            add({**cell, "status": "skipped", "reason": f"dali: {dali_why}"})
                            continue
                        make = (factory if backend == "pyav"
                                else dali_cell_factory(factory, group, trim))
                        try:
                            rate = loader_rate(make, records, cfg, workers=workers,
                                               batch_size=args.batch_size,
                                               image_size=args.image_size, min_videos=min_videos,
                                               rounds=loader_rounds(backend, workers, group),
                                               max_seconds=args.max_seconds,
                                               hard_max_seconds=hard_max_seconds,
                                               min_steady_rounds=args.min_steady_rounds)
                        except Exception as err:  # noqa: BLE001 - one failing cell ends no other
                            record_failure(add, log, cell, label, err)
                            continue
                        add({**cell, **rate})
                        log(rate_line(label, rate))

    except KeyboardInterrupt:
        return results.interrupted()
    if not results.measured():  # an earlier CSV stays as it was
        return report_no_rows(path, "; ".join(f"{r['set']}: {r.get('reason', '')}"
                                              for r in rows))
    print(f"\ntranscode benchmark on {env['device']} ({env['cpu_count']} CPUs): N=9 clips x B=8 "
          f"frames, stride 4, {len(original)} videos of {spec.num_frames} frames, "
          f"image {args.image_size}")
    print(format_table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    written = results.finish()
    figure = plot(rows, written.with_suffix(".png"),
                  f"transcode benchmark on {env['device']}: {len(original)} videos of "
                  f"{spec.num_frames} frames, N=9 clips x B=8 frames, stride 4")
    print(f"wrote {written}" + (f" and {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
