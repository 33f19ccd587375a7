"""Decode cost model: the frames the PyAV decoder decodes to return a frame set (issue 7).

To return the sorted unique frames U of a video, :func:`~siasam_fast.pipeline.pyav_decode.
decode_frames` walks U in increasing order; before each wanted frame it seeks to the keyframe at or
before that frame only when the seek skips more than ``seek_threshold`` frames of decoding (the
keyframe lies more than ``seek_threshold`` frames past the decoder's position), otherwise it keeps
decoding forward. Every frame the decoder outputs counts, wanted or not:

    decoded = needed + pre-roll + gaps

- pre-roll: frames decoded before the first wanted frame of the video and after every seek, up to
  the wanted frame the seek was for (from the keyframe, or from frame 0 when the first keyframe
  needed is within ``seek_threshold`` of the start and no seek happens);
- gaps: unwanted frames between two wanted frames decoded without a seek in between.

:func:`decode_cost` replays that policy on the manifest's keyframe indices, without opening the
file; it equals ``DecodeStats.decoded`` / ``seeks`` / ``seek_targets`` of a real decode (tests check
it on encoded videos of several GOP sizes) under two assumptions the manifest's videos meet: seeks
land on the keyframe asked for (an imprecise index makes ``decode_frames`` restart from frame 0:
``DecodeStats.restarts``) and GOPs are closed (no leading frames, before the keyframe in
presentation order, that an open GOP decodes after it). :func:`sampling_cost` averages the cost
over training draws of the siamese sampler, which is how the keyframe-aware sampling options
(``siasam_fast.sampling``) and short-GOP transcodes (``transcode.py``) are compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from siasam_fast.pipeline.manifest import VideoRecord
from siasam_fast.pipeline.pyav_decode import DEFAULT_SEEK_THRESHOLD
from siasam_fast.sampling import SamplingConfig, example_rng, sample_siamese_clips


@dataclass(frozen=True)
class DecodeCost:
    """What one decode of a frame set costs, in frames."""

    needed: int  # wanted frames (len(U))
    decoded: int  # frames output by the decoder: needed + preroll + gaps
    preroll: int  # decoded before the first wanted frame and after each seek, then thrown away
    gaps: int  # unwanted frames between wanted frames decoded without a seek
    seeks: int
    seek_targets: tuple[int, ...]  # keyframe (frame index) of each seek

    @property
    def discarded(self) -> int:
        """Frames decoded and thrown away."""
        return self.decoded - self.needed

    @property
    def ratio(self) -> float:
        """Decoded frames per needed frame (1.0: nothing wasted; NaN when nothing is needed)."""
        return self.decoded / self.needed if self.needed else float("nan")


def decode_cost(
    keyframes: Sequence[int] | np.ndarray,
    frames: Sequence[int] | np.ndarray,
    seek_threshold: int = DEFAULT_SEEK_THRESHOLD,
    num_frames: int | None = None,
) -> DecodeCost:
    """The frames :func:`~siasam_fast.pipeline.pyav_decode.decode_frames` decodes for ``frames``.

    ``keyframes``: the video's keyframe indices (``VideoRecord.keyframes``). ``frames``: sorted,
    unique frame indices (``ClipIndices.unique``), below ``num_frames`` when it is given.
    ``seek_threshold``: the decoder's (seek only when that skips more than this many frames).
    """
    if seek_threshold < 0:
        raise ValueError(f"seek_threshold={seek_threshold}: must be >= 0")
    kf = np.unique(np.asarray(keyframes, dtype=np.int64).reshape(-1))
    wanted = np.asarray(frames, dtype=np.int64).reshape(-1)
    if wanted.size and np.any(np.diff(wanted) <= 0):
        raise ValueError(
            f"frames must be sorted and unique (got {wanted[:8].tolist()}...); pass "
            "ClipIndices.unique"
        )
    if wanted.size and (wanted[0] < 0 or (num_frames is not None and wanted[-1] >= num_frames)):
        valid = "0.." + (str(num_frames - 1) if num_frames is not None else "")
        raise ValueError(f"frames {wanted[0]}..{wanted[-1]} out of range: valid frames are {valid}")
    before = np.searchsorted(kf, wanted, side="right") - 1  # keyframe at or before each frame
    pos = 0  # the next frame the decoder outputs
    decoded = preroll = gaps = 0
    targets: list[int] = []
    for i, target in enumerate(wanted.tolist()):
        j = int(before[i])
        seeked = j >= 0 and int(kf[j]) > pos + seek_threshold
        if seeked:
            pos = int(kf[j])
            targets.append(pos)
        skipped = target - pos
        if seeked or i == 0:
            preroll += skipped
        else:
            gaps += skipped
        decoded += skipped + 1
        pos = target + 1
    return DecodeCost(
        needed=int(wanted.size),
        decoded=decoded,
        preroll=preroll,
        gaps=gaps,
        seeks=len(targets),
        seek_targets=tuple(targets),
    )


@dataclass(frozen=True)
class SamplingCost:
    """Decode cost averaged over training draws (per video, in frames)."""

    draws: int  # draws that were not skipped
    needed: float  # mean wanted frames per draw
    decoded: float  # mean decoded frames per draw
    preroll: float
    gaps: float
    seeks: float

    @property
    def ratio(self) -> float:
        """Decoded frames per needed frame over all draws (total decoded / total needed)."""
        return self.decoded / self.needed if self.needed else float("nan")

    def as_dict(self) -> dict:
        return {
            "draws": self.draws,
            "needed": self.needed,
            "decoded": self.decoded,
            "preroll": self.preroll,
            "gaps": self.gaps,
            "seeks": self.seeks,
            "decoded_per_needed": self.ratio,
        }


def sampling_cost(
    videos: VideoRecord | Iterable[VideoRecord] | tuple[int, Sequence[int]],
    config: SamplingConfig,
    draws: int = 64,
    seed: int = 0,
    seek_threshold: int = DEFAULT_SEEK_THRESHOLD,
) -> SamplingCost:
    """Modelled decode cost of the training sampler, averaged over ``draws`` draws per video.

    ``videos``: manifest records (``ok`` ones are used) or one ``(num_frames, keyframes)`` pair.
    Draw ``i`` of video ``v`` uses ``example_rng(seed, i, v)``, so two configs compared with the
    same seed see the same random numbers (common random numbers: small differences show).
    """
    if draws < 1:
        raise ValueError(f"draws={draws}: must be >= 1")
    if isinstance(videos, tuple) and videos and not isinstance(videos[0], VideoRecord):
        # one (num_frames, keyframes) pair; a tuple of records is an iterable of records
        if len(videos) != 2:
            raise ValueError(f"videos: expected manifest records or one (num_frames, keyframes) "
                             f"pair, got a tuple of {len(videos)} items")
        items = [(int(videos[0]), np.asarray(videos[1], dtype=np.int64))]
    else:
        records = [videos] if isinstance(videos, VideoRecord) else list(videos)
        items = [(r.num_frames, np.asarray(r.keyframes, dtype=np.int64)) for r in records if r.ok]
    totals = np.zeros(5)
    count = 0
    for v, (T, keyframes) in enumerate(items):
        for i in range(draws):
            clips = sample_siamese_clips(T, config, example_rng(seed, i, v), keyframes=keyframes)
            if clips.skipped:
                continue
            c = decode_cost(keyframes, clips.unique, seek_threshold)
            totals += (c.needed, c.decoded, c.preroll, c.gaps, c.seeks)
            count += 1
    mean = totals / max(count, 1)
    return SamplingCost(count, *(float(x) for x in mean))


def plan_set(
    records: dict[str, VideoRecord] | Iterable[VideoRecord],
    config: SamplingConfig,
    gops: Sequence[int] = (8, 16, 32),
    videos: int = 500,
    draws: int = 16,
    seed: int = 0,
) -> dict:
    """What the training sampler's decoding costs on a manifest's videos, as they are and as a
    ``siasam-fast transcode --gop G`` would leave them (a keyframe every G frames): up to
    ``videos`` usable videos drawn at random, ``draws`` draws each (:func:`sampling_cost`).

    Returns ``videos`` (usable ones), ``sampled``, ``frames`` and ``gop`` (medians over the
    sample: frames, and frames between keyframes) and ``rows``: ``{"set", "gop", **SamplingCost.
    as_dict()}``, the set as indexed first."""
    from dataclasses import replace

    for name, value in (("videos", videos), ("draws", draws)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    bad = [g for g in gops if isinstance(g, bool) or not isinstance(g, int) or g < 1]
    if bad:
        raise ValueError(f"gops={list(gops)!r}: each GOP must be an integer >= 1 (frames)")
    every = list(records.values() if isinstance(records, dict) else records)
    ok = [r for r in every if r.ok]
    if not every:
        raise ValueError("the manifest holds no videos")
    if not ok:
        raise ValueError(f"the manifest holds no usable video (all {len(every)} are corrupt)")
    usable = len(ok)
    if usable > videos:
        picked = np.random.default_rng(seed).choice(usable, videos, replace=False)
        ok = [ok[i] for i in sorted(picked)]
    frames = [r.num_frames for r in ok]
    per_keyframe = [float(np.median(np.diff(r.keyframes))) if len(r.keyframes) > 1
                    else float(r.num_frames) for r in ok]  # one keyframe: the whole video
    rows = [{"set": "as indexed", "gop": float(np.median(per_keyframe)),
             **sampling_cost(ok, config, draws=draws, seed=seed).as_dict()}]
    for g in gops:
        moved = [replace(r, keyframes=list(range(0, r.num_frames, g))) for r in ok]
        rows.append({"set": f"--gop {g}", "gop": float(g),
                     **sampling_cost(moved, config, draws=draws, seed=seed).as_dict()})
    return {"videos": usable, "sampled": len(ok),
            "frames": float(np.median(frames)), "gop": rows[0]["gop"], "rows": rows}
