"""One-time re-encode of a video folder for fast random access (issue 7).

Real VideoQA videos (YouTube-derived MSRVTT, ActivityNet) have keyframes seconds apart, so reading
the ~37 frames of a siamese group means decoding, and throwing away, every frame from the keyframe
before it (``planner.py`` models the count). :func:`transcode` re-encodes every video of a folder
once with a short fixed GOP:

- a keyframe every ``gop`` frames exactly, closed GOPs (every keyframe an IDR: a seek there
  decodes nothing from before it), no scene-cut keyframes in between (x264 ``sc_threshold=0``,
  x265 ``scenecut=0``, NVENC ``no-scenecut``); the output manifest's keyframes are checked against
  ``0, gop, 2 gop, ...`` and a video whose encoder did otherwise is reported (still kept);
- yuv420p, constant frame rate at the source's average rate (frame ``i`` of the source is frame
  ``i`` of the output: the frame count and order are kept, no frame is dropped or duplicated, so
  annotations in frames or in seconds via fps keep pointing at the same content);
- optional downscale to ``height`` (aspect kept, both sides even; never upscaled);
- upright: a video marked to be shown turned (its display matrix: a phone's portrait video) is
  written turned, with no such mark (``height`` is then the upright picture's);
- video only: audio and other streams are dropped (the models read frames only).

Outputs mirror the source tree as ``<video_id>.mp4`` under ``dst_dir``. Videos are encoded in a
process pool with a progress bar. Each output is written to a hidden temp name, verified (decoded
by the manifest probe: status ok and as many frames as the source manifest counts), then renamed,
so an interrupted file never looks complete; a re-run skips verified outputs and redoes the rest.
A run with other parameters (``transcode.json``) redoes every output, each replaced only once its
new version is verified: an output whose redo fails keeps its old version (and its manifest record)
and is redone by the next run. Bad arguments (folders, values, settings the encoder refuses: it
is opened once on a dummy frame first) fail before anything is written. Corrupt inputs (per the
source manifest) and videos that fail to transcode are reported and skipped, never fatal. The
destination manifest (``dst_dir/manifest.jsonl``) is written atomically with the manifest module's
functions, so training can use it directly.

Encoders: PyAV encodes on the CPU with libx264 / libx265. Where FFmpeg has NVENC (h264_nvenc /
hevc_nvenc) and an NVENC-capable GPU is present, ``encoder="auto"`` uses it (decoding, scaling and
colour conversion stay on the CPU) and the summary says so. Datacenter Hopper / Ampere compute
GPUs (H100, A100) have no NVENC: there the CPU encoder is used.

The command line is ``siasam-fast transcode SRC_DIR DST_DIR --gop G [--height H] [--codec h264|hevc]
[--workers W]`` (:func:`main_transcode`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from tqdm.auto import tqdm

from siasam_fast.paths import USAGE_ERRORS
from siasam_fast.pipeline.manifest import (
    PROBE_MODES,
    VIDEO_EXTENSIONS,
    VideoRecord,
    build_manifest,
    existing_manifest,
    open_video,
    probe_video,
    require_videos,
    retimeable,
    write_manifest,
)
from siasam_fast.pipeline.workpool import imap_isolated

logger = logging.getLogger(__name__)

CODECS = ("h264", "hevc")
ENCODERS = ("auto", "cpu", "nvenc")
CPU_ENCODERS = {"h264": "libx264", "hevc": "libx265"}
NVENC_ENCODERS = {"h264": "h264_nvenc", "hevc": "hevc_nvenc"}
# Quality defaults: visually lossless enough for 224-px training inputs; short GOPs cost bits,
# so a slower preset than the usual "veryfast" keeps the disk growth down.
DEFAULT_CRF = {"h264": 20, "hevc": 22}
DEFAULT_PRESET = {"cpu": "fast", "nvenc": "p4"}
NVENC_DEFAULT_CQ = 23
CRF_RANGE = (0, 51)  # x264 / x265 CRF and NVENC cq, 8-bit: 0 best ... 51 worst
MAX_BFRAMES = 16  # x264 and x265 cap B-frames at 16
X26X_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                "slower", "veryslow", "placebo")  # libx264 and libx265, fastest first
NVENC_PRESETS = tuple(f"p{i}" for i in range(1, 8))  # p1 fastest ... p7 best (FFmpeg >= 4.4)
MANIFEST_NAME = "manifest.jsonl"
SOURCE_MANIFEST_NAME = "source_manifest.jsonl"
PARAMS_NAME = "transcode.json"
TEMP_SUFFIX = ".transcoding.mp4"  # hidden temp outputs: ".<name>.transcoding.mp4"
# Consumer GPUs cap concurrent NVENC sessions (a handful): fewer encoding processes by default.
NVENC_DEFAULT_WORKERS = 4


class EncoderUnavailableError(ValueError, RuntimeError):
    """The encoder asked for cannot run here (no NVENC GPU, an FFmpeg without libx265, ...): a
    bad choice of argument for this machine (ValueError), RuntimeError for older callers."""


@dataclass(frozen=True)
class _Job:
    """One video to transcode (picklable: sent to a pool process)."""

    src: str
    dst: str
    dst_dir: str
    video_id: str
    expected_frames: int
    gop: int
    height: int | None
    encoder: str
    options: dict
    threads: int
    probe_mode: str
    redo: bool = False  # an existing output made with other parameters: replace it, never skip


@dataclass
class TranscodeResult:
    """What happened to one video."""

    video_id: str
    relpath: str  # source path relative to src_dir
    status: str  # "done" (transcoded now) | "skipped" (already complete) | "failed"
    reason: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    record: VideoRecord | None = None  # the output's manifest record (done / skipped)
    irregular_keyframes: bool = False  # the output's keyframes are not exactly every gop frames


@dataclass
class TranscodeSummary:
    """What :func:`transcode` returns; ``summary()`` is the text the CLI prints."""

    dst_dir: Path
    manifest_path: Path
    encoder: str
    hardware: bool  # NVENC
    gop: int
    height: int | None
    codec: str
    results: list[TranscodeResult] = field(default_factory=list)
    seconds: float = 0.0
    # videos of dst_dir's manifest that are no output of src_dir's videos: sources deleted or
    # moved since an earlier run made them, or files put there. Kept (a source deleted after its
    # transcode to save disk leaves its output the only copy), and named in the summary.
    orphans: list[str] = field(default_factory=list)

    def _with(self, *statuses: str) -> list[TranscodeResult]:
        return [r for r in self.results if r.status in statuses]

    @property
    def done(self) -> list[TranscodeResult]:
        return self._with("done")

    @property
    def skipped(self) -> list[TranscodeResult]:
        return self._with("skipped")

    @property
    def failed(self) -> list[TranscodeResult]:
        return self._with("failed")

    @property
    def bytes_in(self) -> int:
        """Source bytes of the videos that have a verified output."""
        return sum(r.bytes_in for r in self._with("done", "skipped"))

    @property
    def bytes_out(self) -> int:
        return sum(r.bytes_out for r in self._with("done", "skipped"))

    @property
    def growth(self) -> float:
        """Output bytes per source byte (1.5: the transcoded set takes 50% more disk)."""
        return self.bytes_out / self.bytes_in if self.bytes_in else float("nan")

    def summary(self) -> str:
        kind = "NVENC (GPU)" if self.hardware else "CPU"
        scale = f", height <= {self.height}" if self.height else ""
        ok = len(self.done) + len(self.skipped)
        growth = f"x{self.growth:.2f}, " if self.bytes_in else ""  # never "xnan"
        text = (
            f"transcode {self.codec} gop={self.gop}{scale} with {self.encoder} ({kind}): "
            f"{len(self.done)} transcoded, {len(self.skipped)} already complete, "
            f"{len(self.failed)} failed, in {self.seconds:.1f} s\n"
            f"  disk: {ok} videos {_human(self.bytes_in)} -> {_human(self.bytes_out)} "
            f"({growth}{self.bytes_out - self.bytes_in:+,} bytes)\n"
            f"  manifest: {self.manifest_path}"
        )
        irregular = [r for r in self._with("done", "skipped") if r.irregular_keyframes]
        if irregular:
            text += (
                f"\n  {len(irregular)} outputs have keyframes other than every {self.gop} frames "
                f"(encoder ignored the GOP settings?), e.g. {irregular[0].relpath}"
            )
        for r in self.failed[:20]:
            text += f"\n  failed: {r.relpath}: {r.reason}"
        if len(self.failed) > 20:
            text += f"\n  ... and {len(self.failed) - 20} more"
        if self.orphans:
            shown = ", ".join(self.orphans[:5]) + (", ..." if len(self.orphans) > 5 else "")
            text += (f"\n  {len(self.orphans)} video(s) of the manifest are no output of a source "
                     f"video (deleted or moved since they were transcoded, or put there): {shown}; "
                     "kept, and training on this manifest uses them: delete their files and run "
                     "this again to leave them out")
        return text


def _human(n: float) -> str:
    """Bytes in decimal units: 912 B, 45.1 kB, 3.2 GB."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


