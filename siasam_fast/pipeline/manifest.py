"""The video manifest: every video probed once, so sampling needs no file opens (DESIGN section 4).

:func:`build_manifest` walks a video folder, probes each file with PyAV in a process pool and
writes one JSON record per video (JSONL). Each record holds what the loaders need without opening
the file: the frame count counted from the stream (never trusted from metadata), fps, codec, size,
duration, the keyframes as frame indices (and their pts, which the CPU decoder seeks to), and the
status ``ok`` or ``corrupt`` with the reason. Loaders take ``ok`` records only, so a bad file never
reaches a decoder during training.

Frame numbering, shared by every backend: frame ``i`` is the i-th frame in presentation order, i.e.
the i-th smallest pts of the stream's frames (robust to B-frames and variable frame rate). Frames
that an edit list hides (the pre-roll that a cut without re-encoding keeps before its first frame)
are no frames: decoders never output them.

Probe modes:
- ``"decode"`` (default) decodes every frame. It catches truncated and corrupt streams (the
  decoder raises ``av.error.InvalidDataError``) and counts the frames the decoder really outputs.
  It costs one full decode per video, once.
- ``"demux"`` only reads packets (about 10-50x faster): frames are counted from packets, keyframes
  from the container's index. It catches unreadable, empty, truncated-container and zero-frame
  files and files shorter than their header says, but not corrupt data inside a stream that
  demuxes: such a file may fail later in a decoder (the loader then raises with the file name).

A re-run reads the old manifest and re-probes only files whose size or mtime changed (or whose
record came from an older manifest version or a weaker probe mode). The file is written atomically
(temp file + rename) at the end and every ``checkpoint_s`` seconds, so an interrupted run keeps the
videos probed so far and the next run resumes from them. Bad arguments fail before anything is
probed or written: a folder without videos, an output path that is a folder, or an existing file
that is not a manifest (never overwritten).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path

from tqdm.auto import tqdm

from siasam_fast.paths import USAGE_ERRORS, file_in_the_way
from siasam_fast.pipeline.workpool import imap_isolated

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
PROBE_MODES = ("decode", "demux")
STATUSES = ("ok", "corrupt")
# Containers a VideoQA dataset ships in (TGIF-QA is GIFs). Other files in the folder are ignored.
VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".gif",
    ".flv",
    ".wmv",
    ".mpg",
    ".mpeg",
    ".ts",
    ".mts",
    ".m2ts",
    ".3gp",
    ".ogv",
)


@dataclass
class VideoRecord:
    """One video of the manifest. Frame ``i`` is the i-th frame in presentation order."""

    video_id: str  # path relative to the video folder, without extension ("video7010", "sub/x")
    path: str  # absolute path when the manifest was built (see load_manifest(video_dir=...))
    relpath: str  # path relative to the video folder, with extension
    status: str  # "ok" | "corrupt"
    reason: str = ""  # why the video is corrupt; empty when ok
    num_frames: int = 0  # counted from the stream (decoded frames, or packets in demux mode)
    fps: float = 0.0  # average frame rate
    codec: str = ""
    width: int = 0
    height: int = 0
    pix_fmt: str = ""  # FFmpeg's pixel format ("yuv420p", "yuv420p10le"); "": not recorded
    duration: float = 0.0  # seconds, from the first frame's pts to the end of the last frame
    keyframes: list[int] = field(default_factory=list)  # frame indices of the seekable keyframes
    keyframe_pts: list[int] = field(default_factory=list)  # their pts, in time_base units
    time_base: str = ""  # the video stream's time base, "num/den"
    start_pts: int = 0  # pts of frame 0
    declared_frames: int = 0  # what the container header says (0: unknown); not trusted
    # degrees the picture is turned for display (the file's display matrix, as FFmpeg gives it:
    # 90 counter-clockwise, -90, 180; phone videos); frames are decoded as stored. 0 in records
    # probed before 2026-11-28
    rotation: int = 0
    size: int = 0  # file size in bytes when probed
    mtime_ns: int = 0  # file modification time (ns) when probed
    probe: str = "decode"  # the probe mode that produced the record
    version: int = MANIFEST_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, values: dict) -> VideoRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class ManifestBuild(dict):
    """What :func:`build_manifest` returns: the records written, by video_id (a dict, like
    :func:`load_manifest`), plus which files this run probed."""

    def __init__(
        self,
        path: Path,
        records: dict[str, VideoRecord],
        probed: list[str],
        reused: list[str],
        removed: list[str],
        duplicates: list[str],
    ) -> None:
        super().__init__(records)
        self.path = path
        self.probed = probed  # video_ids probed in this run
        self.reused = reused  # video_ids whose old record was kept (file unchanged)
        self.removed = removed  # video_ids of the old manifest whose file is gone
        self.duplicates = duplicates  # files skipped because their video_id was taken

    @property
    def num_ok(self) -> int:
        return sum(r.ok for r in self.values())

    @property
    def num_corrupt(self) -> int:
        return len(self) - self.num_ok

    def summary(self) -> str:
        reasons = Counter(_short_reason(r.reason) for r in self.values() if not r.ok)
        text = (
            f"{len(self)} videos: {self.num_ok} ok, {self.num_corrupt} corrupt "
            f"({len(self.probed)} probed, {len(self.reused)} unchanged, "
            f"{len(self.removed)} removed) -> {self.path}"
        )
        if self.duplicates:
            text += f"\n  {len(self.duplicates)} files skipped (video_id already taken)"
        turned = [r for r in self.values() if r.ok and r.rotation]
        if turned:
            text += (f"\n  {len(turned)} videos are turned for display (e.g. {turned[0].relpath}:"
                     f" {turned[0].rotation} degrees): their frames are read as stored, not "
                     "turned; `siasam-fast transcode` writes upright copies")
        for reason, count in reasons.most_common(10):
            text += f"\n  corrupt x{count}: {reason}"
        return text


def _short_reason(reason: str) -> str:
    return reason.split(":")[0] if reason else "unknown"


# ----------------------------------------------------------------------------------------------
# Probing one file


def open_video(file):
    """``av.open(file)`` for reading, such that a metadata tag's text that is not UTF-8 (e.g. a
    Latin-1 byte) is no error: PyAV < 19 decodes tags strictly unless given
    ``metadata_errors="ignore"``; PyAV 19 (Python >= 3.12) removed that argument (a TypeError)
    and always decodes them with ``surrogateescape``. Self-contained: DALI's reader processes run
    it pickled by value (:func:`siasam_fast.pipeline.dali.reader_source`)."""
    import av

    major = int(av.__version__.split(".")[0])
    return av.open(file) if major >= 19 else av.open(file, metadata_errors="ignore")


def read_pix_fmt(path: str | os.PathLike) -> str:
    """The pixel format of a video's first video stream, from its header alone ("" if it cannot
    be read: the loader finds out)."""
    try:
        with open_video(str(path)) as container:
            return container.streams.video[0].codec_context.pix_fmt or ""
    except Exception:  # noqa: BLE001 - any failure: the format stays unknown, as before
        return ""


def probe_video(
    path: str | os.PathLike, video_dir: str | os.PathLike, mode: str = "decode"
) -> VideoRecord:
    """Probe one file; never raises for a bad file (the record says ``corrupt`` and why)."""
    _check_mode(mode)
    path = Path(path)
    relpath = path.relative_to(video_dir).as_posix()
    record = VideoRecord(
        video_id=video_id_of(relpath),
        path=str(path.resolve()),
        relpath=relpath,
        status="corrupt",
        probe=mode,
    )
    try:
        st = path.stat()
        record.size, record.mtime_ns = st.st_size, st.st_mtime_ns
    except OSError as err:
        record.reason = f"unreadable: {err}"
        return record
    if record.size == 0:
        record.reason = "empty file: 0 bytes"
        return record
    try:
        _probe_stream(path, record, mode)
    except Exception as err:  # noqa: BLE001 - any failure of a file marks that file corrupt
        record.status = "corrupt"
        record.reason = _describe_error(err)
    return record


def _describe_error(err: Exception) -> str:
    import av

    if isinstance(err, PermissionError):
        return f"unreadable: {err}"
    if isinstance(err, av.error.InvalidDataError):
        return f"invalid data: {err}"
    if isinstance(err, av.error.FFmpegError):
        return f"ffmpeg error: {err}"
    return f"probe failed: {type(err).__name__}: {err}"


def _probe_stream(path: Path, record: VideoRecord, mode: str) -> None:
    with open_video(str(path)) as container:  # a tag's text is no fault
        if not container.streams.video:
            record.reason = "no video stream"
            return
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: probing is a full decode in "decode" mode
        ctx = stream.codec_context
        record.codec = ctx.name or ""
        record.width, record.height = int(ctx.width or 0), int(ctx.height or 0)
        record.pix_fmt = ctx.pix_fmt or ""  # what NVDEC can decode depends on it (nvdec.py)
        record.declared_frames = int(stream.frames or 0)
        time_base = stream.time_base or Fraction(1, 1)
        rate = stream.average_rate or stream.guessed_rate  # read before the container closes
        record.time_base = f"{time_base.numerator}/{time_base.denominator}"

        # AVI stores no presentation times (PyAV's packet pts is the decode order there): the
        # packets of a codec that reorders pictures cannot be numbered without decoding.
        no_pts = container.format.name == "avi" and not ctx.codec.intra_only
        frame_pts, keyframe_pts, packet_pts_missing, hidden, rotation = _read_stream(
            container, stream, mode)
        if mode == "demux" and (packet_pts_missing or no_pts):
            # Packets without pts cannot be put in presentation order: decode instead.
            record.probe = "decode"
            container.seek(0)
            frame_pts, keyframe_pts, _, hidden, rotation = _read_stream(container, stream,
                                                                        "decode")
        elif mode == "demux" and frame_pts:
            rotation = _first_frame_rotation(container, stream)
        record.rotation = rotation

    if not frame_pts:
        record.reason = "zero frames: the video stream holds no decodable frame"
        return
    if any(b <= a for a, b in zip(frame_pts, frame_pts[1:])):
        # (H.264 with B-frames in AVI, whose packets carry decode-order times; duplicated times in
        # MPEG-PS): the frames decode, in order, but cannot be found again by their times. The
        # count stays, for transcode, which numbers frames as they come out and writes new times.
        record.reason = (f"{TIMESTAMPS_NOT_INCREASING}: frames cannot be indexed by pts; "
                         "`siasam-fast transcode` re-times it")
        record.num_frames = len(frame_pts)
        return
    n = len(frame_pts)
    if record.declared_frames and n < record.declared_frames - hidden:
        record.reason = (
            f"truncated: the header declares {record.declared_frames} frames, "
            f"only {n} could be read"
        )
        return
    rank = {p: i for i, p in enumerate(frame_pts)}
    keyframes = sorted((rank[p], p) for p in set(keyframe_pts) if p in rank)
    if any(p < frame_pts[0] for p in keyframe_pts) and (not keyframes or keyframes[0][0] != 0):
        # A keyframe before frame 0 whose own frame is never output (a cut's pre-roll that the
        # edit list hides): a seek to frame 0's pts lands on it, and decoding goes on to frame 0.
        keyframes.insert(0, (0, frame_pts[0]))
    if not keyframes:
        record.reason = "no keyframe: the stream cannot be seeked"
        return
    record.keyframes = [int(i) for i, _ in keyframes]
    record.keyframe_pts = [int(p) for _, p in keyframes]
    record.num_frames = n
    record.start_pts = int(frame_pts[0])
    span = float((frame_pts[-1] - frame_pts[0]) * time_base)
    if rate and rate > 0:
        fps = float(rate)
    elif n > 1 and span > 0:
        fps = (n - 1) / span
    else:
        fps = 0.0
    record.fps = fps
    record.duration = span + (1.0 / fps if fps > 0 else 0.0)
    record.status, record.reason = "ok", ""


TIMESTAMPS_NOT_INCREASING = "timestamps not increasing"


def retimeable(record: VideoRecord) -> bool:
    """A corrupt record whose only fault is its frames' times (they decode, in order): a
    transcode, which numbers frames as they come out, makes an indexable copy of it."""
    return (record.status == "corrupt" and record.reason.startswith(TIMESTAMPS_NOT_INCREASING)
            and record.num_frames > 0)


def _read_stream(container, stream, mode: str) -> tuple[list[int], list[int], bool, int, int]:
    """(sorted frame pts, keyframe packet pts, whether some packet lacked a pts, the number of
    packets flagged discard: hidden by an edit list, decoded but their frames never output, the
    display rotation of the first frame: decode mode only, else 0)."""
    rotation = 0
    frame_pts: list[int] = []
    keyframe_pts: list[int] = []
    missing = False
    hidden = 0
    keyed = False  # demux: packets before the first keyframe (a file cut mid-GOP) decode to none
    for packet in container.demux(stream):
        if packet.size:
            hidden += bool(packet.is_discard)
            keyed = keyed or bool(packet.is_keyframe)
            if packet.pts is None:
                missing = True
            else:
                if packet.is_keyframe:
                    keyframe_pts.append(int(packet.pts))
                if mode == "demux" and keyed and not packet.is_discard:
                    frame_pts.append(int(packet.pts))
        if mode == "decode":  # the final empty packet flushes the decoder
            for frame in packet.decode():
                if frame.pts is None:
                    raise ValueError("a decoded frame has no pts: frames cannot be indexed by pts")
                if not frame_pts:
                    rotation = _rotation_of(frame)
                frame_pts.append(int(frame.pts))
    if mode == "demux":
        frame_pts.sort()
    return frame_pts, keyframe_pts, missing, hidden, rotation


def _rotation_of(frame) -> int:
    """The frame's display rotation in degrees counter-clockwise, in (-180, 180] (0, 90, -90,
    180), from its display matrix."""
    try:
        degrees = int(round(float(frame.rotation or 0))) % 360
    except (AttributeError, TypeError, ValueError):  # (a PyAV without Frame.rotation)
        return 0
    return degrees - 360 if degrees > 180 else degrees


def _first_frame_rotation(container, stream) -> int:
    """Demux mode decodes no frame: the first one, for its display rotation (0 if none)."""
    try:
        container.seek(0, stream=stream)
        for frame in container.decode(stream):
            return _rotation_of(frame)
    except Exception:  # noqa: BLE001 - the rotation is a note; the probe's verdict stands
        pass
    return 0


def video_id_of(relpath: str) -> str:
    """The manifest key of a file: its path relative to the video folder, without extension."""
    path = Path(relpath)
    return path.with_suffix("").as_posix()


# ----------------------------------------------------------------------------------------------
# Reading and writing


def incomplete_marker(path: str | os.PathLike) -> Path:
    """The file next to a manifest that says the run writing it has not finished."""
    path = Path(path)
    return path.with_name(path.name + ".incomplete")


def require_manifest_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a file; else FileNotFoundError saying how to make it (a
    training checks this before its slow start-up)."""
    path = Path(path)
    if path.is_dir():  # FileNotFoundError too: callers catch that one for "no manifest here"
        raise FileNotFoundError(
            f"manifest {path} is a folder; give the manifest file, e.g. {path / 'manifest.jsonl'}"
        )
    if not path.is_file():
        synth = (f"`siasam-fast synth --out {path.parent}`" if path.name == "manifest.jsonl"
                 else "`siasam-fast synth --out DIR` (DIR/manifest.jsonl)")
        raise FileNotFoundError(
            f"manifest {path} does not exist; build it with `siasam-fast index VIDEO_DIR --out "
            f"{path}` (or {synth} for the synthetic set)"
        )
    return path


