"""CPU decoding with PyAV: the sorted unique frames U of one video, decoded once (DESIGN section 4).

Frame ``i`` is the i-th frame in presentation order (the manifest's numbering, shared with the
DALI backend). :func:`decode_frames` walks the wanted frames in increasing order and, for each run
of them, seeks to the keyframe at or before the run and decodes forward; frames are identified by
their pts: a decoded frame whose pts is a keyframe's pts (from the manifest) fixes the position,
and the following frames, which the decoder outputs in presentation order, count up from it. This
is robust to B-frames (decode order != presentation order) and to variable frame rates (pts
spacing irregular). Seeks only ever go forward: when the next wanted frame is close ahead (its
keyframe is at most ``seek_threshold`` frames past the decoder's position) decoding simply
continues, otherwise it seeks to that keyframe. If a seek lands past the wanted frame (a container
with an imprecise index), the video is decoded again from the start without seeking.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from siasam_fast.pipeline.manifest import VideoRecord, open_video

logger = logging.getLogger(__name__)

# Seek only when it skips more than this many frames of decoding: a seek flushes the decoder and
# re-reads from a keyframe, which costs about as much as decoding a handful of small frames.
DEFAULT_SEEK_THRESHOLD = 8


class DecodeError(RuntimeError):
    """A video the manifest calls ok did not yield the wanted frames (stale manifest, bad file)."""


@dataclass
class DecodeStats:
    """Counters of one or more :func:`decode_frames` calls (tests and benchmarks read them)."""

    seeks: int = 0  # container seeks
    decoded: int = 0  # frames output by the decoder
    returned: int = 0  # frames converted to RGB and returned
    restarts: int = 0  # decodes repeated from the start after a seek landed too late
    seek_targets: list[int] = field(default_factory=list)  # keyframe (frame index) of each seek


class _SeekMissed(Exception):
    pass


def decode_frames(
    record: VideoRecord,
    frames,
    *,
    seek_threshold: int = DEFAULT_SEEK_THRESHOLD,
    threads: int = 1,
    stats: DecodeStats | None = None,
    path: str | Path | None = None,
    convert: Callable[[np.ndarray], Any] | None = None,
):
    """Decode the given frames of one video: uint8 RGB ``[len(frames), H, W, 3]``.

    ``frames`` must be sorted, unique and within ``[0, record.num_frames)`` (the ``unique`` of a
    :class:`~siasam_fast.sampling.ClipIndices`). ``threads``: decoder threads (1 by default: the
    DataLoader workers are the parallelism; 0 lets FFmpeg choose). ``path`` overrides
    ``record.path``. ``convert``: applied to each frame (uint8 RGB ``[H, W, 3]``) as it is
    decoded; the result is then the list of what it returned, in order (e.g.
    :func:`~siasam_fast.pipeline.transforms.frame_resizer`: one full-size frame in memory at a
    time, not the whole video's).
    """
    import av

    if not record.ok:
        raise ValueError(
            f"video {record.video_id!r} is {record.status} ({record.reason}); "
            "only manifest records with status 'ok' can be decoded"
        )
    wanted = _check_frames(frames, record)
    stats = stats if stats is not None else DecodeStats()
    path = str(path or record.path)
    if wanted.size == 0:
        if convert is not None:
            return []
        return np.zeros((0, record.height, record.width, 3), np.uint8)
    if seek_threshold < 0:
        raise ValueError(f"seek_threshold={seek_threshold}: must be >= 0")
    changed = file_change(path, record.size)
    if changed:  # frames would be numbered by a record of another file: refused, not guessed
        raise DecodeError(f"{path}: {changed}")
    try:
        try:
            out = _decode(av, path, record, wanted, seek_threshold, threads, stats, seek=True,
                          convert=convert)
        except _SeekMissed:
            stats.restarts += 1
            logger.debug("%s: a seek landed past the wanted frame; decoding from the start", path)
            out = _decode(av, path, record, wanted, seek_threshold, threads, stats, seek=False,
                          convert=convert)
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - FFmpeg's errors, and what a damaged header raises
        raise DecodeError(  # (IndexError, AttributeError, ... from PyAV): always with the path
            f"{path}: decoding failed ({type(err).__name__}: {err}); the manifest says ok, "
            "re-run `siasam-fast index`"
        ) from err
    stats.returned += len(out)
    return out if convert is not None else np.stack(out)


# How file_change's reason for a size that differs from the manifest's begins.
CHANGED_SINCE_INDEXING = "changed since the manifest was built"


def file_change(path: str | Path, size: int) -> str | None:
    """Why the file at ``path`` is not the one the manifest measured (``size`` bytes; 0:
    unknown), or None. Sizes are compared, not modification times: copies (``cp -r``, cloud
    sync) rarely keep those."""
    try:
        now = os.stat(path).st_size
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    if size and now != size:
        return (f"{CHANGED_SINCE_INDEXING} (size {size} -> {now} bytes); "
                "re-run `siasam-fast index`")
    return None


def _check_frames(frames, record: VideoRecord) -> np.ndarray:
    wanted = np.asarray(frames, dtype=np.int64).reshape(-1)
    if wanted.size == 0:
        return wanted
    if np.any(np.diff(wanted) <= 0):
        raise ValueError(
            f"frames must be sorted and unique (got {wanted[:8].tolist()}...); pass "
            "ClipIndices.unique and gather clips with ClipIndices.inverse"
        )
    if wanted[0] < 0 or wanted[-1] >= record.num_frames:
        raise ValueError(
            f"frames {wanted[0]}..{wanted[-1]} out of range for video {record.video_id!r}: "
            f"valid frames are 0..{record.num_frames - 1}"
        )
    return wanted


def _decode(av, path, record, wanted, seek_threshold, threads, stats, seek: bool,
            convert=None) -> list:
    keyframes = np.asarray(record.keyframes, dtype=np.int64)
    keyframe_pts = [int(p) for p in record.keyframe_pts]
    sync = dict(zip(keyframe_pts, (int(k) for k in keyframes)))
    out: list[np.ndarray] = []
    # A reformatter of this call's own: PyAV 19's frame.to_ndarray(format=...) uses one per
    # thread, which a forked DataLoader worker inherits from its parent (swscale's slice threads
    # included) and then hangs freeing.
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    with open_video(path) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if threads != 1:
            ctx.thread_type = "AUTO"
            ctx.thread_count = max(0, int(threads))
        else:
            ctx.thread_count = 1

        def keyframe_before(frame: int) -> int:
            """Position in ``keyframes`` of the last keyframe at or before ``frame`` (-1: none)."""
            return int(np.searchsorted(keyframes, frame, side="right")) - 1

        i = 0
        cur = -1  # index of the last frame output by the decoder; None: unknown (just seeked)
        last_pts = None
        seeked = False  # a seek happened: what goes wrong after it may be the seek's doing
        frames_iter = container.decode(stream)
        while i < len(wanted):
            target = int(wanted[i])
            j = keyframe_before(target)
            # cur is known here: the loop below only hands back after matching a frame.
            if seek and j >= 0 and keyframes[j] > cur + 1 + seek_threshold:
                container.seek(keyframe_pts[j], stream=stream, backward=True, any_frame=False)
                stats.seeks += 1
                stats.seek_targets.append(int(keyframes[j]))
                cur, last_pts, seeked = None, None, True
                frames_iter = container.decode(stream)
            for frame in frames_iter:
                stats.decoded += 1
                pts = frame.pts
                if last_pts is not None and (pts is None or pts <= last_pts):
                    if seeked:  # (MPEG-PS after a seek): decoded from the start, as indexed
                        raise _SeekMissed()
                    raise DecodeError(
                        f"{path}: frame pts {pts} after {last_pts}: timestamps not increasing"
                    )
                k = sync.get(pts)
                if k is not None:
                    if cur is not None and k != cur + 1:
                        if seeked:
                            raise _SeekMissed()
                        raise DecodeError(
                            f"{path}: keyframe pts {pts} is frame {k} in the manifest but frame "
                            f"{cur + 1} in the stream; the manifest is stale, re-run "
                            "`siasam-fast index`"
                        )
                    cur = k
                elif cur is None:
                    continue  # frames before the first keyframe reached by the seek
                else:
                    cur += 1
                last_pts = pts
                if cur < target:
                    continue
                if cur > target:
                    raise _SeekMissed()
                rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
                out.append(rgb if convert is None else convert(rgb))
                i += 1
                if i == len(wanted):
                    break
                target = int(wanted[i])
                j = keyframe_before(target)
                if seek and j >= 0 and keyframes[j] > cur + 1 + seek_threshold:
                    break  # far ahead: the outer loop seeks to its keyframe
            else:
                if seeked:  # e.g. MPEG-TS: a seek to a keyframe's pts can land on the next
                    raise _SeekMissed()  # keyframe, or past the last one (no frame at all)
                raise DecodeError(
                    f"{path}: the stream ended before frames {wanted[i:].tolist()[:8]} "
                    f"(last frame decoded: {cur}; the manifest counts {record.num_frames}); "
                    "the manifest is stale or the file is damaged, re-run `siasam-fast index`"
                )
    return out