# ----------------------------------------------------------------------------------------------
# Encoders


def nvenc_available(codec: str = "h264") -> tuple[bool, str]:
    """(whether the NVENC encoder of ``codec`` opens here, why not)."""
    import av

    name = NVENC_ENCODERS[_check_codec(codec)]
    if name not in av.codecs_available:
        return False, f"FFmpeg has no {name} encoder"
    try:
        ctx = av.CodecContext.create(name, "w")
        ctx.width, ctx.height, ctx.pix_fmt = 256, 256, "yuv420p"
        ctx.time_base, ctx.framerate = Fraction(1, 25), Fraction(25)
        ctx.open()
    except Exception as err:  # noqa: BLE001 - no GPU, no driver, no NVENC on this GPU, ...
        return False, f"{name} does not open here ({_ffmpeg_reason(err)}: no NVENC GPU or driver?)"
    return True, ""


def _ffmpeg_reason(err: Exception) -> str:
    """FFmpeg's reason of an error, without PyAV's "avcodec_open2(name, {options})" suffix."""
    import av

    if isinstance(err, av.error.FFmpegError) and err.strerror:
        return str(err.strerror)
    return f"{type(err).__name__}: {err}"


def choose_encoder(codec: str = "h264", encoder: str = "auto") -> tuple[str, bool]:
    """(FFmpeg encoder name, whether it is NVENC) for ``codec`` under the ``encoder`` policy."""
    import av

    _check_codec(codec)
    if encoder not in ENCODERS:
        raise ValueError(f"encoder={encoder!r}: valid encoders are {', '.join(ENCODERS)}")
    if encoder in ("auto", "nvenc"):
        ok, why = nvenc_available(codec)
        if ok:
            return NVENC_ENCODERS[codec], True
        if encoder == "nvenc":
            raise EncoderUnavailableError(
                f"encoder 'nvenc' asked for (--encoder nvenc), but {why}; use encoder 'cpu' "
                "or 'auto'")
        logger.info("NVENC not used: %s", why)
    name = CPU_ENCODERS[codec]
    if name not in av.codecs_available:
        have = sorted(c for c in av.codecs_available if c in CPU_ENCODERS.values())
        raise EncoderUnavailableError(
            f"codec={codec!r} needs the {name} encoder, which this FFmpeg lacks "
            f"(CPU encoders present: {', '.join(have) or 'none'})"
        )
    return name, False


