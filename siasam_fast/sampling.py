"""Siamese sampling (SiaSamRea, NeurIPS 2021, section 3.2): which frames each clip of a video reads.

One pure function, :func:`sample_siamese_clips`, turns (number of frames, config, rng) into the
anchor clip and its siamese clips as frame indices [N, B]; every pipeline (PyAV, DALI, the
benchmarks) calls it, so the index math exists once. It also returns the sorted unique frame set U
and the map from every clip frame into U: siamese clips overlap heavily, so each frame is decoded
and encoded once and then gathered per clip.

Rules (DESIGN section 2):
- the anchor start ``a`` is uniform over the first third of the video (``a < T / 3``), clamped so
  that the whole group fits;
- siamese starts are consecutive steps of ``start_spacing`` (d) next to the anchor: a+d, a-d, a+2d,
  a-2d, ... (``pace="both"``) or a+d, a+2d, ... (``pace="after"``). Near either end of the video the
  window of starts slides inward instead of clamping clips onto each other, so starts stay distinct
  and consecutive;
- every clip takes B frames with the same stride s;
- a video too short for the group follows ``short_video``: "shrink_stride" (largest stride that
  fits, then the spacing, then padding), "pad" (repeat the last frame) or "skip"; the reason is
  recorded.

``placement="sparse"`` replaces the siamese group by ClipBERT's sparse sampling (the paper's
Figure 1 (b)), for a ClipBERT baseline and for the ablation "the same reasoning over independent
clips": each of the N clips starts anywhere its B frames fit, drawn independently and uniformly
(clip 0 is the anchor; no first-third rule, spacing or pace). B, the stride and ``short_video``
apply to one clip. ClipBERT's clip of ``num_frm`` frames at ``fps`` spans num_frm x (video fps) /
fps frames, its frames spread over that span: at 30 fps, MSRVTT-QA's 2 frames at 2 fps are 29
frames apart (``stride: 29``, ``frames_per_clip: 2``, ``num_clips: 8``).

Keyframe-aware options (issue 7: fast random access). A decoder that seeks to the keyframe at or
before the group's first frame decodes and throws away every frame from that keyframe up to the
first frame the clips read (the *pre-roll*, ``r``); with keyframes seconds apart that is most of the
decoding. Two options, both off by default, bias where the group lands; they only ever move the
group earlier or reweight the anchor draw, so the rules above keep holding (anchor in the first
third whenever a group fits there, consecutive starts, one stride, same N, B and short-video
handling). They read the video's keyframes (``keyframes=record.keyframes``); without keyframes they
do nothing and the result is exactly that of the options off (same draws from the same rng).

- ``preroll_temperature`` (tau, frames; None = off): the anchor is drawn from the same feasible
  starts as the uniform draw, with probability proportional to ``exp(-r / tau)``, ``r`` the
  pre-roll of the group that anchor produces (left after the shift below, when both are on).
  tau = inf is the paper's uniform draw; tau = 0 draws uniformly among the anchors of least
  pre-roll (groups that start on a keyframe, when any feasible group can); in between every
  feasible anchor keeps a probability at least ``exp(-r_max / tau)`` times the likeliest one's,
  ``r_max`` the largest pre-roll of a feasible group. With a keyframe every ``gop`` frames and one
  at or before frame 0 (a segment passes the keyframe before it as a negative index),
  ``r_max <= gop - 1``: e.g. gop 32 and tau 16, a group starting on a keyframe is at most
  e^(31/16) ~ 6.9x likelier than one starting just before the next. Frames with no keyframe at or
  before them count their pre-roll from frame 0, so when the first keyframe given is after frame
  0, ``r_max`` can reach its index - 1 and the floor is lower. ``r`` is the pre-roll of a decoder
  that seeks to that keyframe; the ``pyav`` backend decodes on from frame 0 rather than seek to a
  keyframe within its seek threshold (8 frames), so a group on a keyframe among the first 8 frames
  still decodes the frames before it (the planner's ``decode_cost`` counts them).
- ``keyframe_max_shift`` (M, frames; 0 = off): the anchor is drawn as without it, then the whole
  group moves back by ``min(r, M)`` frames, but never before frame 0, so its pre-roll becomes
  ``r`` minus the shift: groups starting within M frames after a keyframe snap onto it, all others
  move M frames earlier (or to frame 0). In distribution: each keyframe-aligned group start gains
  the probability of the M starts after it, and the M starts just before each keyframe lose
  theirs (as do the last M anchors of the first third, which no later anchor moves onto). With
  M >= ``r_max`` (gop - 1 for a keyframe every gop frames) every group starts on a keyframe, except
  groups whose keyframe lies before frame 0 (a segment that starts mid-GOP) or that have no
  keyframe at or before them: those stop at frame 0, a keyframe only if one is there.

:func:`anchor_distribution` returns the exact distribution of the anchor start for a video, with or
without the options (for ablation reports); ``siasam_fast.pipeline.planner`` models the frames the
decoder decodes for a frame set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

PACES = ("both", "after")
PLACEMENTS = ("siamese", "sparse")
SHORT_VIDEO_POLICIES = ("shrink_stride", "pad", "skip")
EVAL_PLACEMENTS = ("middle", "uniform", "clipbert")


@dataclass(frozen=True)
class SamplingConfig:
    """How clips are drawn from one video. Field names follow the paper (N, B, stride)."""

    num_clips: int = 9  # N: the anchor plus N-1 siamese clips
    frames_per_clip: int | tuple[int, int] = 8  # B, or (lo, hi): the largest B in range that fits
    stride: int = 4  # s, frames between two sampled frames of a clip (same for every clip)
    start_spacing: int = 1  # d, frames between consecutive clip starts
    pace: str = "both"  # "both": a+d, a-d, a+2d, ...; "after": a+d, a+2d, ...
    short_video: str = "shrink_stride"  # "shrink_stride" | "pad" | "skip"
    min_frames: int = 1  # videos shorter than this are skipped (the paper skips < 40 frames)
    # Training clips: "siamese" (the paper's, above) or "sparse": N clips whose starts are drawn
    # independently and uniformly over the whole video (ClipBERT's random training clips, the
    # paper's Figure 1 (b)); start_spacing, pace and the first-third rule do not apply there
    placement: str = "siamese"  # "siamese" | "sparse"
    eval_placement: str = "middle"  # "middle" | "uniform" | "clipbert"
    eval_clips: int = 1  # clips per video at evaluation (1 = anchor only, as in the paper)
    anchor_copies: bool = False  # ablation: N copies of the anchor instead of siamese clips
    # Keyframe-aware options (module docstring), off by default; they need the video's keyframes.
    preroll_temperature: float | None = None  # tau: P(anchor) ~ exp(-pre-roll / tau); None: off
    keyframe_max_shift: int = 0  # M: move the group back <= M frames toward a keyframe; 0: off

    def __post_init__(self) -> None:
        fpc = self.frames_per_clip
        if isinstance(fpc, (list, tuple)):
            if len(fpc) != 2 or not all(
                isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in fpc
            ):
                raise ValueError(
                    f"frames_per_clip={fpc!r}: give one integer B or a range [lo, hi] "
                    "of two integers"
                )
            lo, hi = int(fpc[0]), int(fpc[1])
            if not 1 <= lo <= hi:
                raise ValueError(f"frames_per_clip={fpc!r}: the range needs 1 <= lo <= hi")
            object.__setattr__(self, "frames_per_clip", (lo, hi))
        elif isinstance(fpc, bool) or not isinstance(fpc, (int, np.integer)) or fpc < 1:
            raise ValueError(
                f"frames_per_clip={fpc!r}: must be an integer >= 1 or a range [lo, hi]"
            )
        for name in ("num_clips", "stride", "start_spacing", "min_frames", "eval_clips"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if not isinstance(self.anchor_copies, (bool, np.bool_)):
            raise ValueError(f"anchor_copies={self.anchor_copies!r}: expected true or false")
        _check_choice("pace", self.pace, PACES)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("short_video", self.short_video, SHORT_VIDEO_POLICIES)
        _check_choice("eval_placement", self.eval_placement, EVAL_PLACEMENTS)
        tau = self.preroll_temperature
        if tau is not None:
            if (
                isinstance(tau, bool)
                or not isinstance(tau, (int, float, np.integer, np.floating))
                or math.isnan(tau)
                or tau < 0
            ):
                raise ValueError(
                    f"preroll_temperature={tau!r}: must be None (off) or a number of frames >= 0 "
                    "(0: always the least pre-roll; larger: closer to uniform; inf: uniform)"
                )
            object.__setattr__(self, "preroll_temperature", float(tau))
        shift = self.keyframe_max_shift
        if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)) or shift < 0:
            raise ValueError(
                f"keyframe_max_shift={shift!r}: must be an integer number of frames >= 0 (0: off)"
            )
        if self.placement == "sparse" and self.keyframe_aware:
            raise ValueError(
                "placement='sparse' draws each clip anywhere in the video; the keyframe-aware "
                "options (preroll_temperature, keyframe_max_shift) move a siamese group and "
                "apply to placement='siamese' only: leave them off with sparse clips"
            )

    @classmethod
    def from_dict(cls, values: dict) -> SamplingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)

    @property
    def frames_range(self) -> tuple[int, int]:
        fpc = self.frames_per_clip
        return fpc if isinstance(fpc, tuple) else (fpc, fpc)

    @property
    def max_frames_per_clip(self) -> int:
        return self.frames_range[1]

    @property
    def keyframe_aware(self) -> bool:
        """Whether a keyframe-aware option is on (then the sampler reads ``keyframes``)."""
        return self.preroll_temperature is not None or self.keyframe_max_shift > 0


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r}: valid values are {', '.join(valid)}")


@dataclass
class ClipIndices:
    """The frames of one video's clips. ``clips[0]`` is the anchor clip.

    ``unique`` is sorted and holds every frame of ``clips`` once; ``unique[inverse] == clips``.
    ``skipped`` videos have empty arrays and ``reason`` says why; ``reason`` is also set (and
    ``skipped`` false) when a short-video policy changed the request.
    """

    clips: np.ndarray  # [N, B] int64 frame indices
    unique: np.ndarray  # [U] int64, sorted, unique
    inverse: np.ndarray  # [N, B] int64 positions into unique
    anchor_start: int = 0
    stride: int = 1
    start_spacing: int = 1
    frames_per_clip: int = 0
    skipped: bool = False
    reason: str = ""
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [N]
    keyframe_shift: int = 0  # frames the group moved back toward a keyframe (keyframe_max_shift)

    @property
    def num_clips(self) -> int:
        return int(self.clips.shape[0])


def clip_span(frames_per_clip: int, stride: int) -> int:
    """Frames covered by one clip from its first to its last sampled frame."""
    return (frames_per_clip - 1) * stride + 1


def group_span(num_clips: int, frames_per_clip: int, stride: int, start_spacing: int) -> int:
    """Frames covered by the anchor and its siamese clips together."""
    return clip_span(frames_per_clip, stride) + (num_clips - 1) * start_spacing


def _skipped(reason: str) -> ClipIndices:
    empty = np.zeros((0, 0), np.int64)
    return ClipIndices(empty, np.zeros(0, np.int64), empty, skipped=True, reason=reason)


def _frame_count(num_frames) -> int:
    """``num_frames`` as an int, or a ValueError naming it (a float is not silently truncated)."""
    if (
        isinstance(num_frames, bool)
        or not isinstance(num_frames, (int, np.integer))
        or num_frames < 0
    ):
        raise ValueError(
            f"num_frames={num_frames!r}: must be an integer >= 0 (the frames of the video or "
            "segment; 0 gives a skipped result)"
        )
    return int(num_frames)


def _finish(starts: np.ndarray, B: int, s: int, d: int, T: int, reason: str) -> ClipIndices:
    # Only "pad" ever reaches past the end: such frames (and clip starts) repeat the last frame,
    # so ``starts`` stays equal to ``clips[:, 0]`` and inside the video.
    starts = np.minimum(starts, T - 1)
    clips = starts[:, None] + s * np.arange(B, dtype=np.int64)[None, :]
    clips = np.minimum(clips, T - 1)
    unique, inverse = np.unique(clips, return_inverse=True)
    return ClipIndices(
        clips=clips,
        unique=unique.astype(np.int64),
        inverse=inverse.reshape(clips.shape).astype(np.int64),
        anchor_start=int(starts[0]),
        stride=s,
        start_spacing=d,
        frames_per_clip=B,
        reason=reason,
        starts=starts,
    )


def _offset_window(N: int, pace: str, before, after) -> tuple:
    """Contiguous offsets [lo, lo + N - 1] (in units of d) around the anchor (offset 0).

    ``before`` / ``after`` are how many steps fit before / after the anchor; the preferred window
    (centred for "both", all after for "after") slides inward when it would leave the video.
    Works on arrays of anchors too (``before`` / ``after`` arrays).
    """
    lo = -((N - 1) // 2) if pace == "both" else 0
    lo = np.maximum(lo, -np.asarray(before))
    lo = np.where(lo + N - 1 > after, np.asarray(after) - (N - 1), lo)
    return lo, lo + N - 1


def _siamese_order(lo: int, hi: int) -> np.ndarray:
    """Anchor first, then a+d, a-d, a+2d, a-2d, ...: nearest first, after before before."""
    ks = [k for k in range(lo, hi + 1) if k != 0]
    ks.sort(key=lambda k: (abs(k), -k))
    return np.array([0, *ks], dtype=np.int64)


def _choose_frames_per_clip(T: int, cfg: SamplingConfig, N: int) -> int:
    lo, hi = cfg.frames_range
    for b in range(hi, lo - 1, -1):
        if group_span(N, b, cfg.stride, cfg.start_spacing) <= T:
            return b
    return lo


def _fit_short(T: int, N: int, B: int, cfg: SamplingConfig) -> tuple[int, int, bool, str] | None:
    """(stride, spacing, pad, reason) for a video shorter than the group, or None to skip."""
    s, d = cfg.stride, cfg.start_spacing
    need = group_span(N, B, s, d)
    what = f"video has {T} frames, {_group_text(N, B)} needs {need}"
    if cfg.short_video == "skip":
        return None
    if cfg.short_video == "pad":
        return s, d, True, f"padded with the last frame: {what}"
    # shrink_stride: the largest stride that fits, then the largest spacing, then pad.
    for s2 in range(s - 1, 0, -1):
        if group_span(N, B, s2, d) <= T:
            return s2, d, False, f"stride shrunk from {s} to {s2}: {what}"
    for d2 in range(d - 1, 0, -1):
        if group_span(N, B, 1, d2) <= T:
            return 1, d2, False, f"stride shrunk from {s} to 1 and spacing from {d} to {d2}: {what}"
    shrunk = [f"stride shrunk from {s} to 1"] if s > 1 else []
    if d > 1 and N > 1:  # (one clip has no spacing)
        shrunk.append(f"spacing from {d} to 1")
    return 1, 1, True, ", ".join([*shrunk, "padded with the last frame"]) + f": {what}"


def sample_siamese_clips(
    num_frames: int,
    config: SamplingConfig,
    rng: np.random.Generator,
    keyframes=None,
) -> ClipIndices:
    """Training clips of one video: the anchor clip and N-1 siamese clips (section 3.2).

    ``keyframes``: the video's keyframes as frame indices in the numbering of ``num_frames``
    (``VideoRecord.keyframes``; for a segment that starts at frame f, the keyframes minus f, where
    values below 0 are keyframes before the segment). Only the keyframe-aware options read them
    (module docstring); with the options off, or ``keyframes`` None or empty, the result is exactly
    that of the options off.

    ``num_frames`` must be an integer >= 0 (ValueError otherwise); 0 frames give a skipped result.
    """
    T = _frame_count(num_frames)
    cfg = config
    if cfg.placement == "sparse":
        return _sample_sparse(T, cfg, rng)
    plan = _plan(T, cfg)
    if isinstance(plan, ClipIndices):
        return plan  # skipped
    N, B, s, d, pad, reason = plan
    kf = _keyframe_array(keyframes) if cfg.keyframe_aware else None

    if pad:
        # Every start as early as possible; frames past the end repeat the last frame.
        a = 0
        lo, hi = 0, N - 1
    else:
        max_start = T - clip_span(B, s)  # last start at which a clip still fits
        candidates, note = _anchor_candidates(T, max_start, N, d)
        if candidates.size == 0:  # cannot happen when the group fits; a guard for future edits
            raise AssertionError(f"no feasible anchor start for T={T}, N={N}, B={B}, s={s}, d={d}")
        p = _anchor_probabilities(candidates, N, d, max_start, cfg, kf)
        a = int(rng.choice(candidates) if p is None else rng.choice(candidates, p=p))
        reason = "; ".join(r for r in (reason, note) if r)
        lo, hi = (int(x) for x in _offset_window(N, cfg.pace, a // d, (max_start - a) // d))
    offsets = _siamese_order(lo, hi)
    if cfg.anchor_copies:
        offsets = np.zeros(N, np.int64)  # ablation: the anchor clip N times
    starts = a + d * offsets
    shift = 0
    if kf is not None and cfg.keyframe_max_shift:
        first = int(starts.min())
        shift = int(_shift_amount(first, _keyframe_distance(kf, first), cfg.keyframe_max_shift))
    result = _finish(starts - shift, B, s, d, T, reason)
    result.keyframe_shift = shift
    return result


def _sample_sparse(T: int, cfg: SamplingConfig, rng: np.random.Generator) -> ClipIndices:
    """``placement="sparse"``: N clip starts drawn independently and uniformly over every start
    at which one clip fits (ClipBERT's random training clips); clip 0 is the anchor. B, the stride
    and the short-video policy are those of a one-clip group; ``start_spacing`` is 0 (none)."""
    plan = _plan(T, cfg, num_clips=1)
    if isinstance(plan, ClipIndices):
        return plan  # skipped
    _, B, s, _, pad, reason = plan
    N = cfg.num_clips
    if pad:  # the clip does not fit: it starts at frame 0 and repeats the last frame
        starts = np.zeros(N, np.int64)
    else:
        starts = rng.integers(0, T - clip_span(B, s) + 1, size=N).astype(np.int64)
    if cfg.anchor_copies:
        starts[:] = starts[0]  # ablation: the anchor clip N times
    return _finish(starts, B, s, 0, T, reason)


def anchor_distribution(
    num_frames: int, config: SamplingConfig, keyframes=None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact distribution of the training anchor start: (sorted starts, probabilities).

    What :func:`sample_siamese_clips` draws with the same arguments, keyframe-aware options
    included (after the shift of ``keyframe_max_shift``): only starts of nonzero probability;
    empty arrays for a skipped video.
    """
    T = _frame_count(num_frames)
    sparse = config.placement == "sparse"
    plan = _plan(T, config, num_clips=1 if sparse else None)
    if isinstance(plan, ClipIndices):
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    N, B, s, d, pad, _ = plan
    if pad:
        return np.zeros(1, np.int64), np.ones(1, np.float64)
    if sparse:  # uniform over every start at which the clip fits
        starts = np.arange(T - clip_span(B, s) + 1, dtype=np.int64)
        return starts, np.full(starts.size, 1.0 / starts.size)
    kf = _keyframe_array(keyframes) if config.keyframe_aware else None
    max_start = T - clip_span(B, s)
    candidates, _ = _anchor_candidates(T, max_start, N, d)
    p = _anchor_probabilities(candidates, N, d, max_start, config, kf)
    if p is None:
        p = np.full(candidates.size, 1.0 / candidates.size)
    anchors = candidates
    if kf is not None and config.keyframe_max_shift:
        first = _group_first(candidates, N, d, max_start, config)
        anchors = candidates - _shift_amount(
            first, _keyframe_distance(kf, first), config.keyframe_max_shift
        )
    starts, inverse = np.unique(anchors, return_inverse=True)
    p = np.bincount(inverse.reshape(-1), weights=p)
    keep = p > 0  # preroll_temperature=0 rules some anchors out
    return starts[keep].astype(np.int64), p[keep]


def _plan(
    T: int, cfg: SamplingConfig, num_clips: int | None = None
) -> tuple[int, int, int, int, bool, str] | ClipIndices:
    """(N, B, stride, spacing, pad, reason) for a T-frame video and a group of ``num_clips``
    clips (None: ``cfg.num_clips``), or the skipped result."""
    if T < 1:
        return _skipped(f"video has {T} frames")
    if T < cfg.min_frames:
        return _skipped(f"video has {T} frames, fewer than min_frames={cfg.min_frames}")
    N = cfg.num_clips if num_clips is None else num_clips
    B = _choose_frames_per_clip(T, cfg, N)
    s, d, pad, reason = cfg.stride, cfg.start_spacing, False, ""
    if group_span(N, B, s, d) > T:
        fitted = _fit_short(T, N, B, cfg)
        if fitted is None:
            need = group_span(N, B, s, d)
            return _skipped(
                f"video has {T} frames, {_group_text(N, B)} needs {need} (short_video='skip')"
            )
        s, d, pad, reason = fitted
    return N, B, s, d, pad, reason


def _group_text(N: int, B: int) -> str:
    return f"a clip of {B} frames" if N == 1 else f"the group of {N} clips x {B} frames"


def _anchor_candidates(T: int, max_start: int, N: int, d: int) -> tuple[np.ndarray, str]:
    """The starts the anchor is drawn from: those in the first third whose group fits (any start
    whose group fits when none does), and a note when the first third had none."""

    def feasible(starts: np.ndarray) -> np.ndarray:
        return starts[(starts // d + (max_start - starts) // d) >= N - 1]

    first_third = feasible(np.arange(min(math.ceil(T / 3), max_start + 1)))
    if first_third.size:
        return first_third, ""
    return feasible(np.arange(max_start + 1)), "no group fits with its anchor in the first third"


def _anchor_probabilities(
    candidates: np.ndarray,
    N: int,
    d: int,
    max_start: int,
    cfg: SamplingConfig,
    keyframes: np.ndarray | None,
) -> np.ndarray | None:
    """Probabilities of the anchor candidates under ``preroll_temperature``; None: uniform."""
    tau = cfg.preroll_temperature
    if tau is None or keyframes is None:
        return None
    first = _group_first(candidates, N, d, max_start, cfg)
    preroll = _keyframe_distance(keyframes, first)
    if cfg.keyframe_max_shift:  # weigh what is left after the shift
        preroll = preroll - _shift_amount(first, preroll, cfg.keyframe_max_shift)
    r = (preroll - preroll.min()).astype(np.float64)
    if tau == 0:
        weights = (r == 0).astype(np.float64)  # the greedy limit: least pre-roll only
    elif math.isinf(tau):
        weights = np.ones_like(r)
    else:
        weights = np.exp(-r / tau)
    return weights / weights.sum()


def _group_first(
    anchors: np.ndarray, N: int, d: int, max_start: int, cfg: SamplingConfig
) -> np.ndarray:
    """First frame of the group each anchor start produces (its earliest clip start)."""
    if cfg.anchor_copies:
        return anchors
    lo, _ = _offset_window(N, cfg.pace, anchors // d, (max_start - anchors) // d)
    return anchors + d * lo


def _keyframe_array(keyframes) -> np.ndarray | None:
    """Sorted unique keyframe indices, or None when there are none."""
    if keyframes is None:
        return None
    valid = "must be integer frame indices (VideoRecord.keyframes)"
    try:
        kf = np.asarray(keyframes)
    except ValueError:  # ragged nesting: numpy's message names neither the value nor the rule
        raise ValueError(f"keyframes={str(keyframes)[:80]}: {valid}") from None
    if kf.size == 0:
        return None
    if not np.issubdtype(kf.dtype, np.integer):
        raise ValueError(f"keyframes={kf.reshape(-1)[:8].tolist()}...: {valid}")
    return np.unique(kf.astype(np.int64).reshape(-1))


def _keyframe_distance(keyframes: np.ndarray, frames):
    """Frames from the keyframe at or before each frame up to it (the pre-roll of a decoder that
    seeks there); frames with no keyframe at or before them count from frame 0."""
    j = np.searchsorted(keyframes, frames, side="right") - 1
    before = np.where(j >= 0, keyframes[np.maximum(j, 0)], 0)
    return frames - before


def _shift_amount(first, preroll, max_shift: int):
    """How far ``keyframe_max_shift`` moves a group back: toward its keyframe, never before 0."""
    return np.minimum(np.minimum(preroll, max_shift), np.maximum(first, 0))


def sample_eval_clips(
    num_frames: int, config: SamplingConfig, num_clips: int | None = None
) -> ClipIndices:
    """Deterministic evaluation clips: E = ``num_clips`` clips (None: ``config.eval_clips``; an
    integer >= 1, else ValueError), one per equal segment of the video (segment lengths differ by
    at most one frame when E does not divide the frame count).

    Every clip of a video has the same B and, for "middle", the same stride, chosen as training
    chooses them for a one-clip group (``num_clips=1``) in a video as long as the shortest
    segment: B is the largest of ``frames_per_clip`` whose clip fits that segment at the training
    stride (its lower end if none does), then the stride shrinks to the largest that fits
    ("stride shrunk ..." in ``reason``). With E = 1 the segment is the whole video.

    - "middle": B frames with that stride, centred in the segment. A clip longer than its segment
      (stride already 1) reaches into the next one, or back into the previous one rather than
      past the end; only when the video itself is shorter than the clip do the last frames repeat
      the last frame ("padded with the last frame ..." in ``reason``). ``stride`` is the stride.
    - "uniform": B frames spread evenly over the segment; ``stride`` is 0 (no constant stride).
      A segment shorter than B gives repeated frames ("frames repeated ..." in ``reason``).
    - "clipbert": ClipBERT's placement, not per segment: clip i starts at ceil(i (T - span) / E)
      (:func:`_clipbert_eval_clips`; E = 1 reads the video's first frames), B fitted to the whole
      video, the stride never shrunk (a clip longer than the video repeats its last frame).

    Unlike training, evaluation ignores ``min_frames`` and ``short_video`` (no "skip", no "pad"
    policy): every evaluated example is scored, however short its video, so only a video with
    0 frames gives a skipped result. ``starts`` is ``clips[:, 0]``; ``start_spacing`` is 0.
    """
    T = _frame_count(num_frames)
    cfg = config
    E = cfg.eval_clips if num_clips is None else num_clips
    if isinstance(E, bool) or not isinstance(E, (int, np.integer)) or E < 1:
        raise ValueError(
            f"num_clips={num_clips!r}: must be an integer >= 1 (evaluation clips per video), "
            f"or None for config.eval_clips ({cfg.eval_clips})"
        )
    E = int(E)
    if T < 1:
        return _skipped(f"video has {T} frames")
    if cfg.eval_placement == "clipbert":
        return _clipbert_eval_clips(T, cfg, E)
    seg_lo = (np.arange(E, dtype=np.int64) * T) // E
    seg_hi = np.maximum((np.arange(1, E + 1, dtype=np.int64) * T) // E, seg_lo + 1)  # exclusive
    seg_len = seg_hi - seg_lo
    L = int(seg_len.min())  # the shortest segment decides B and the stride for every clip
    where = (
        f"the {T}-frame video" if E == 1
        else f"the shortest of {E} segments of the {T}-frame video ({L} frames)"
    )
    B = _choose_frames_per_clip(L, cfg, 1)
    reasons = []
    if cfg.eval_placement == "uniform":
        offsets = ((np.arange(B) + 0.5)[None, :] * seg_len[:, None] / B).astype(np.int64)
        clips = seg_lo[:, None] + offsets
        s_used = 0  # not a constant stride
        if B > L:
            reasons.append(f"frames repeated: {B} frames spread over {where}")
    else:
        s = cfg.stride
        while s > 1 and clip_span(B, s) > L:
            s -= 1
        if s != cfg.stride:
            reasons.append(f"stride shrunk from {cfg.stride} to {s} to fit {where}")
        span = clip_span(B, s)
        starts = seg_lo + np.maximum(0, (seg_len - span) // 2)
        starts = np.maximum(0, np.minimum(starts, T - span))  # not past the end while it fits
        if span > T:
            reasons.append(
                f"padded with the last frame: video has {T} frames, a clip of {B} frames at "
                f"stride {s} needs {span}"
            )
        s_used = s
        clips = starts[:, None] + s * np.arange(B, dtype=np.int64)[None, :]
    return _eval_result(clips, T, s_used, B, reasons)


def _clipbert_eval_clips(T: int, cfg: SamplingConfig, E: int) -> ClipIndices:
    """``eval_placement="clipbert"``: ClipBERT's multi-clip inference (its decoder's
    ``get_start_end_idx`` with ``clip_idx`` i of ``num_clips`` E): clip i starts at
    ceil(i * (T - span) / E), span = the clip's frames at the training stride, so E = 1 reads the
    video's first frames. B is the largest of ``frames_per_clip`` whose clip fits the video; the
    stride is kept, and a clip longer than the video repeats its last frame, as ClipBERT's does."""
    B = _choose_frames_per_clip(T, cfg, 1)
    s = cfg.stride
    span = clip_span(B, s)
    delta = max(T - span, 0)
    starts = -((-delta * np.arange(E, dtype=np.int64)) // E)  # ceil: the first frame at or after
    clips = starts[:, None] + s * np.arange(B, dtype=np.int64)[None, :]
    reasons = []
    if span > T:
        reasons.append(f"padded with the last frame: video has {T} frames, a clip of {B} frames "
                       f"at stride {s} needs {span}")
    return _eval_result(clips, T, s, B, reasons)


def _eval_result(clips: np.ndarray, T: int, stride: int, B: int, reasons: list) -> ClipIndices:
    clips = np.minimum(clips, T - 1)
    unique, inverse = np.unique(clips, return_inverse=True)
    return ClipIndices(
        clips=clips,
        unique=unique.astype(np.int64),
        inverse=inverse.reshape(clips.shape).astype(np.int64),
        anchor_start=int(clips[0, 0]),
        stride=stride,
        start_spacing=0,
        frames_per_clip=B,
        reason="; ".join(reasons),
        starts=clips[:, 0].copy(),
    )


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one example in one epoch: the same whatever the worker count or rank."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])
