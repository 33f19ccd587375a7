"""Synthetic VideoQA: small H.264 videos whose answers sit in part of the video.

The embedded default dataset of the demo, the tests and the benchmarks. :func:`generate` renders
``videos/video<N>.mp4`` and writes open-ended QA in the official MSRVTT-QA format
(``annotations/{train,val,test}_qa.json``), multiple-choice QA in the How2QA VALUE JSONL format
(``annotations/how2qa_{train,val,test}.jsonl``) and ``meta.json`` (the knobs, the splits and, per
video, where every object and event is, in frames). :func:`evidence_visibility` reads that ground
truth and says, for a :class:`~siasam_fast.sampling.SamplingConfig`, how often the evidence of a
question is on a frame of the middle eval clip, of a training anchor clip, and of the union of the
anchor and its siamese clips.

Design: what has to be true for SiaSamRea to beat the one-clip baseline here
-----------------------------------------------------------------------------
SiaSamRea (section 3.2) trains on an anchor clip plus N-1 siamese clips that start 1..4 frames
before or after it, and distils their similarity-weighted predictions (the soft label Q, eq. 5) into
the anchor; evaluation still sees one clip. Several clips carry more information than one only when
one clip can miss the evidence. With the default sampling (B=8 frames, stride 4, N=9, spacing 1) an
anchor reads 8 of the 29 frames it spans; the 9 clips together read every frame of a 37-frame
window. So the content mixes four kinds of evidence:

* persistent (questions ``color``, ``shape``): one big saturated object (6 colours x 4 shapes)
  drifts and bounces through the whole video. Any frame answers: eval = anchor = union. These are
  the controls, where siamese clips add nothing.
* stride-aliased (``flash``): a thick border blinks in a colour, on for 1 or 2 frames out of every
  ``flash_period`` = 4, for 16-32 frames. A stride-4 clip reads one phase only, so a clip that
  overlaps the blinking sees it on all of its frames there or on none; the siamese clips start at
  a-4..a+4 and so cover all four phases. This is the main case where the siamese clips see what the
  anchor misses.
* brief (``appear``): a white shape shows for 2-5 frames, often shorter than the stride, so one
  clip steps over it while nine clips with consecutive starts read every frame.
* windowed (``count``: 2-5 rings show together; ``direction``: a comet with a fading tail crosses
  the frame left/right/up/down): on screen for 12-32 frames, longer than the stride. A clip sees
  it when its span overlaps the window; the union only reaches 4 frames further on each side. The
  comet's tail makes the direction readable from any single frame, because the model mean-pools the
  frames of a clip (DESIGN section 2) and so cannot see their order.
  Known flaw, kept so that version 1 sets (and the demo's and ablation's measured numbers) stay
  reproducible: the rings are placed over the whole frame, so on the flash border's lit frames a
  ring can lie half under it. With the defaults at 64 px, 17 of 290 ``count`` questions whose eval
  clip reads the rings' window saw fewer whole rings than the answer on every frame it read (163
  of 2437 training anchors). The demo asks no ``count`` questions.

Timing: training anchors start in the first third of the video and the eval clip sits in the
middle, so every non-persistent event is placed inside ``event_range`` = 5%-70% of the video, where
both the training groups and the eval clip see it part of the time. Evidence no clip ever saw would
be pure label noise; evidence every clip sees would make the siamese clips redundant. Measured with
the defaults on 400 videos and 16 draws each (``python -m siasam_fast.data.synthetic``), evidence
on a frame of the eval clip / a training anchor / the union of the 9 clips: flash 0.32 / 0.31 /
0.86, appear 0.46 / 0.43 / 0.61, count 0.72 / 0.76 / 0.83, direction 0.81 / 0.83 / 0.87, color and
shape 1 everywhere; all questions 0.72 / 0.72 / 0.86. When the anchor misses a flash, the group
still sees it 79% of the time. For the baseline such an example is a label with no evidence in
its clip; for SiaSamRea the soft label Q is built from clips that saw the evidence. A single
well-placed clip still answers most questions, so the task can be learned from one clip and
evaluated on one clip.

Why a tiny CNN at 64 px can learn it, and why it is not trivial: big flat shapes in 6 saturated,
well-separated hues (the chroma survives yuv420p), on a dark, low-saturation textured background
that pans slowly, with per-frame grain (``noise``). Small coloured squares move around the whole
video (``num_distractors``), so "which colours are present" does not answer a colour question.
Objects are placed so that the brief white shape is not covered.

Answers are balanced by construction: within each split and question type, every answer occurs
equally often (to within one). The flash colour never equals the big object's colour and the white
shape never has the big object's shape, so the persistent object answers neither question. The
correct multiple-choice position is balanced too. Wrong choices are plausible: colours seen
elsewhere in the video first (for ``flash``, the big object's colour), then the rest of the answer
family. There are 18 open-ended answers: 6 colours, 4 shapes, "two".."five" and
left/right/up/down.

Every event is rendered in every video; ``question_types`` / ``mc_types`` only choose which
questions are written, so the other events stay on screen as distractors. Every random draw comes
from ``numpy.random.default_rng([seed, ...])``. Planning runs in the calling process; rendering and
encoding run in a process pool, one video per task, so the output does not depend on the worker
count. The same arguments give byte-identical ``meta.json``, annotations and videos (libx264 with
one thread and no macroblock-tree, on one FFmpeg build).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import numbers
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import numpy as np

from siasam_fast.paths import USAGE_ERRORS, file_in_the_way
from siasam_fast.pipeline.transcode import CRF_RANGE, check_gop
from siasam_fast.sampling import SamplingConfig, sample_eval_clips, sample_siamese_clips

GENERATOR_VERSION = 1

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 35, 35),
    "green": (40, 200, 50),
    "blue": (45, 80, 245),
    "yellow": (245, 225, 40),
    "cyan": (40, 220, 235),
    "magenta": (225, 45, 225),
}
WHITE = (250, 250, 250)
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = ("left", "right", "up", "down")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("color", "shape", "flash", "appear", "count", "direction")
# Which ground-truth entry of a video holds the evidence of each question type.
EVIDENCE_OF = {
    "color": "main",
    "shape": "main",
    "flash": "flash",
    "appear": "appear",
    "count": "count",
    "direction": "direction",
}
# MSRVTT-QA category ids: 0 what, 1 who, 2 how, 3 when, 4 where.
CATEGORY_NAMES = ("what", "who", "how", "when", "where")
CATEGORY_OF = {"color": 0, "shape": 0, "flash": 0, "appear": 0, "count": 2, "direction": 4}
SPLITS = ("train", "val", "test")

OPEN_TEMPLATES = {
    "color": ("what color is the big {shape}?", "what is the color of the large {shape}?"),
    "shape": (
        "what shape is the big {color} object?",
        "what is the shape of the large {color} thing?",
    ),
    "flash": ("what color does the border flash?", "what color is the blinking frame?"),
    "appear": ("what white shape appears for a moment?", "which white shape shows up briefly?"),
    "count": ("how many rings appear?", "how many rings show up together?"),
    "direction": ("which way does the comet move?", "in which direction does the comet fly?"),
}
MC_QUESTIONS = {
    "color": "What color is the big {shape}?",
    "shape": "What shape is the big {color} object?",
    "flash": "Which color does the border of the video flash?",
    "appear": "Which white shape appears for a moment?",
    "count": "How many rings appear together?",
    "direction": "Which way does the comet with the tail move?",
}
MC_CHOICES = {
    "color": "the {shape} is {answer}",
    "shape": "it is a {answer}",
    "flash": "the border flashes {answer}",
    "appear": "a white {answer} appears",
    "count": "{answer} rings appear",
    "direction": "the comet moves {answer}",
}
NUM_CHOICES = 4  # How2QA: one correct and three wrong answers
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                "veryslow", "placebo")


def _check_int(name: str, value) -> int:
    """``value`` as an int (numpy integers too); a float, a bool or a string is refused by name."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r}: give an integer")
    return int(value)


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; all recorded in meta.json. Frame counts are in frames."""

    size: int = 64  # frame height = width, even
    min_frames: int = 40
    max_frames: int = 160
    fps_choices: tuple[str, ...] = ("24", "25", "30000/1001", "30")
    question_types: tuple[str, ...] = QUESTION_TYPES  # open-ended questions written per video
    mc_types: tuple[str, ...] = QUESTION_TYPES  # multiple-choice questions written per video
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train, val, test
    event_range: tuple[float, float] = (0.05, 0.7)  # events lie in this part of the video
    flash_period: int = 4  # the border blinks every flash_period frames ...
    flash_on: tuple[int, int] = (1, 2)  # ... staying on this many frames (drawn per video)
    flash_window: tuple[int, int] = (16, 32)  # for this many frames
    appear_frames: tuple[int, int] = (2, 5)  # the white shape is on screen this long
    count_frames: tuple[int, int] = (12, 24)  # the rings are on screen this long
    count_range: tuple[int, int] = (2, 5)  # how many rings
    move_frames: tuple[int, int] = (16, 32)  # the comet crosses the frame in this many frames
    num_distractors: int = 4  # small coloured squares moving around the whole video
    noise: float = 6.0  # per-frame grain, standard deviation in 0..255 units
    texture: float = 1.0  # background texture contrast (0: flat grey)
    crf: int = 23  # libx264 quality (its default)
    preset: str = "veryfast"  # libx264 speed preset
    gop: int = 12  # keyframe interval

    def __post_init__(self) -> None:
        for name in ("fps_choices", "question_types", "mc_types", "split_fractions", "event_range",
                     "flash_on", "flash_window", "appear_frames", "count_frames", "count_range",
                     "move_frames"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"{name}={value!r}: give a list")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "fps_choices", tuple(str(f) for f in self.fps_choices))
        if not self.fps_choices:
            raise ValueError("fps_choices=[]: give one frame rate at least, e.g. ['30000/1001']")
        if self.preset not in X264_PRESETS:
            raise ValueError(f"preset={self.preset!r}: valid: {', '.join(X264_PRESETS)}")
        # Checked here, not by the encoder: libx264 fails (crf below -1, a gop not a number) or
        # silently changes the value (crf above 51, a gop below 1) once the old set is gone.
        lo, hi = CRF_RANGE
        if isinstance(self.crf, bool) or not isinstance(self.crf, (int, float)) or not (
            lo <= self.crf <= hi
        ):
            raise ValueError(
                f"crf={self.crf!r}: libx264's quality, a number in {lo}..{hi} (0 best, 23 its "
                "default)"
            )
        check_gop(self.gop)
        # Types first (the Python API; the command line parses them): a string or None would
        # fail in a comparison below with a bare TypeError, a float frame count be truncated.
        # numpy numbers become Python's (meta.json is JSON).
        for name in ("size", "min_frames", "max_frames", "flash_period", "num_distractors"):
            object.__setattr__(self, name, _check_int(name, getattr(self, name)))
        for name in ("noise", "texture"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(value)
            ):
                raise ValueError(f"{name}={value!r}: give a number >= 0")
            object.__setattr__(self, name, float(value))
        if not (isinstance(self.size, int) and 16 <= self.size <= 1024 and self.size % 2 == 0):
            raise ValueError(f"size={self.size!r}: must be an even integer in 16..1024")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(
                f"min_frames={self.min_frames}, max_frames={self.max_frames}: "
                "need 1 <= min_frames <= max_frames"
            )
        for fps in self.fps_choices:
            try:
                ok = Fraction(fps) > 0
            except (ValueError, ZeroDivisionError):
                ok = False
            if not ok:
                raise ValueError(f"fps_choices: {fps!r} is not a positive number like '30000/1001'")
        for name in ("question_types", "mc_types"):
            bad = [t for t in getattr(self, name) if t not in QUESTION_TYPES]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; valid: {', '.join(QUESTION_TYPES)}")
        if not self.question_types and not self.mc_types:
            raise ValueError("question_types and mc_types are both empty: no question to write")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) < 0 or fr[0] <= 0:
            raise ValueError(
                f"split_fractions={fr!r}: three fractions (train, val, test), train > 0"
            )
        lo, hi = self.event_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"event_range={self.event_range!r}: need 0 <= lo < hi <= 1")
        for name in ("flash_on", "flash_window", "appear_frames", "count_frames", "count_range",
                     "move_frames"):
            value = getattr(self, name)
            if len(value) != 2 or not all(isinstance(v, int) for v in value) or not (
                1 <= value[0] <= value[1]
            ):
                raise ValueError(f"{name}={value!r}: need two integers 1 <= lo <= hi")
        if self.flash_period < 2 or self.flash_on[1] >= self.flash_period:
            raise ValueError(
                f"flash_period={self.flash_period}, flash_on={self.flash_on}: need a period >= 2 "
                "and fewer frames on than the period"
            )
        if not (2 <= self.count_range[0] and self.count_range[1] <= 9):
            raise ValueError(f"count_range={self.count_range!r}: counts must lie in 2..9")
        if "count" in self.mc_types and self.count_range[1] - self.count_range[0] + 1 < NUM_CHOICES:
            raise ValueError(
                f"count_range={self.count_range!r}: multiple-choice count questions need "
                f"{NUM_CHOICES} counts at least (or leave 'count' out of mc_types)"
            )
        if self.num_distractors < 0 or self.noise < 0 or self.texture < 0:
            raise ValueError("num_distractors, noise and texture must be >= 0")

    @classmethod
    def from_dict(cls, values: dict) -> SynthConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown synthetic option(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)

    def answers(self, question_type: str) -> tuple[str, ...]:
        """The possible answers of one question type."""
        if question_type in ("color", "flash"):
            return tuple(COLORS)
        if question_type in ("shape", "appear"):
            return SHAPES
        if question_type == "count":
            lo, hi = self.count_range
            return tuple(NUMBER_WORDS[k] for k in range(lo, hi + 1))
        if question_type == "direction":
            return DIRECTIONS
        raise ValueError(f"question_type={question_type!r}: valid: {', '.join(QUESTION_TYPES)}")


# ---------------------------------------------------------------------------------------------
# Planning: every random choice of the dataset, made in the calling process.


def _split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    total = sum(fractions)
    n_val = round(n * fractions[1] / total)
    n_test = round(n * fractions[2] / total)
    # Every requested split gets a video as soon as there are enough videos for it.
    if fractions[1] > 0 and n >= 3:
        n_val = max(n_val, 1)
    if fractions[2] > 0 and n >= 2:
        n_test = max(n_test, 1)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"num_videos={n} is too few for split_fractions={fractions}")
    return [n_train, n_val, n_test]


def _balanced(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """n draws of 0..k-1 in which every value occurs n // k or n // k + 1 times."""
    return rng.permutation(np.resize(rng.permutation(k), n))