def load_manifest(
    path: str | os.PathLike, video_dir: str | os.PathLike | None = None, *,
    allow_incomplete: bool = False,
) -> dict[str, VideoRecord]:
    """Records by video_id. ``video_dir`` re-roots every ``path`` (the videos moved since).

    A manifest that an interrupted ``index`` or ``transcode`` left (its ``.incomplete`` marker
    beside it: videos still without a record) is refused with what to do, unless
    ``allow_incomplete`` (those commands themselves, to continue it)."""
    path = require_manifest_file(path)
    marker = incomplete_marker(path)
    if not allow_incomplete and marker.is_file():
        try:
            left = json.loads(marker.read_text())
            note = f"{left['missing']} video(s) had no record yet when `{left['made_by']}` stopped"
        except (OSError, ValueError, TypeError, KeyError):
            note = "the run writing it did not finish"
        raise ValueError(
            f"manifest {path} is incomplete ({note}): run the same command again, which continues "
            f"where it stopped, or delete {marker} to use the manifest as it is"
        )
    records: dict[str, VideoRecord] = {}
    with path.open(encoding="utf-8") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    values = json.loads(line)
                    if not isinstance(values, dict):
                        raise TypeError(f"a JSON {type(values).__name__}, not an object")
                    record = VideoRecord.from_dict(values)
                except (json.JSONDecodeError, TypeError) as err:
                    raise ValueError(f"{path}:{lineno}: not a manifest record ({err})") from err
                if video_dir is not None:
                    record.path = str(Path(video_dir).resolve() / record.relpath)
                records[record.video_id] = record
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a manifest (not UTF-8 text)") from err
    misnumbered = [r.relpath for r in records.values() if numbered_in_decode_order(r)]
    if misnumbered:
        logger.warning(
            "%s: %d AVI video(s) were indexed with --fast by an older siasam-fast that numbered "
            "their frames in decode order (%s%s): their sampled frames may be the wrong ones; "
            "re-run `siasam-fast index` on the folder (it probes these again)", path,
            len(misnumbered), ", ".join(misnumbered[:3]), ", ..." if len(misnumbered) > 3 else "")
    return records