def encoder_options(
    encoder: str, gop: int, crf: int | None, preset: str | None, bframes: int | None
) -> dict:
    """FFmpeg options for a fixed, closed GOP of ``gop`` frames without scene-cut keyframes.

    Raises ValueError naming the value when ``crf`` (0-51), ``bframes`` (0-16) or, for libx264 /
    libx265, ``preset`` (``X26X_PRESETS``) is out of range; :func:`check_encoder` then tries the
    options on the encoder itself (what else it refuses, e.g. an unknown NVENC preset)."""
    _check_quality(encoder, crf, preset, bframes)
    g = str(gop)
    if encoder == "libx264":
        options = {
            "g": g,
            "keyint_min": g,
            "sc_threshold": "0",
            "crf": str(DEFAULT_CRF["h264"] if crf is None else crf),
            "preset": preset or DEFAULT_PRESET["cpu"],
            "x264-params": f"keyint={g}:min-keyint={g}:scenecut=0:open-gop=0",
        }
    elif encoder == "libx265":
        options = {
            "crf": str(DEFAULT_CRF["hevc"] if crf is None else crf),
            "preset": preset or DEFAULT_PRESET["cpu"],
            "x265-params": f"keyint={g}:min-keyint={g}:scenecut=0:open-gop=0:log-level=error",
        }
    elif encoder in NVENC_ENCODERS.values():
        options = {
            "g": g,
            "forced-idr": "1",
            "strict_gop": "1",
            "no-scenecut": "1",
            "preset": preset or DEFAULT_PRESET["nvenc"],
            "rc": "vbr",
            "cq": str(NVENC_DEFAULT_CQ if crf is None else crf),
        }
        if crf == 0:  # NVENC's cq 0 means "automatic" (VBR at 2 Mbit/s): QP 0 is the best
            del options["cq"]
            options.update(rc="constqp", qp="0")
    else:
        raise ValueError(f"encoder={encoder!r}: valid encoders are libx264, libx265, *_nvenc")
    if bframes is not None:
        options["bf"] = str(bframes)
    return options


def check_gop(gop) -> None:
    """Raises ValueError naming ``gop`` unless it is an integer >= 1 (the encoders take a value
    below 1 for their own default, silently)."""
    if isinstance(gop, bool) or not isinstance(gop, int) or gop < 1:
        raise ValueError(f"gop={gop!r}: must be an integer >= 1 (frames between keyframes)")


def _check_quality(encoder: str, crf, preset, bframes) -> None:
    lo, hi = CRF_RANGE
    if crf is not None and (
        isinstance(crf, bool) or not isinstance(crf, (int, float)) or not lo <= crf <= hi
    ):
        what = "NVENC cq" if encoder in NVENC_ENCODERS.values() else "CRF"
        raise ValueError(
            f"crf={crf!r}: {encoder} takes a {what} from {lo} (best quality) to {hi} "
            f"(smallest files); default: {_crf_defaults()}"
        )
    if bframes is not None and (
        isinstance(bframes, bool) or not isinstance(bframes, int) or not 0 <= bframes <= MAX_BFRAMES
    ):
        raise ValueError(
            f"bframes={bframes!r}: must be an integer from 0 (no B-frames) to {MAX_BFRAMES}, "
            "or None for the preset's"
        )
    if preset is not None and encoder in CPU_ENCODERS.values() and preset not in X26X_PRESETS:
        raise ValueError(
            f"preset={preset!r}: valid {encoder} presets are {', '.join(X26X_PRESETS)} "
            f"(fastest first; default {DEFAULT_PRESET['cpu']})"
        )


def _crf_defaults() -> str:
    return (f"{DEFAULT_CRF['h264']} for h264, {DEFAULT_CRF['hevc']} for hevc, "
            f"cq {NVENC_DEFAULT_CQ} with NVENC")


def check_encoder(encoder: str, options: dict) -> None:
    """Open ``encoder`` once with ``options`` and encode one small dummy frame; raises ValueError
    naming the settings when the encoder refuses them. Run before any output is touched."""
    import av
    import numpy as np
    from av.video.reformatter import VideoReformatter

    side = 256  # NVENC refuses tiny frames
    try:
        ctx = av.CodecContext.create(encoder, "w")
        ctx.width, ctx.height, ctx.pix_fmt = side, side, "yuv420p"
        ctx.time_base, ctx.framerate = Fraction(1, 25), Fraction(25)
        ctx.thread_count = 1
        ctx.options = dict(options)
        ctx.open()
        frame = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")
        frame = VideoReformatter().reformat(frame, format="yuv420p")  # see _encode
        frame.pts = 0
        ctx.encode(frame)
        ctx.encode(None)
    except Exception as err:  # noqa: BLE001 - whatever the encoder refuses, say so up front
        shown = ("preset", "crf", "cq", "qp", "bf", "g")
        settings = ", ".join(f"{k}={options[k]}" for k in shown if k in options)
        hint = ""
        if encoder in NVENC_ENCODERS.values():
            hint = f"; NVENC presets are {', '.join(NVENC_PRESETS)} (fastest to best)"
        raise ValueError(
            f"the {encoder} encoder refuses the settings {settings} ({_ffmpeg_reason(err)}){hint}"
        ) from None