def _balanced_distinct(rng: np.random.Generator, k: int, avoid: np.ndarray) -> np.ndarray:
    """Balanced draws of 0..k-1 with value i != avoid[i], repaired by swaps (balance kept)."""
    n = len(avoid)
    out = _balanced(rng, k, n)
    for i in range(n):
        if out[i] != avoid[i]:
            continue
        for j in rng.permutation(n):
            if out[j] != avoid[i] and out[i] != avoid[j]:
                out[i], out[j] = out[j], out[i]
                break
        else:  # nobody to swap with (tiny splits): give up one unit of balance
            out[i] = (avoid[i] + 1 + rng.integers(k - 1)) % k
    return out


def _window(rng: np.random.Generator, T: int, length: tuple[int, int], where: tuple[float, float]):
    """[start, stop) of an event lasting ``length`` frames inside the ``where`` part of a video."""
    w = min(int(rng.integers(length[0], length[1] + 1)), T)
    lo = int(math.floor(where[0] * T))
    hi = int(math.ceil(where[1] * T))
    last = hi - w
    start = int(rng.integers(lo, last + 1)) if last >= lo else max(0, min(lo, T - w))
    return start, start + w


def _intervals(mask: np.ndarray) -> list[list[int]]:
    """Runs of True as [start, stop) pairs."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [[int(a), int(b)] for a, b in zip(edges[0::2], edges[1::2])]


def _distance_to_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    f = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.hypot(*(points - (a + f[:, None] * ab)).T)


def _r(x: float) -> float:
    return round(float(x), 3)


def _plan_video(index: int, split: str, seed: int, cfg: SynthConfig, attrs: dict) -> dict:
    """The full description of one video: what to draw where, questions and evidence."""
    rng = np.random.default_rng([seed, 1, index])
    S = cfg.size
    unit = S / 64.0  # geometry is designed at 64 px and scaled
    T = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    fps = cfg.fps_choices[int(rng.integers(len(cfg.fps_choices)))]
    colors = list(COLORS)

    big = max(6, round(0.30 * S))
    speed = rng.uniform(0.4, 1.0) * unit
    angle = rng.uniform(0, 2 * math.pi)
    main = {
        "shape": SHAPES[attrs["main_shape"]],
        "color": colors[attrs["main_color"]],
        "size": big,
        "pos0": [_r(rng.uniform(0, S - big)), _r(rng.uniform(0, S - big))],
        "vel": [_r(speed * math.cos(angle)), _r(speed * math.sin(angle))],
        "frames": [[0, T]],
    }
    small = max(2, round(0.08 * S))
    distractors = []
    for _ in range(cfg.num_distractors):
        sp = rng.uniform(0.5, 1.5) * unit
        an = rng.uniform(0, 2 * math.pi)
        distractors.append({
            "color": colors[int(rng.integers(len(colors)))],
            "size": small,
            "pos0": [_r(rng.uniform(0, S - small)), _r(rng.uniform(0, S - small))],
            "vel": [_r(sp * math.cos(an)), _r(sp * math.sin(an))],
        })
    background = {
        "seed": int(rng.integers(2**31)),
        "pan_vel": [_r(rng.uniform(-0.3, 0.3) * unit), _r(rng.uniform(-0.3, 0.3) * unit)],
        "texture": cfg.texture,
        "noise": cfg.noise,
    }

    where = cfg.event_range
    # Flash: a border blinking with a fixed period (aliases with the stride of one clip).
    f0, f1 = _window(rng, T, cfg.flash_window, where)
    on = int(rng.integers(cfg.flash_on[0], cfg.flash_on[1] + 1))
    t = np.arange(T)
    lit = (t >= f0) & (t < f1) & (((t - f0) % cfg.flash_period) < on)
    flash = {
        "color": colors[attrs["flash_color"]],
        "window": [f0, f1],
        "period": cfg.flash_period,
        "on": on,
        "thickness": max(2, 2 * round(0.04 * S)),  # even: aligned with the 2x2 chroma blocks
        "frames": _intervals(lit),
    }

    # Direction: a comet (head + fading tail behind it) crossing part of the frame.
    m0, m1 = _window(rng, T, cfg.move_frames, where)
    direction = DIRECTIONS[attrs["direction"]]
    head = max(3, round(0.11 * S))
    dist = rng.uniform(0.45, 0.65) * S
    along0 = rng.uniform(0, S - head - dist)
    across = rng.uniform(0.1 * S, 0.9 * S - head)
    p_from, p_to = along0, along0 + dist
    if direction in ("left", "up"):
        p_from, p_to = p_to, p_from
    if direction in ("left", "right"):
        start, end = [p_from, across], [p_to, across]
    else:
        start, end = [across, p_from], [across, p_to]
    comet = {
        "direction": direction,
        "color": colors[int(rng.integers(len(colors)))],
        "size": head,
        "tail_spacing": max(1, round(0.06 * S)),
        "start": [_r(v) for v in start],
        "end": [_r(v) for v in end],
        "frames": [[m0, m1]],
    }
    ux, uy = np.subtract(end, start) / max(1e-9, math.dist(start, end))

    # Appear: a white shape for a few frames, inside the flash border and as far as possible from
    # the big object and from the comet's path, so that nothing covers this brief evidence.
    a0, a1 = _window(rng, T, cfg.appear_frames, where)
    vsize = max(6, round(0.28 * S))
    inset = flash["thickness"]
    centres = rng.uniform(inset, S - vsize - inset, size=(8, 2)) + vsize / 2
    mx, my = _main_position(main, S, (a0 + a1 - 1) / 2)
    clearance = np.hypot(centres[:, 0] - mx - big / 2, centres[:, 1] - my - big / 2)
    if a0 < m1 and m0 < a1:  # the comet is on screen meanwhile: keep off its path and tail
        path = np.array([start, end]) + head / 2
        tail = comet["tail_spacing"] * 4 * np.array([ux, uy])
        clearance = np.minimum(clearance, _distance_to_segment(centres, path[0] - tail, path[1]))
    best = int(np.argmax(clearance))
    appear = {
        "shape": SHAPES[attrs["appear_shape"]],
        "color": "white",
        "size": vsize,
        "pos": [_r(centres[best, 0] - vsize / 2), _r(centres[best, 1] - vsize / 2)],
        "frames": [[a0, a1]],
    }

    # Count: k rings together, one per cell of a 3x3 grid so they never overlap.
    c0, c1 = _window(rng, T, cfg.count_frames, where)
    k = attrs["count"]
    rsize = max(5, round(0.17 * S))
    cell = S / 3
    slack = max(0.0, cell - rsize)
    positions = []
    for c in rng.permutation(9)[:k]:
        cx, cy = int(c) % 3, int(c) // 3
        jitter = rng.uniform(0, slack, size=2)
        positions.append([_r(cx * cell + jitter[0]), _r(cy * cell + jitter[1])])
    count = {
        "count": k,
        "color": colors[int(rng.integers(len(colors)))],
        "size": rsize,
        "positions": positions,
        "frames": [[c0, c1]],
    }

    events = {"flash": flash, "appear": appear, "count": count, "direction": comet}
    answers = {
        "color": main["color"],
        "shape": main["shape"],
        "flash": flash["color"],
        "appear": appear["shape"],
        "count": NUMBER_WORDS[k],
        "direction": direction,
    }
    present = [main["color"], flash["color"], count["color"], comet["color"]]
    present += [d["color"] for d in distractors]
    questions = {}
    for qtype in QUESTION_TYPES:
        family = cfg.answers(qtype)
        template = OPEN_TEMPLATES[qtype][int(rng.integers(len(OPEN_TEMPLATES[qtype])))]
        q = {
            "answer": answers[qtype],
            "open_question": template.format(shape=main["shape"], color=main["color"]),
            "mc_question": MC_QUESTIONS[qtype].format(shape=main["shape"], color=main["color"]),
        }
        # Wrong choices: plausible first (colours seen elsewhere in the video), then the family.
        if qtype in ("color", "flash"):
            seen = [c for c in dict.fromkeys(present) if c != answers[qtype]]
            if qtype == "flash":
                seen = [main["color"]] + [c for c in seen if c != main["color"]]
            else:
                seen = list(rng.permutation(seen))
            rest = [c for c in rng.permutation(family) if c not in seen and c != answers[qtype]]
            wrong = (seen + rest)[: NUM_CHOICES - 1]
        else:
            others = [a for a in family if a != answers[qtype]]
            wrong = [str(a) for a in rng.permutation(others)[: NUM_CHOICES - 1]]
        choices = [str(w) for w in rng.permutation(wrong)]
        pos = min(attrs["mc_pos"][qtype], len(choices))
        choices.insert(pos, answers[qtype])
        q["mc_choices"] = [
            MC_CHOICES[qtype].format(answer=c, shape=main["shape"]) for c in choices
        ]
        q["mc_answer_idx"] = pos
        questions[qtype] = q

    return {
        "video_id": f"video{index}",
        "index": index,
        "split": split,
        "num_frames": T,
        "fps": fps,
        "duration": _r(T / Fraction(fps)),
        "size": S,
        "main": main,
        "distractors": distractors,
        "background": background,
        "events": events,
        "questions": questions,
    }


def plan(num_videos: int, seed: int, config: SynthConfig) -> list[dict]:
    """Every video's description (ground truth included), in video order; no rendering."""
    if _check_int("num_videos", num_videos) < 1:
        raise ValueError(f"num_videos={num_videos!r}: must be >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be an integer >= 0")
    rng = np.random.default_rng([seed, 0])
    order = rng.permutation(num_videos)
    counts = _split_counts(num_videos, config.split_fractions)
    split_of: dict[int, str] = {}
    attrs_of: dict[int, dict] = {}
    begin = 0
    for split, n in zip(SPLITS, counts):
        members = np.sort(order[begin : begin + n])
        begin += n
        if n == 0:
            continue
        main_color = _balanced(rng, len(COLORS), n)
        main_shape = _balanced(rng, len(SHAPES), n)
        flash_color = _balanced_distinct(rng, len(COLORS), main_color)
        appear_shape = _balanced_distinct(rng, len(SHAPES), main_shape)
        lo, hi = config.count_range
        count = lo + _balanced(rng, hi - lo + 1, n)
        direction = _balanced(rng, len(DIRECTIONS), n)
        mc_pos = {q: _balanced(rng, NUM_CHOICES, n) for q in QUESTION_TYPES}
        for j, idx in enumerate(members):
            split_of[int(idx)] = split
            attrs_of[int(idx)] = {
                "main_color": int(main_color[j]),
                "main_shape": int(main_shape[j]),
                "flash_color": int(flash_color[j]),
                "appear_shape": int(appear_shape[j]),
                "count": int(count[j]),
                "direction": int(direction[j]),
                "mc_pos": {q: int(mc_pos[q][j]) for q in QUESTION_TYPES},
            }
    return [_plan_video(i, split_of[i], seed, config, attrs_of[i]) for i in range(num_videos)]