def existing_manifest(path: str | os.PathLike) -> dict[str, VideoRecord]:
    """The records of the manifest at ``path`` ({} when there is none yet), once it is checked
    that a manifest may be written there: raises, before anything is written, when ``path`` is a
    folder, lies under a file, or is an existing file that is not a manifest (a file that is not
    a manifest is never overwritten)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"manifest path {str(path)!r} is a folder; give a file path, "
            f"e.g. {str(path / 'manifest.jsonl')!r}"
        )
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise NotADirectoryError(
            f"manifest path {str(path)!r}: {str(blocker)!r} is a file, not a folder"
        )
    if not path.exists():
        return {}
    if not path.is_file():
        raise ValueError(f"manifest path {str(path)!r} exists and is not a regular file")
    try:
        return load_manifest(path, allow_incomplete=True)
    except ValueError as err:
        raise ValueError(
            f"{str(path)!r} exists and is not a video manifest ({err}); refusing to overwrite it: "
            "move it away or choose another manifest path"
        ) from None


def write_manifest(records: Iterable[VideoRecord], path: str | os.PathLike, *,
                   missing: int = 0, made_by: str = "siasam-fast index") -> Path:
    """Write JSONL atomically: a temp file in the same folder, fsync, then rename over ``path``.

    ``missing``: videos of the run (``made_by``) that have no record yet: an interim write of a
    run that goes on, or was stopped. Then ``incomplete_marker(path)`` says so, and
    :func:`load_manifest` refuses the manifest; a write with none missing removes the marker."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a manifest is shared data (other users, other nodes' jobs):
        # give it the mode any new file gets here (0666 less the umask), as open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in sorted(records, key=lambda r: r.video_id):
                fh.write(record.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        marker = incomplete_marker(path)
        if missing:  # the marker first: the manifest is never seen without it while incomplete
            marker.write_text(json.dumps({"missing": int(missing), "made_by": made_by}) + "\n")
        os.replace(tmp, path)
        if not missing:
            marker.unlink(missing_ok=True)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def find_videos(
    video_dir: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS
) -> list[Path]:
    """Video files under ``video_dir`` (recursively, hidden files skipped), sorted by path.

    Symlinked subfolders are followed (datasets are often assembled from links to other disks),
    each real folder once: a link back up the tree, or a second link to a folder already listed,
    is skipped, so no video is listed twice."""
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        why = "it is a file" if video_dir.exists() else "it does not exist"
        raise NotADirectoryError(f"video_dir={str(video_dir)!r} is not a folder ({why})")
    exts = set(_extensions(extensions))
    found = []
    seen = {os.path.realpath(video_dir)}
    for root, dirs, files in os.walk(video_dir, followlinks=True):
        keep = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(root, name))
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(name)
        dirs[:] = keep
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in exts:
                found.append(Path(root) / name)
    return sorted(found)