# ----------------------------------------------------------------------------------------------
# One video (runs in a pool process; never raises)


def output_size(width: int, height: int, max_height: int | None) -> tuple[int, int]:
    """(width, height) of the output: at most ``max_height`` high, aspect kept, both even."""
    h = height if not max_height or max_height >= height else max_height
    w = width if h == height else round(width * h / height)
    return max(2, w - w % 2), max(2, h - h % 2)


def quarter_turns(frame) -> int:
    """How many quarter turns counter-clockwise (np.rot90's k, 0-3) display the frame upright:
    its display matrix's rotation (PyAV's ``Frame.rotation``, degrees counter-clockwise), to
    the nearest quarter."""
    try:
        degrees = float(getattr(frame, "rotation", 0) or 0)
    except (TypeError, ValueError):
        return 0
    return round(degrees / 90) % 4


def temp_path(dst: Path) -> Path:
    """The hidden name an output is written under until it is verified."""
    return dst.with_name(f".{dst.stem}{TEMP_SUFFIX}")


def _transcode_one(job: _Job) -> TranscodeResult:
    start = time.perf_counter()
    src, dst = Path(job.src), Path(job.dst)
    result = TranscodeResult(job.video_id, "", "failed", bytes_in=_size(src))
    tmp = temp_path(dst)
    try:
        if dst.exists() and not job.redo:  # complete from an earlier run, manifest not written?
            record = _verify(dst, job)
            if isinstance(record, VideoRecord):
                result.status, result.record = "skipped", record
                result.bytes_out = record.size
                result.irregular_keyframes = not _regular(record, job.gop)
                return result
            logger.info("%s: redoing it (%s)", dst, record)
        dst.parent.mkdir(parents=True, exist_ok=True)
        frames = _encode(src, tmp, job)
        if frames != job.expected_frames:
            result.reason = (
                f"the source decoded to {frames} frames but its manifest counts "
                f"{job.expected_frames} (stale manifest?)"
            )
            return result
        record = _verify(tmp, job)
        if not isinstance(record, VideoRecord):
            result.reason = f"output failed verification: {record}"
            return result
        # Atomic: an output made with other parameters is only replaced by a verified one. The
        # rename keeps size and mtime: the record stays valid.
        os.replace(tmp, dst)
        _name_record(record, dst, job)
        result.status, result.record = "done", record
        result.bytes_out = record.size
        result.irregular_keyframes = not _regular(record, job.gop)
    except Exception as err:  # noqa: BLE001 - a bad video fails alone, the run goes on
        result.reason = _failure_reason(err, job)
    finally:
        tmp.unlink(missing_ok=True)
        result.seconds = time.perf_counter() - start
    return result


def _failure_reason(err: Exception, job: _Job) -> str:
    """Why a video failed; an NVENC encoder that did not open (it opened on the up-front check's
    256x256 frame) gets the likely causes instead of a bare errno."""
    import av

    if (job.encoder in NVENC_ENCODERS.values() and isinstance(err, av.error.FFmpegError)
            and str(err.filename or "").startswith("avcodec_open2")):
        return (f"{job.encoder} did not open for this video ({_ffmpeg_reason(err)}): NVENC "
                "(Turing and later) refuses frames under 145 px (H.264) or 129 px (HEVC) a side, "
                "and a GeForce GPU runs only a few encoding sessions at once (fewer --workers); "
                "--encoder cpu encodes it")
    if (job.encoder == CPU_ENCODERS["hevc"] and isinstance(err, av.error.FFmpegError)
            and str(err.filename or "").startswith("avcodec_open2")):
        return (f"{job.encoder} did not open for this video ({_ffmpeg_reason(err)}): it refuses "
                "frames a few pixels wide or high; --codec h264 encodes them")
    return f"{type(err).__name__}: {err}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _encode(src: Path, tmp: Path, job: _Job) -> int:
    """Decode ``src`` and encode every frame into ``tmp``; returns the number of frames."""
    import av
    import numpy as np
    from av.video.frame import PictureType
    from av.video.reformatter import VideoReformatter

    # A reformatter of this call's own: PyAV 19's frame.reformat() uses one per thread, which a
    # forked worker inherits from its parent (swscale's slice threads included) and hangs freeing.
    reformatter = VideoReformatter()
    count = 0
    with open_video(str(src)) as source, av.open(str(tmp), "w", format="mp4") as out:
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        rate = Fraction(rate).limit_denominator(1001)
        ostream = None
        turns = 0  # quarter turns counter-clockwise that make the picture upright
        for frame in source.decode(stream):
            if ostream is None:  # sized from the first frame: robust to odd headers
                turns = quarter_turns(frame)
                upright = (frame.height, frame.width) if turns % 2 else (frame.width,
                                                                        frame.height)
                width, height = output_size(*upright, job.height)
                ostream = out.add_stream(job.encoder, rate=rate)
                ostream.width, ostream.height, ostream.pix_fmt = width, height, "yuv420p"
                ostream.codec_context.time_base = 1 / rate
                ostream.codec_context.thread_count = job.threads
                ostream.options = dict(job.options)
            if turns:  # a phone's portrait video, stored sideways: written upright
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(
                    np.rot90(frame.to_ndarray(format="rgb24"), turns)), format="rgb24")
            image = reformatter.reformat(
                frame, width=width, height=height, format="yuv420p", interpolation="AREA"
            )
            # Constant frame rate: frame i at i / rate. No keyframe forced by the source's picture
            # types (libx264 honours an input I-frame as a keyframe request).
            image.pts, image.time_base = count, 1 / rate
            image.pict_type = PictureType.NONE
            for packet in ostream.encode(image):
                out.mux(packet)
            count += 1
        if ostream is not None:
            for packet in ostream.encode():
                out.mux(packet)
    return count