# ---------------------------------------------------------------------------------------------
# Rendering: a pure function of one video's plan.


def _shape_mask(shape: str, n: int) -> np.ndarray:
    c = (n - 1) / 2
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    if shape == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= (n / 2) ** 2
    if shape == "square":
        h = 0.42 * n
        return (np.abs(x - c) <= h) & (np.abs(y - c) <= h)
    if shape == "triangle":
        return np.abs(x - c) <= (y + 0.5) / 2 + 0.25
    if shape == "cross":
        arm = n / 6
        return (np.abs(x - c) <= arm) | (np.abs(y - c) <= arm)
    if shape == "ring":
        r2 = (x - c) ** 2 + (y - c) ** 2
        thick = max(1.5, n / 6)
        return (r2 <= (n / 2) ** 2) & (r2 >= (n / 2 - thick) ** 2)
    raise ValueError(f"shape={shape!r}: valid: {', '.join(SHAPES)}, ring")


def _paste(frame: np.ndarray, mask: np.ndarray, color, x: float, y: float, alpha: float = 1.0):
    S = frame.shape[0]
    n = mask.shape[0]
    x0, y0 = int(round(x)), int(round(y))
    xa, ya = max(x0, 0), max(y0, 0)
    xb, yb = min(x0 + n, S), min(y0 + n, S)
    if xa >= xb or ya >= yb:
        return
    m = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
    region = frame[ya:yb, xa:xb]
    rgb = np.asarray(color, np.float32)
    if alpha >= 1.0:
        region[m] = rgb
    else:
        region[m] = region[m] * (1 - alpha) + rgb * alpha