def require_videos(
    video_dir: str | os.PathLike,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    name: str = "video_dir",
) -> list[Path]:
    """:func:`find_videos`, raising ValueError (named ``name``, with the extensions looked for)
    when the folder holds none."""
    found = find_videos(video_dir, extensions)
    if not found:
        raise ValueError(
            f"{name}={str(video_dir)!r} holds no videos (looked for "
            f"{' '.join(_extensions(extensions))} files, in subfolders too; hidden files skipped)"
        )
    return found


def _extensions(extensions: Sequence[str]) -> list[str]:
    return [e.lower() if e.startswith(".") else "." + e.lower() for e in extensions]


# ----------------------------------------------------------------------------------------------
# Building


def build_manifest(
    video_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    workers: int | None = None,
    mode: str = "decode",
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    progress: bool = True,
    checkpoint_s: float = 60.0,
    *,
    allow_empty: bool = False,
) -> ManifestBuild:
    """Probe every video under ``video_dir`` and write the manifest to ``out_path`` (JSONL).

    ``workers``: probing processes (default: all CPUs; 0 or 1 probes in this process).
    ``mode``: "decode" (every frame decoded: catches corrupt streams) or "demux" (packets only,
    much faster, misses corrupt data inside a stream); see the module docstring.
    Files whose size and mtime match the old manifest at ``out_path`` are not probed again.
    Raises before anything is probed or written when ``video_dir`` is not a folder, when it holds
    no video (unless ``allow_empty``: then an empty manifest is written) or when ``out_path`` is a
    folder or an existing file that is not a manifest (:func:`existing_manifest`).
    Returns the records by video_id (a dict, as :func:`load_manifest`) with ``probed``,
    ``reused``, ``removed``, ``duplicates`` and ``summary()`` for this run.
    """
    _check_mode(mode)
    video_dir = Path(video_dir)
    out_path = Path(out_path)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers={workers}: must be >= 0 (0 or 1 probes in this process)")
    found = find_videos(video_dir, extensions) if allow_empty else require_videos(
        video_dir, extensions)
    old = existing_manifest(out_path)
    files, duplicates = _unique_ids(found, video_dir)

    records: dict[str, VideoRecord] = {}
    todo: list[Path] = []
    reused: list[str] = []
    for vid, path in files.items():
        previous = old.get(vid)
        if previous is not None and _still_valid(previous, path, video_dir, mode):
            previous.path = str(path.resolve())
            if previous.ok and not previous.pix_fmt:  # a record from before pix_fmt was kept
                previous.pix_fmt = read_pix_fmt(path)
            records[vid] = previous
            reused.append(vid)
        else:
            todo.append(path)
    removed = sorted(set(old) - set(files))
    # Until a file queued for probing has its new record, an interim write keeps its old one: an
    # interrupted re-index (--fast -> decode, touched or copied files) must not shrink the
    # manifest that training reads. The next run probes those files again.
    pending = {video_id_of(p.relative_to(video_dir).as_posix()) for p in todo}
    pending = {vid: old[vid] for vid in pending if vid in old}

    def interim() -> list[VideoRecord]:
        return [*records.values(), *(r for vid, r in pending.items() if vid not in records)]

    def write_interim() -> None:
        kept = interim()
        write_manifest(kept, out_path, missing=len(files) - len(kept))

    probed: list[str] = []
    last_write = time.monotonic()
    bar = tqdm(total=len(todo), desc="probing videos", unit="video",
               disable=not progress or not todo)  # (a re-run with nothing new: no empty bar)
    try:
        for record in _probe_all(todo, video_dir, mode, workers):
            records[record.video_id] = record
            probed.append(record.video_id)
            bar.update(1)
            if time.monotonic() - last_write > checkpoint_s:
                write_interim()
                last_write = time.monotonic()
    except BaseException:
        # Keep what was probed (KeyboardInterrupt included): the next run resumes from it.
        write_interim()
        raise
    finally:
        bar.close()
    write_manifest(records.values(), out_path)
    build = ManifestBuild(out_path, records, probed, reused, removed, duplicates)
    logger.info("manifest: %s", build.summary())
    return build