def _verify(path: Path, job: _Job) -> VideoRecord | str:
    """The output's manifest record if it is ok with the source's frame count, else why not."""
    record = probe_video(path, job.dst_dir, job.probe_mode)
    if not record.ok:
        return f"the output is {record.status} ({record.reason})"
    if record.num_frames != job.expected_frames:
        return f"{record.num_frames} frames in the output, {job.expected_frames} in the source"
    _name_record(record, Path(job.dst), job)
    return record


def _name_record(record: VideoRecord, dst: Path, job: _Job) -> None:
    record.path = str(dst.resolve())
    record.relpath = dst.relative_to(job.dst_dir).as_posix()
    record.video_id = job.video_id


def _regular(record: VideoRecord, gop: int) -> bool:
    return record.keyframes == list(range(0, record.num_frames, gop))


# ----------------------------------------------------------------------------------------------
# A folder


def transcode(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    gop: int,
    height: int | None = None,
    codec: str = "h264",
    workers: int | None = None,
    *,
    encoder: str = "auto",
    crf: int | None = None,
    preset: str | None = None,
    bframes: int | None = None,
    source_manifest: str | os.PathLike | None = None,
    probe_mode: str = "decode",
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    progress: bool = True,
) -> TranscodeSummary:
    """Re-encode every video under ``src_dir`` into ``dst_dir`` with a keyframe every ``gop``
    frames (module docstring); returns the summary (``.summary()`` for text).

    ``height``: downscale taller videos to this height (even; aspect kept; never upscaled).
    ``codec``: "h264" or "hevc". ``workers``: encoding processes (default: all CPUs, or
    ``NVENC_DEFAULT_WORKERS`` with NVENC; 0 or 1 encodes in this process). ``encoder``: "auto"
    (NVENC when it works here, else CPU), "cpu" or "nvenc". ``crf`` / ``preset`` / ``bframes``:
    quality settings (defaults: ``DEFAULT_CRF``, ``DEFAULT_PRESET``, the preset's B-frames).
    ``source_manifest``: the manifest of ``src_dir`` (built or refreshed incrementally, so an
    existing one from ``siasam-fast index`` costs nothing; default
    ``dst_dir/source_manifest.jsonl``).
    ``probe_mode``: how sources and outputs are probed ("decode": every frame, the default).
    Bad arguments raise before anything is written: ValueError (values, settings the encoder
    refuses, a ``src_dir`` without videos, a manifest path holding another file),
    NotADirectoryError (folders), :class:`EncoderUnavailableError` (encoder missing here).
    """
    start = time.perf_counter()
    src_dir, dst_dir = Path(src_dir).resolve(), Path(dst_dir).resolve()
    # Every check first: nothing under dst_dir is touched before the arguments are known good.
    _check_args(src_dir, dst_dir, gop, height, codec, workers, probe_mode)
    name, hardware = choose_encoder(codec, encoder)
    options = encoder_options(name, gop, crf, preset, bframes)
    check_encoder(name, options)
    require_videos(src_dir, extensions, name="src_dir")
    source_path = Path(source_manifest) if source_manifest else dst_dir / SOURCE_MANIFEST_NAME
    existing_manifest(source_path)
    manifest_path = dst_dir / MANIFEST_NAME
    old = existing_manifest(manifest_path)
    cpus = os.cpu_count() or 1
    if workers is None:
        workers = min(cpus, NVENC_DEFAULT_WORKERS) if hardware else cpus
    threads = max(1, cpus // max(1, workers))
    dst_dir.mkdir(parents=True, exist_ok=True)
    logger.info("transcoding %s -> %s with %s (%s)", src_dir, dst_dir, name,
                "NVENC" if hardware else "CPU")

    sources = build_manifest(
        src_dir,
        source_path,
        workers=workers,
        mode=probe_mode,
        extensions=extensions,
        progress=progress,
    )
    params = {"gop": gop, "height": height, "codec": codec, "crf": crf, "preset": preset,
              "bframes": bframes}
    # Outputs made with other parameters: redone, each kept until its new version is verified.
    stale = _stale_outputs(dst_dir, params, sources)
    _write_params(dst_dir, params, name, stale)
    for leftover in dst_dir.rglob(f".*{TEMP_SUFFIX}"):  # left by an interrupted run
        leftover.unlink(missing_ok=True)

    records: dict[str, VideoRecord] = {}
    summary = TranscodeSummary(dst_dir, manifest_path, name, hardware, gop, height, codec)
    jobs: list[_Job] = []
    # video_id -> [size, mtime_ns, digest] of the source of its output ([size, mtime_ns] from
    # before 2026-11-28)
    made_from = _made_from(dst_dir)
    fingerprints: dict[str, list] = {}
    changed_sources: set[str] = set()
    for relpath in getattr(sources, "duplicates", []):
        summary.results.append(TranscodeResult(
            "", relpath, "failed", "another file has the same video_id (name without extension)"))
    for vid, src in sorted(sources.items()):
        if not src.ok and not retimeable(src):
            summary.results.append(TranscodeResult(
                vid, src.relpath, "failed", f"corrupt input: {src.reason}", bytes_in=src.size))
            continue
        dst = dst_dir / f"{vid}.mp4"
        # Which version of the source an output was made from: a source replaced since (other
        # content, perhaps the same frame count, an older or newer mtime) redoes its output.
        # Without a fingerprint (an output of an older siasam-fast): a source probed again by
        # this run, or newer than its output (changed since; perhaps indexed before this run).
        known = made_from.get(vid)
        fingerprints[vid], copied = _fingerprint(src, known)
        replaced_source = dst.exists() and (
            (known is not None and known[:2] != fingerprints[vid][:2] and not copied)
            or (known is None and (vid in getattr(sources, "probed", ())
                                   or dst.stat().st_mtime_ns < src.mtime_ns)))
        if replaced_source:
            changed_sources.add(vid)
        done = None if replaced_source else _complete(old.get(vid), dst, src, copied)
        if done is not None and vid not in stale:
            records[vid] = done
            made_from[vid] = fingerprints[vid]
            summary.results.append(TranscodeResult(
                vid, src.relpath, "skipped", bytes_in=src.size, bytes_out=done.size, record=done,
                irregular_keyframes=not _regular(done, gop)))
            continue
        if done is not None:
            records[vid] = done  # the old output's record stays until the output is replaced
        jobs.append(_Job(str(Path(src.path)), str(dst), str(dst_dir), vid, src.num_frames, gop,
                         height, name, options, threads, probe_mode,
                         redo=vid in stale or replaced_source))

    relpaths = {vid: r.relpath for vid, r in sources.items()}
    bar = tqdm(total=len(jobs), desc=f"transcode gop={gop}", unit="video",
               disable=not progress or not jobs)  # (all complete already: no empty bar)
    last_write = time.monotonic()

    left = len(jobs)  # not yet transcoded: an interim manifest lacks their new records

    def save() -> None:
        write_manifest(records.values(), manifest_path, missing=left,
                       made_by="siasam-fast transcode")
        _write_params(dst_dir, params, name, stale, made_from)

    if jobs:  # marked incomplete before any output is replaced: a run killed outright (SIGKILL,
        save()  # the OOM killer) saves nothing, and its old records would pass for complete
    try:
        for result in _run_all(jobs, workers):
            left -= 1
            vid = result.video_id
            result.relpath = relpaths[vid]
            summary.results.append(result)
            if result.record is not None:
                records[vid] = result.record
                stale.discard(vid)
                made_from[vid] = fingerprints[vid]
            if result.status == "failed":
                output = dst_dir / f"{vid}.mp4"
                if vid in changed_sources and output.exists():
                    output.unlink()  # made from another version of the source: not kept as its
                    made_from.pop(vid, None)  # output (the re-index below would list it)
                    result.reason += (" (the output made from the source's earlier version was "
                                      "removed)")
                elif vid in stale and output.exists():
                    result.reason += " (the output made with the previous parameters is kept)"
                logger.warning("transcode failed: %s: %s", result.relpath, result.reason)
            bar.update(1)
            bar.set_postfix_str(f"{_human(summary.bytes_in)} -> {_human(summary.bytes_out)}")
            if time.monotonic() - last_write > 60:
                save()
                last_write = time.monotonic()
    except BaseException:
        save()  # what is done stays done
        raise
    finally:
        bar.close()
    save()
    # Re-index: every record just written is reused (same size and mtime); files of dst_dir that
    # are not outputs of this run's sources are probed too, and vanished ones dropped.
    final = build_manifest(dst_dir, manifest_path, workers=workers, mode=probe_mode,
                           progress=False, allow_empty=True)
    summary.orphans = sorted(set(final) - set(sources))
    summary.seconds = time.perf_counter() - start
    logger.info("%s", summary.summary())
    return summary


def _check_args(src_dir, dst_dir, gop, height, codec, workers, probe_mode) -> None:
    if not src_dir.is_dir():
        why = "it is a file" if src_dir.exists() else "it does not exist"
        raise NotADirectoryError(
            f"src_dir={str(src_dir)!r} is not a folder ({why}); give the folder of source videos")
    if dst_dir.exists() and not dst_dir.is_dir():
        raise NotADirectoryError(f"dst_dir={str(dst_dir)!r} is a file, not a folder")
    if dst_dir == src_dir or dst_dir.is_relative_to(src_dir) or src_dir.is_relative_to(dst_dir):
        raise ValueError(
            f"dst_dir={str(dst_dir)!r} and src_dir={str(src_dir)!r} must not contain each other "
            "(the outputs would be indexed as sources, or the sources as outputs)"
        )
    linked = _linked_into(src_dir, dst_dir)
    if linked is not None:
        raise ValueError(
            f"dst_dir={str(dst_dir)!r} is inside src_dir={str(src_dir)!r} through the link "
            f"{str(linked)!r} (the outputs would be indexed as sources, one folder deeper at "
            "each run): choose a dst_dir outside it"
        )
    check_gop(gop)
    if height is not None and (
        isinstance(height, bool) or not isinstance(height, int) or height < 2 or height % 2
    ):
        raise ValueError(f"height={height!r}: must be an even integer >= 2 (4:2:0 chroma), or None")
    _check_codec(codec)
    if workers is not None and workers < 0:
        raise ValueError(f"workers={workers}: must be >= 0 (0 or 1: in this process)")
    if probe_mode not in PROBE_MODES:
        raise ValueError(f"probe_mode={probe_mode!r}: valid modes are {', '.join(PROBE_MODES)}")


def _linked_into(src_dir: Path, dst_dir: Path) -> Path | None:
    """A folder of ``src_dir`` (walked as the index walks it: links followed) that is
    ``dst_dir`` or inside it, or None."""
    if not dst_dir.exists():
        return None
    dst, seen = dst_dir.resolve(), set()
    for folder, subfolders, _ in os.walk(src_dir, followlinks=True):
        real = Path(folder).resolve()
        if real in seen:  # (a link back up the tree)
            subfolders[:] = []
            continue
        seen.add(real)
        if real == dst or real.is_relative_to(dst):
            return Path(folder)
    return None


def _check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"codec={codec!r}: valid codecs are {', '.join(CODECS)}")
    return codec