def _bounce(x, lo: float, hi: float):
    """Position after travelling to x along a segment [lo, hi] with reflecting ends."""
    span = hi - lo
    if span <= 0:
        return np.full_like(np.asarray(x, np.float64), lo)
    y = np.mod(np.asarray(x, np.float64) - lo, 2 * span)
    return lo + np.where(y <= span, y, 2 * span - y)


def _main_position(obj: dict, S: int, t) -> tuple:
    hi = S - obj["size"]
    return (
        _bounce(obj["pos0"][0] + obj["vel"][0] * t, 0, hi),
        _bounce(obj["pos0"][1] + obj["vel"][1] * t, 0, hi),
    )


def _texture(seed: int, side: int, contrast: float) -> np.ndarray:
    """A smooth dark low-saturation texture [side, side, 3] (bilinear-upsampled noise)."""
    rng = np.random.default_rng(seed)
    g = 7
    base = rng.uniform(30, 90, size=(g, g, 1)) + rng.uniform(-10, 10, size=(g, g, 3))
    base = 60 + (base - 60) * contrast
    pos = np.linspace(0, g - 1, side)
    i0 = np.clip(np.floor(pos).astype(int), 0, g - 2)
    w = (pos - i0)[:, None]
    up = np.zeros((g, side))  # [g, side]: interpolation weights
    up[i0, np.arange(side)] += (1 - w[:, 0])
    up[i0 + 1, np.arange(side)] += w[:, 0]
    tex = np.einsum("ia,jb,ijc->abc", up, up, base)
    return tex.astype(np.float32)