def _check_mode(mode: str) -> None:
    if mode not in PROBE_MODES:
        raise ValueError(f"mode={mode!r}: valid probe modes are {', '.join(PROBE_MODES)}")


def _unique_ids(paths: list[Path], video_dir: Path) -> tuple[dict[str, Path], list[str]]:
    files: dict[str, Path] = {}
    duplicates: list[str] = []
    for path in paths:  # sorted: the first file of a video_id wins
        vid = video_id_of(path.relative_to(video_dir).as_posix())
        if vid in files:
            duplicates.append(path.relative_to(video_dir).as_posix())
            logger.warning("skipping %s: video_id %r is already %s", path, vid, files[vid])
        else:
            files[vid] = path
    return files, duplicates


_MODE_STRENGTH = {"demux": 0, "decode": 1}


def numbered_in_decode_order(record: VideoRecord) -> bool:
    """Whether ``record`` numbered an AVI file's frames by its packets although the codec
    reorders pictures (B-frames): AVI stores no presentation times, so such frames came out in
    decode order. Demux-mode probes did that before they learnt to decode these files; ``index``
    probes such records again, and :func:`load_manifest` warns about them."""
    return (record.ok and record.probe == "demux" and record.relpath.lower().endswith(".avi")
            and not _intra_only(record.codec))