def _stale_outputs(dst_dir: Path, params: dict, sources: dict[str, VideoRecord]) -> set[str]:
    """video_ids of the outputs made with other parameters than ``params``: all existing outputs
    when the parameters changed, else those an earlier run left to redo (``stale`` in
    ``transcode.json``)."""
    path = dst_dir / PARAMS_NAME
    if not path.is_file():
        return set()
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        stamp = None
    if not isinstance(stamp, dict):
        stamp = {}
    if {k: stamp.get(k) for k in params} == params:
        left = stamp.get("stale")
        return {v for v in left if isinstance(v, str)} if isinstance(left, list) else set()
    outputs = {vid for vid in sources if (dst_dir / f"{vid}.mp4").exists()}
    if outputs:
        old = ", ".join(f"{k}={stamp.get(k)}" for k in params)
        now = ", ".join(f"{k}={v}" for k, v in params.items())
        logger.warning("%s: made with %s, now %s: every output is redone (each replaced once its "
                       "new version is verified)", dst_dir, old, now)
    return outputs


def _write_params(dst_dir: Path, params: dict, encoder: str, stale: set[str],
                  made_from: dict[str, list] | None = None) -> None:
    stamp = dst_dir / f".{PARAMS_NAME}.tmp"
    values = {**params, "encoder": encoder, "stale": sorted(stale)}
    if made_from is None:  # keep what the file says (a write before the outputs are known)
        made_from = _made_from(dst_dir)
    values["sources"] = dict(sorted(made_from.items()))
    stamp.write_text(json.dumps(values, indent=1) + "\n")
    os.replace(stamp, dst_dir / PARAMS_NAME)  # atomic: a torn file would force a full redo