def render_frames(video: dict) -> np.ndarray:
    """The RGB frames [T, S, S, 3] uint8 of one planned video (an entry of ``plan``/meta)."""
    S, T = video["size"], video["num_frames"]
    rng = np.random.default_rng(video["background"]["seed"])
    margin = S // 2
    tex = _texture(video["background"]["seed"], S + margin, video["background"]["texture"])
    noise = float(video["background"]["noise"])
    t = np.arange(T)
    pan_x = np.rint(_bounce(margin / 2 + video["background"]["pan_vel"][0] * t, 0, margin))
    pan_y = np.rint(_bounce(margin / 2 + video["background"]["pan_vel"][1] * t, 0, margin))

    main = video["main"]
    main_mask = _shape_mask(main["shape"], main["size"])
    mx, my = _main_position(main, S, t)
    dmasks = [_shape_mask("square", d["size"]) for d in video["distractors"]]
    dpos = [_main_position(d, S, t) for d in video["distractors"]]
    ev = video["events"]
    flash, appear, count, comet = ev["flash"], ev["appear"], ev["count"], ev["direction"]
    lit = np.zeros(T, bool)
    for a, b in flash["frames"]:
        lit[a:b] = True
    ring_mask = _shape_mask("ring", count["size"])
    appear_mask = _shape_mask(appear["shape"], appear["size"])
    head_mask = _shape_mask("circle", comet["size"])
    (a0, a1), (c0, c1), (m0, m1) = appear["frames"][0], count["frames"][0], comet["frames"][0]
    dx = comet["end"][0] - comet["start"][0]
    dy = comet["end"][1] - comet["start"][1]
    length = math.hypot(dx, dy) or 1.0
    ux, uy = dx / length, dy / length
    th = flash["thickness"]

    frames = np.empty((T, S, S, 3), np.uint8)
    for i in range(T):
        x0, y0 = int(pan_x[i]), int(pan_y[i])
        frame = tex[y0 : y0 + S, x0 : x0 + S].copy()
        for d, mask, (px, py) in zip(video["distractors"], dmasks, dpos):
            _paste(frame, mask, COLORS[d["color"]], px[i], py[i])
        _paste(frame, main_mask, COLORS[main["color"]], mx[i], my[i])
        if c0 <= i < c1:
            for px, py in count["positions"]:
                _paste(frame, ring_mask, COLORS[count["color"]], px, py)
        if a0 <= i < a1:
            _paste(frame, appear_mask, WHITE, *appear["pos"])
        if m0 <= i < m1:
            f = (i - m0) / max(1, m1 - m0 - 1)
            hx = comet["start"][0] + f * dx
            hy = comet["start"][1] + f * dy
            for k, alpha in ((4, 0.15), (3, 0.3), (2, 0.45), (1, 0.6)):  # tail, far to near
                back = k * comet["tail_spacing"]
                _paste(frame, head_mask, COLORS[comet["color"]], hx - ux * back, hy - uy * back,
                       alpha)
            _paste(frame, head_mask, COLORS[comet["color"]], hx, hy)
        if lit[i]:
            rgb = np.asarray(COLORS[flash["color"]], np.float32)
            frame[:th], frame[-th:], frame[:, :th], frame[:, -th:] = rgb, rgb, rgb, rgb
        if noise > 0:
            frame += rng.standard_normal(frame.shape, dtype=np.float32) * noise
        np.clip(frame, 0, 255, out=frame)
        frames[i] = np.rint(frame).astype(np.uint8)
    return frames