@functools.cache
def _intra_only(codec: str) -> bool:
    import av

    try:
        return bool(av.Codec(codec, "r").intra_only)
    except Exception:  # noqa: BLE001 - an unknown codec name: assume it reorders
        return False


def _still_valid(record: VideoRecord, path: Path, video_dir: Path, mode: str) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return (
        record.version == MANIFEST_VERSION
        and record.size == st.st_size
        and record.mtime_ns == st.st_mtime_ns
        and record.relpath == path.relative_to(video_dir).as_posix()
        and _MODE_STRENGTH.get(record.probe, -1) >= _MODE_STRENGTH[mode]
        and not numbered_in_decode_order(record)
        # Worth another try: permissions may have been fixed, a crash may not be the file's fault.
        and not record.reason.startswith(("unreadable", "decoder crashed"))
    )


def _probe_all(
    paths: list[Path], video_dir: Path, mode: str, workers: int
) -> Iterator[VideoRecord]:
    """Records in completion order. A file that kills its worker process is marked corrupt."""
    probe = functools.partial(probe_video, video_dir=video_dir, mode=mode)
    crashed = functools.partial(_crashed_record, video_dir=video_dir, mode=mode)
    yield from imap_isolated(probe, paths, workers, on_crash=crashed, in_flight_per_worker=4)