def _made_from(dst_dir: Path) -> dict[str, list]:
    """``transcode.json``'s ``sources``: the [size, mtime_ns, digest] of the source each output
    was made from ({} when absent: outputs of an older version are trusted as before)."""
    try:
        values = json.loads((dst_dir / PARAMS_NAME).read_text()).get("sources", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(values, dict):
        return {}
    return {k: v for k, v in values.items() if isinstance(v, list) and len(v) in (2, 3)}


DIGEST_BYTES = 1 << 16  # read from each end of a source for its digest


def source_digest(path: str | os.PathLike) -> str:
    """A digest of a file's size, first and last ``DIGEST_BYTES``: tells a copy of a source
    (``cp -r`` gives every file a new mtime) from a replaced one, reading 128 KiB."""
    import hashlib

    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(fh.read(DIGEST_BYTES))
        if size > DIGEST_BYTES:
            fh.seek(max(DIGEST_BYTES, size - DIGEST_BYTES))
            digest.update(fh.read(DIGEST_BYTES))
    return digest.hexdigest()[:20]


def _fingerprint(src: VideoRecord, known: list | None) -> tuple[list, bool]:
    """The source's [size, mtime_ns, digest], and whether it is a copy of the one ``known`` (the
    fingerprint its output was made from) with another mtime. The digest is read only when no
    earlier one can be kept (a new source, an mtime that changed, an older transcode.json)."""
    size, mtime = int(src.size), int(src.mtime_ns)
    if known is not None and known[:2] == [size, mtime] and len(known) == 3:
        return list(known), False
    try:
        digest = source_digest(src.path)
    except OSError:
        return [size, mtime, ""], False
    copied = (known is not None and len(known) == 3 and known[0] == size and known[1] != mtime
              and bool(digest) and known[2] == digest)
    return [size, mtime, digest], copied


def _complete(old: VideoRecord | None, dst: Path, src: VideoRecord,
              copied: bool = False) -> VideoRecord | None:
    """The output's record when the manifest already verified this very file, else None (an
    existing file without such a record is verified again by its job). ``copied``: the source
    is a copy of the one the output was made from, so a source newer than its output is fine."""
    if old is None or not old.ok or old.num_frames != src.num_frames:
        return None
    try:
        st = dst.stat()
    except OSError:
        return None
    if st.st_size != old.size or st.st_mtime_ns != old.mtime_ns or (
            st.st_mtime_ns < src.mtime_ns and not copied):
        return None  # rewritten since, or the source changed after the output was made
    return old


def _run_all(jobs: list[_Job], workers: int) -> Iterator[TranscodeResult]:
    """Results in completion order; a video that kills its process fails alone."""
    yield from imap_isolated(_transcode_one, jobs, workers, on_crash=_crashed)


def _crashed(job: _Job) -> TranscodeResult:
    temp_path(Path(job.dst)).unlink(missing_ok=True)
    return TranscodeResult(job.video_id, "", "failed", "transcoder crashed on this video")


# ----------------------------------------------------------------------------------------------
# Command line: `siasam-fast transcode SRC_DIR DST_DIR --gop G [--height H] [--codec h264|hevc]`


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``siasam-fast transcode`` (added to ``parser``, e.g. a subparser)."""
    parser = parser or argparse.ArgumentParser(
        prog="siasam-fast transcode",
        description="Re-encode a video folder once with a short fixed GOP for fast random access.",
    )
    parser.add_argument("src_dir", help="folder of source videos (searched recursively)")
    parser.add_argument("dst_dir", help="output folder (mirrors src_dir; gets manifest.jsonl)")
    parser.add_argument("--gop", type=int, required=True, help="frames between keyframes, e.g. 16")
    parser.add_argument("--height", type=int, default=None,
                        help="downscale taller videos to this (even) height, aspect kept")
    parser.add_argument("--codec", choices=CODECS, default="h264", help="default h264")
    parser.add_argument("--workers", type=int, default=None,
                        help="encoding processes (default: all CPUs; 4 with NVENC)")
    parser.add_argument("--encoder", choices=ENCODERS, default="auto",
                        help="auto (default): NVENC when present, else CPU (libx264 / libx265)")
    parser.add_argument("--crf", type=int, default=None,
                        help=f"quality, {CRF_RANGE[0]} (best) to {CRF_RANGE[1]} (smallest files): "
                        f"CRF for x264 / x265, cq for NVENC (default {_crf_defaults()})")
    parser.add_argument("--preset", default=None,
                        help=f"encoder preset: {' '.join(X26X_PRESETS)} for x264 / x265 "
                        f"(default {DEFAULT_PRESET['cpu']}); {NVENC_PRESETS[0]} to "
                        f"{NVENC_PRESETS[-1]} for NVENC (default {DEFAULT_PRESET['nvenc']})")
    parser.add_argument("--bframes", type=int, default=None,
                        help=f"B-frames, 0 to {MAX_BFRAMES} (default: the preset's)")
    parser.add_argument("--source-manifest", default=None,
                        help="manifest of src_dir, e.g. from `siasam-fast index` "
                        f"(default: DST_DIR/{SOURCE_MANIFEST_NAME})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main_transcode(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``siasam-fast transcode``; returns the exit status (0, or 1 when there were
    sources and none has an output; bad arguments exit with status 2 and a one-line error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except USAGE_ERRORS as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


# transcode()'s argument names -> the command line's flags, for its messages
FLAGS = {"gop": "--gop", "height": "--height", "workers": "--workers", "crf": "--crf",
         "preset": "--preset", "bframes": "--bframes", "codec": "--codec", "encoder": "--encoder"}


def run_from_args(args: argparse.Namespace) -> int:
    """Run a parsed ``siasam-fast transcode`` command line (for a CLI that adds a subparser)."""
    try:
        return _run_from_args(args)
    except ValueError as err:  # name the flag the user typed, not the function's argument
        text = str(err)
        match = re.match(r"(\w+)=('[^']*'|[^\s:]+): (.*)", text, re.S)
        if match and match.group(1) in FLAGS:
            name, value, rest = match.groups()
            value = value.strip("'")
            rest = re.sub(r", or None\b( for)?", lambda m: ", or leave the flag out" + (
                " for" if m.group(1) else ""), rest)
            text = f"{FLAGS[name]} {value}: {rest}"
        raise ValueError(text) from None


def _run_from_args(args: argparse.Namespace) -> int:
    summary = transcode(
        args.src_dir,
        args.dst_dir,
        gop=args.gop,
        height=args.height,
        codec=args.codec,
        workers=args.workers,
        encoder=args.encoder,
        crf=args.crf,
        preset=args.preset,
        bframes=args.bframes,
        source_manifest=args.source_manifest,
        progress=not args.no_progress,
    )
    print(summary.summary())
    outputs = len(summary.done) + len(summary.skipped)
    return 0 if outputs or not summary.results else 1


def summary_row(summary: TranscodeSummary) -> dict:
    """One flat dict of a summary (benchmarks write it to CSV)."""
    return {
        "encoder": summary.encoder,
        "hardware": summary.hardware,
        "gop": summary.gop,
        "height": summary.height,
        "codec": summary.codec,
        "transcoded": len(summary.done),
        "already_complete": len(summary.skipped),
        "failed": len(summary.failed),
        "bytes_in": summary.bytes_in,
        "bytes_out": summary.bytes_out,
        "growth": summary.growth,
        "seconds": summary.seconds,
    }


__all__ = [
    "EncoderUnavailableError",
    "TranscodeResult",
    "TranscodeSummary",
    "build_parser",
    "check_encoder",
    "choose_encoder",
    "encoder_options",
    "main_transcode",
    "nvenc_available",
    "output_size",
    "run_from_args",
    "summary_row",
    "transcode",
]