def _encode(frames: np.ndarray, path: Path, fps: str, crf: int, preset: str, gop: int) -> None:
    import av  # imported here so that planning and analysis work without PyAV

    tmp = path.with_name(path.name + ".tmp")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Same bytes run to run: one encoder thread, and no macroblock-tree rate control (at 64 px
        # libx264's mbtree gave a different bitstream on most runs for 8 of 10 videos tried).
        stream.options = {
            "crf": str(crf),
            "preset": preset,
            "g": str(gop),
            "threads": "1",
            "x264-params": "mbtree=0",
        }
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _render_job(job: tuple[dict, dict, str]) -> str:
    video, enc, path = job
    frames = render_frames(video)
    _encode(frames, Path(path), video["fps"], **enc)
    return video["video_id"]


# ---------------------------------------------------------------------------------------------
# Writing.


@dataclass
class SyntheticSet:
    """What :func:`generate` wrote. ``str()`` is a one-line summary; ``meta`` is meta.json."""

    root: Path
    num_videos: int
    num_open_ended: int
    num_multiple_choice: int
    seconds: float
    workers: int
    meta: dict = field(repr=False)

    def __str__(self) -> str:
        return (
            f"{self.num_videos} videos, {self.num_open_ended} open-ended + "
            f"{self.num_multiple_choice} multiple-choice questions in {self.root} "
            f"({self.seconds:.1f} s, {self.workers} worker(s))"
        )


def _annotations(videos: list[dict], cfg: SynthConfig) -> tuple[dict, dict]:
    """(MSRVTT-QA arrays, How2QA VALUE lines) per split; ids follow video order then type."""
    open_qa: dict[str, list] = {s: [] for s in SPLITS}
    mc_qa: dict[str, list] = {s: [] for s in SPLITS}
    next_id = 0
    for v in videos:
        for qtype in QUESTION_TYPES:
            q = v["questions"][qtype]
            if qtype in cfg.question_types:
                q["open_id"] = next_id
                open_qa[v["split"]].append({
                    "answer": q["answer"],
                    "category_id": CATEGORY_OF[qtype],
                    "id": next_id,
                    "question": q["open_question"],
                    "video_id": v["index"],
                })
                next_id += 1
            if qtype in cfg.mc_types:
                q["mc_qid"] = f"{v['video_id']}-{qtype}"
                line = {
                    "vid_name": v["video_id"],
                    "ts": f"0.00-{v['duration']:.2f}",
                    "qid": q["mc_qid"],
                    "q": q["mc_question"],
                }
                for j, choice in enumerate(q["mc_choices"]):
                    line[f"a{j}"] = choice
                line["answer_idx"] = q["mc_answer_idx"]
                mc_qa[v["split"]].append(line)
    return open_qa, mc_qa


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# How the generator marks a folder as its own: meta.json naming this generator (written last, once
# the set is complete), or, while a generation runs or after one was cut short, the in-progress
# file below (written first, removed once meta.json is written). Only such folders, empty ones and
# new ones are written into: a folder holding anything else is someone's files.
GENERATOR_NAME = "siasam_fast.data.synthetic"
IN_PROGRESS = ".synthetic-in-progress.json"


def _names_this_generator(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("generator") == GENERATOR_NAME


def is_synthetic_set(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by :func:`generate` (a complete set, or one whose
    generation is running or was cut short)."""
    folder = Path(folder)
    return _names_this_generator(folder / "meta.json") or _names_this_generator(
        folder / IN_PROGRESS)


def check_output_dir(out_dir: str | os.PathLike, what: str = "out_dir") -> None:
    """Raise unless :func:`generate` may write into ``out_dir``: a new folder, an empty one, or a
    synthetic set (which is then regenerated). ``what`` names the argument in the message."""
    path = Path(out_dir)
    blocker = file_in_the_way(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"is inside {str(blocker)!r}, a file"
        raise NotADirectoryError(
            f"{what} {str(out_dir)!r} {where}; give a folder (new, or one holding a synthetic "
            "set)")
    if path.is_dir() and any(path.iterdir()) and not is_synthetic_set(path):
        raise ValueError(
            f"{what} {str(out_dir)!r} is a folder holding other files, not a synthetic set (it "
            f"has no meta.json written by {GENERATOR_NAME}): refusing to write into it; give a "
            "new or empty folder, or one holding a synthetic set")


def generate(
    out_dir: str | os.PathLike,
    num_videos: int,
    seed: int = 0,
    size: int = 64,
    min_frames: int = 40,
    max_frames: int = 160,
    *,
    workers: int | None = None,
    progress: bool = True,
    **options,
) -> SyntheticSet:
    """Render ``num_videos`` videos and their QA annotations under ``out_dir``.

    ``options`` are further :class:`SynthConfig` fields (``noise``, ``flash_on``, ...). ``workers``:
    render processes (default: the CPU count; 0 or 1 renders in this process). Old ``video<N>.mp4``
    files beyond this dataset, and the partial ``*.tmp`` files a killed run left, are removed so
    the folder holds exactly one dataset.

    ``out_dir`` must be new, empty or a synthetic set (:func:`check_output_dir`): a folder holding
    anything else is refused (ValueError) before anything is written. While it runs, the folder
    holds ``.synthetic-in-progress.json`` instead of ``meta.json``, so a set cut short is never
    taken for a complete one and can be generated again.
    """
    cfg = SynthConfig.from_dict({"size": size, "min_frames": min_frames,
                                 "max_frames": max_frames, **options})
    started = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(out)
    videos = plan(num_videos, seed, cfg)  # (which checks both)
    open_qa, mc_qa = _annotations(videos, cfg)

    # Checked and planned: now the folder is written. meta.json goes first (it describes the old
    # videos, which are about to be replaced) and comes back last.
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / IN_PROGRESS, json.dumps({
        "generator": GENERATOR_NAME, "version": GENERATOR_VERSION,
        "note": "generation running or cut short; meta.json is written when it completes"}))
    (out / "meta.json").unlink(missing_ok=True)
    # The old set's annotations and manifest describe the videos about to be replaced: a
    # generation cut short must not leave them beside a mix of old and new videos (training on
    # them, or re-indexing as a decode failure suggests, would pair new videos with old labels).
    for split in SPLITS:
        (out / "annotations" / f"{split}_qa.json").unlink(missing_ok=True)
        (out / "annotations" / f"how2qa_{split}.jsonl").unlink(missing_ok=True)
    (out / "manifest.jsonl").unlink(missing_ok=True)
    (out / "videos").mkdir(exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)

    keep = {f"{v['video_id']}.mp4" for v in videos}
    for old in (out / "videos").glob("video*.mp4"):
        if old.name not in keep and old.name[5:-4].isdigit():
            old.unlink()
    # Partial files of a run killed between a write and its rename (_encode, _write_text).
    for old in (out / "videos").glob("video*.mp4.tmp"):
        if old.name[5:-8].isdigit():
            old.unlink()
    for name in ["meta.json", IN_PROGRESS, *(f"annotations/{s}_qa.json" for s in SPLITS),
                 *(f"annotations/how2qa_{s}.jsonl" for s in SPLITS)]:
        (out / f"{name}.tmp").unlink(missing_ok=True)

    enc = {"crf": cfg.crf, "preset": cfg.preset, "gop": cfg.gop}
    jobs = [(v, enc, str(out / "videos" / f"{v['video_id']}.mp4")) for v in videos]
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    workers = max(1, min(workers, len(jobs)))
    bar = _progress(len(jobs), progress)
    try:  # closed on an interrupt too: the caller's message then starts on a line of its own
        if workers == 1:
            for job in jobs:
                _render_job(job)
                bar.update()
        else:
            # fork on Linux: it works from any caller (stdin, notebooks, scripts without a
            # __main__ guard), and the workers only run numpy and libav (never torch / OpenMP /
            # CUDA), which are what make forking a threaded parent unsafe. spawn elsewhere (macOS,
            # Windows).
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            context = multiprocessing.get_context(method)
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                chunk = max(1, min(8, len(jobs) // (4 * workers)))
                for _ in pool.map(_render_job, jobs, chunksize=chunk):
                    bar.update()
    finally:
        bar.close()

    for split in SPLITS:
        _write_text(out / "annotations" / f"{split}_qa.json", json.dumps(open_qa[split]))
        _write_text(
            out / "annotations" / f"how2qa_{split}.jsonl",
            "".join(json.dumps(line) + "\n" for line in mc_qa[split]),
        )
    meta = _meta(videos, cfg, int(seed), open_qa, mc_qa)
    _write_text(out / "meta.json", json.dumps(meta, indent=1))
    (out / IN_PROGRESS).unlink(missing_ok=True)
    return SyntheticSet(
        root=out,
        num_videos=len(videos),
        num_open_ended=sum(len(x) for x in open_qa.values()),
        num_multiple_choice=sum(len(x) for x in mc_qa.values()),
        seconds=round(time.perf_counter() - started, 2),
        workers=workers,
        meta=meta,
    )


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; keep rendering possible without it anyway
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n: int = 1) -> None:
                pass

            def close(self) -> None:
                pass

        return _Null()
    return tqdm(total=total, desc="render videos", unit="video")


def _meta(videos, cfg: SynthConfig, seed: int, open_qa: dict, mc_qa: dict) -> dict:
    vocab = sorted({a for q in cfg.question_types for a in cfg.answers(q)})
    return {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "num_videos": len(videos),
        "params": asdict(cfg),
        "files": {
            "videos": "videos/video<N>.mp4",
            "open_ended": {s: f"annotations/{s}_qa.json" for s in SPLITS},
            "multiple_choice": {s: f"annotations/how2qa_{s}.jsonl" for s in SPLITS},
        },
        "question_types": {
            q: {
                "answers": list(cfg.answers(q)),
                "category_id": CATEGORY_OF[q],
                "evidence": EVIDENCE_OF[q],
            }
            for q in QUESTION_TYPES
        },
        "category_names": list(CATEGORY_NAMES),
        "answer_vocabulary": vocab,
        "splits": {s: [v["video_id"] for v in videos if v["split"] == s] for s in SPLITS},
        "num_questions": {
            "open_ended": {s: len(open_qa[s]) for s in SPLITS},
            "multiple_choice": {s: len(mc_qa[s]) for s in SPLITS},
        },
        "videos": {v["video_id"]: v for v in videos},
    }


# ---------------------------------------------------------------------------------------------
# Analysis: is the evidence on the frames a sampler reads?


def load_meta(source: str | os.PathLike | dict | SyntheticSet) -> dict:
    """meta.json as a dict: from a dict, a :class:`SyntheticSet`, the file or its folder."""
    if isinstance(source, SyntheticSet):
        return source.meta
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "meta.json"
    return json.loads(path.read_text(encoding="utf-8"))


def evidence_frames(video: dict, question_type: str) -> np.ndarray:
    """[T] bool: the frames of one video (an entry of meta["videos"]) that show the evidence of a
    question type."""
    key = EVIDENCE_OF[question_type]
    spans = video["main"]["frames"] if key == "main" else video["events"][key]["frames"]
    mask = np.zeros(video["num_frames"], bool)
    for a, b in spans:
        mask[a:b] = True
    return mask


def eval_clip_sees_evidence(
    meta: str | os.PathLike | dict | SyntheticSet, sampling: SamplingConfig | None = None
) -> dict[int, dict]:
    """Per open-ended question id: its type and whether the evaluation clip(s) of
    ``sample_eval_clips`` read a frame with its evidence ({"type": ..., "visible": bool}).

    The per-question form of the ``eval`` column of :func:`evidence_visibility`, for splitting a
    model's accuracy by what its one evaluation clip could see."""
    meta = load_meta(meta)
    cfg = sampling or SamplingConfig()
    out: dict[int, dict] = {}
    for video in meta["videos"].values():
        ev = sample_eval_clips(video["num_frames"], cfg)
        for qtype, q in video["questions"].items():
            if "open_id" not in q:
                continue
            seen = ev.clips.size > 0 and bool(evidence_frames(video, qtype)[ev.clips].any())
            out[int(q["open_id"])] = {"type": qtype, "split": video["split"], "visible": seen}
    return out


def evidence_visibility(
    meta: str | os.PathLike | dict | list[dict] | SyntheticSet,
    sampling: SamplingConfig | None = None,
    *,
    draws: int = 16,
    seed: int = 0,
    splits: Sequence[str] | None = None,
    question_types: Sequence[str] | None = None,
) -> dict:
    """How often a question's evidence lies on a frame each kind of clip reads.

    ``meta``: meta.json, its folder or dict, what :func:`generate` returned, or the video list of
    :func:`plan` (no rendering needed). Per question (one per video and question type):

    - ``eval``: whether the evaluation clip(s) of ``sample_eval_clips`` read an evidence frame;
    - ``anchor`` / ``union``: the fraction of ``draws`` training draws (``sample_siamese_clips``)
      whose anchor clip / union of all N clips reads one;
    - ``clip_mean``: the mean fraction of the N clips that read one (how informed Q is);
    - ``rescued``: among draws whose anchor misses the evidence, the fraction whose union reads it.

    Returns {"overall": {...}, "by_type": {type: {...}}, "sampling": {...}, "draws": draws}.
    """
    if isinstance(meta, list):
        videos, default_types = meta, QUESTION_TYPES
    else:
        meta = load_meta(meta)
        videos, default_types = list(meta["videos"].values()), meta["params"]["question_types"]
    cfg = sampling or SamplingConfig()
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
        raise ValueError(f"draws={draws!r}: must be an integer >= 1")
    wanted_splits = set(splits or SPLITS)
    qtypes = list(question_types or default_types)
    for name, given, valid in (("splits", wanted_splits, SPLITS),
                               ("question_types", qtypes, QUESTION_TYPES)):
        bad = sorted(set(given) - set(valid))
        if bad:
            raise ValueError(f"{name}: unknown {bad}; valid: {', '.join(valid)}")
    rows: dict[str, list[tuple[float, ...]]] = {q: [] for q in qtypes}
    missed: dict[str, list[float]] = {q: [] for q in qtypes}  # per anchor-miss draw: union saw it
    for video in videos:
        if video["split"] not in wanted_splits:
            continue
        T = video["num_frames"]
        ev = sample_eval_clips(T, cfg)
        draws_ = [
            sample_siamese_clips(T, cfg, np.random.default_rng([seed, d, video["index"]]))
            for d in range(draws)
        ]
        for qtype in qtypes:
            mask = evidence_frames(video, qtype)
            seen_eval = float(ev.clips.size > 0 and mask[ev.clips].any())
            anchor = union = clip_mean = 0.0
            for ci in draws_:
                if ci.skipped:
                    continue
                per_clip = mask[ci.clips].any(axis=1)
                anchor += float(per_clip[0])
                if not per_clip[0]:
                    missed[qtype].append(float(per_clip.any()))
                union += float(per_clip.any())
                clip_mean += float(per_clip.mean())
            rows[qtype].append((seen_eval, anchor / draws, union / draws, clip_mean / draws))

    def summary(values: list, misses: list) -> dict:
        arr = np.asarray(values).mean(axis=0) if values else np.zeros(4)
        return {
            "questions": len(values),
            "eval": round(float(arr[0]), 4),
            "anchor": round(float(arr[1]), 4),
            "union": round(float(arr[2]), 4),
            "clip_mean": round(float(arr[3]), 4),
            "rescued": round(float(np.mean(misses)), 4) if misses else 0.0,
        }

    return {
        "overall": summary(
            [r for q in qtypes for r in rows[q]], [m for q in qtypes for m in missed[q]]
        ),
        "by_type": {q: summary(rows[q], missed[q]) for q in qtypes},
        "sampling": asdict(cfg),
        "draws": draws,
    }


def format_visibility(report: dict) -> str:
    """A plain-text table of an :func:`evidence_visibility` report."""
    s = report["sampling"]
    lines = [
        f"evidence on a frame read by: the eval clip ({s['eval_placement']}), a training anchor, "
        f"the union of the {s['num_clips']} clips, the mean clip; rescued = union sees it when "
        f"the anchor misses  [B={s['frames_per_clip']}, stride={s['stride']}, "
        f"spacing={s['start_spacing']}, {report['draws']} draws]",
        f"{'question type':<14}{'questions':>10}{'eval':>8}{'anchor':>8}{'union':>8}{'clip':>8}"
        f"{'rescued':>9}",
    ]
    for name, row in [*report["by_type"].items(), ("all", report["overall"])]:
        lines.append(
            f"{name:<14}{row['questions']:>10}{row['eval']:>8.2f}{row['anchor']:>8.2f}"
            f"{row['union']:>8.2f}{row['clip_mean']:>8.2f}{row['rescued']:>9.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m siasam_fast.data.synthetic --out DIR``: generate, then print the analysis.

    Bad values end with one line naming them (exit status 2) before anything is written. Stopped
    midway (Ctrl-C, SIGTERM), it ends as ``siasam-fast synth`` does: one line, exit status 130."""
    import signal

    from siasam_fast.cli import INTERRUPTED, _interrupt, add_synth_options

    parser = argparse.ArgumentParser(prog="python -m siasam_fast.data.synthetic",
                                     description=__doc__.splitlines()[0])
    add_synth_options(parser, "videos/, annotations/ and meta.json")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop: the Ctrl-C path
    try:
        check_output_dir(args.out, "--out")
        result = generate(args.out, args.videos, args.seed, args.size, workers=args.workers)
    except USAGE_ERRORS as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; {INTERRUPTED['synth']}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"synthetic VideoQA: {result}")
    print(format_visibility(evidence_visibility(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