def _crashed_record(path: Path, video_dir: Path, mode: str) -> VideoRecord:
    relpath = path.relative_to(video_dir).as_posix()
    st = path.stat()
    return VideoRecord(
        video_id=video_id_of(relpath),
        path=str(path.resolve()),
        relpath=relpath,
        status="corrupt",
        reason="decoder crashed: the probing process died on this file",
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        probe=mode,
    )


# ----------------------------------------------------------------------------------------------
# Command line: `siasam-fast index VIDEO_DIR --out manifest.jsonl [--workers W] [--mode demux]`


def main_index(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``siasam-fast index``; returns the exit status (0, or 1 if nothing is ok;
    bad arguments exit with status 2 and a one-line error)."""
    parser = argparse.ArgumentParser(
        prog="siasam-fast index",
        description="Probe every video of a folder once and write the video manifest (JSONL).",
    )
    parser.add_argument("video_dir", help="folder of videos (searched recursively)")
    parser.add_argument("--out", required=True, help="manifest path, e.g. manifest.jsonl")
    parser.add_argument(
        "--workers", type=int, default=None, help="probing processes (default: all CPUs)"
    )
    parser.add_argument(
        "--mode",
        choices=PROBE_MODES,
        default="decode",
        help="decode: decode every frame, catches corrupt streams (default); "
        "demux: read packets only, much faster, misses corrupt data inside a stream",
    )
    parser.add_argument(
        "--ext",
        action="append",
        default=None,
        help=f"video extension to index (repeatable; default: {' '.join(VIDEO_EXTENSIONS)})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        build = build_manifest(
            args.video_dir,
            args.out,
            workers=args.workers,
            mode=args.mode,
            extensions=args.ext or VIDEO_EXTENSIONS,
            progress=not args.no_progress,
        )
    except USAGE_ERRORS as err:
        # Bad arguments: raised before anything is probed or written.
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(build.summary())
    return 0 if build.num_ok or not build else 1
