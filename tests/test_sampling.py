"""Property tests of siamese sampling (DESIGN section 2): one function, every pipeline calls it."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siasam_fast.config import load_config
from siasam_fast.sampling import (
    SamplingConfig,
    anchor_distribution,
    clip_span,
    example_rng,
    group_span,
    sample_eval_clips,
    sample_siamese_clips,
)

configs = st.builds(
    SamplingConfig,
    num_clips=st.integers(1, 12),
    frames_per_clip=st.one_of(
        st.integers(1, 16), st.tuples(st.integers(1, 8), st.integers(8, 16))
    ),
    stride=st.integers(1, 8),
    start_spacing=st.integers(1, 4),
    pace=st.sampled_from(["both", "after"]),
    short_video=st.sampled_from(["shrink_stride", "pad", "skip"]),
)


def check_invariants(r, T, cfg):
    """What holds for every non-skipped result."""
    N, B = r.clips.shape
    assert N == cfg.num_clips
    lo, hi = cfg.frames_range
    assert lo <= B <= hi and B == r.frames_per_clip
    # Indices in range.
    assert r.clips.min() >= 0 and r.clips.max() <= T - 1
    # U sorted, unique, covering every clip frame, and the map reconstructs the clips.
    assert np.all(np.diff(r.unique) > 0)
    assert set(r.unique.tolist()) == set(r.clips.ravel().tolist())
    np.testing.assert_array_equal(r.unique[r.inverse], r.clips)
    np.testing.assert_array_equal(r.starts, r.clips[:, 0])  # pad mode included
    padded = "padded" in r.reason
    if not padded:
        # One stride for all clips.
        if B > 1:
            assert np.all(np.diff(r.clips, axis=1) == r.stride)
        starts = np.sort(r.clips[:, 0])
        # Consecutive, distinct starts (in steps of the spacing) containing the anchor.
        if N > 1:
            assert np.all(np.diff(starts) == r.start_spacing)
        assert r.anchor_start == r.clips[0, 0]
        assert r.stride <= cfg.stride and r.start_spacing <= cfg.start_spacing
        # Siamese clips come nearest first: |offsets| never decrease.
        offsets = np.abs(r.clips[:, 0] - r.anchor_start)
        assert np.all(np.diff(offsets) >= 0)
    else:
        # Padded: the anchor at frame 0, the siamese clips after it one spacing apart, each clip
        # one stride, and every frame past the end the last frame.
        assert r.anchor_start == 0
        d = 0 if cfg.anchor_copies else r.start_spacing
        np.testing.assert_array_equal(r.starts, np.minimum(d * np.arange(N), T - 1))
        np.testing.assert_array_equal(
            r.clips, np.minimum(r.starts[:, None] + r.stride * np.arange(B), T - 1))


@settings(max_examples=300, deadline=None)
@given(T=st.integers(1, 2000), cfg=configs, seed=st.integers(0, 2**32 - 1))
def test_invariants(T, cfg, seed):
    r = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    if r.skipped:
        assert cfg.short_video == "skip" and r.reason
        assert group_span(cfg.num_clips, cfg.frames_range[0], cfg.stride, cfg.start_spacing) > T
        return
    check_invariants(r, T, cfg)


@settings(max_examples=300, deadline=None)
@given(T=st.integers(1, 2000), cfg=configs, seed=st.integers(0, 2**32 - 1))
def test_anchor_in_first_third_whenever_feasible(T, cfg, seed):
    r = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    if r.skipped or "padded" in r.reason:
        return
    max_start = T - clip_span(r.frames_per_clip, r.stride)
    d = r.start_spacing
    feasible_first_third = [
        a
        for a in range(min(math.ceil(T / 3), max_start + 1))
        if a // d + (max_start - a) // d >= cfg.num_clips - 1
    ]
    if feasible_first_third:
        assert r.anchor_start < T / 3
        assert "first third" not in r.reason
    else:
        assert "first third" in r.reason


@settings(max_examples=100, deadline=None)
@given(T=st.integers(1, 500), cfg=configs, seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_result(T, cfg, seed):
    a = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    b = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    np.testing.assert_array_equal(a.clips, b.clips)
    assert a.reason == b.reason


def test_anchor_distribution_covers_first_third():
    cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)
    T = 300
    starts = {sample_siamese_clips(T, cfg, example_rng(0, 0, i)).anchor_start for i in range(2000)}
    assert min(starts) == 0 and max(starts) == math.ceil(T / 3) - 1
    assert len(starts) == math.ceil(T / 3)


def test_design_example_unique_frames():
    """DESIGN: with s=4 and 9 clips of 8 frames, 72 clip frames cover about 37 unique frames."""
    r = sample_siamese_clips(500, SamplingConfig(), np.random.default_rng(1))
    assert r.clips.size == 72
    assert len(r.unique) == 37
    assert r.reason == ""
    # a+d, a-d, a+2d, a-2d, ...
    a = r.anchor_start
    assert r.clips[:, 0].tolist() == [a, a + 1, a - 1, a + 2, a - 2, a + 3, a - 3, a + 4, a - 4]


def test_pace_after():
    r = sample_siamese_clips(500, SamplingConfig(pace="after"), np.random.default_rng(1))
    a = r.anchor_start
    assert r.clips[:, 0].tolist() == [a + k for k in range(9)]


def test_window_slides_at_video_start():
    # Anchor 0 is forced (first third holds only start 0): no clip starts before frame 0.
    cfg = SamplingConfig(num_clips=5, frames_per_clip=2, stride=1)
    r = sample_siamese_clips(3 + 4, cfg, np.random.default_rng(0))
    assert sorted(r.clips[:, 0].tolist()) == list(range(5))


# Each short-video policy at lengths 1, span-1, span, span+N and very long.
SPAN_CFG = dict(num_clips=9, frames_per_clip=8, stride=4, start_spacing=1)
SPAN = group_span(9, 8, 4, 1)  # 37


@pytest.mark.parametrize("T", [1, SPAN - 1, SPAN, SPAN + 9, 100_000])
@pytest.mark.parametrize("policy", ["shrink_stride", "pad", "skip"])
def test_short_video_policies(T, policy):
    cfg = SamplingConfig(**SPAN_CFG, short_video=policy)
    r = sample_siamese_clips(T, cfg, np.random.default_rng(0))
    if T >= SPAN:
        assert not r.skipped and r.reason == "" and r.stride == 4
        check_invariants(r, T, cfg)
        return
    if policy == "skip":
        assert r.skipped and f"video has {T} frames" in r.reason and "needs 37" in r.reason
        return
    assert not r.skipped and r.reason
    check_invariants(r, T, cfg)
    if policy == "pad":
        assert "padded" in r.reason and r.stride == 4
    elif T == SPAN - 1:
        # One frame short: stride 3 fits (7 * 3 + 1 + 8 = 30 <= 36).
        assert r.stride == 3 and "stride shrunk from 4 to 3" in r.reason
    else:  # T == 1: nothing fits, so stride and spacing shrink to 1 and the rest is padding
        assert r.stride == 1 and "padded" in r.reason
        assert np.all(r.clips == 0)


def test_min_frames_skips_like_the_paper():
    cfg = SamplingConfig(min_frames=40)
    r = sample_siamese_clips(39, cfg, np.random.default_rng(0))
    assert r.skipped and "min_frames=40" in r.reason
    assert not sample_siamese_clips(40, cfg, np.random.default_rng(0)).skipped


def test_zero_frames_always_skipped():
    for policy in ("shrink_stride", "pad", "skip"):
        r = sample_siamese_clips(0, SamplingConfig(short_video=policy), np.random.default_rng(0))
        assert r.skipped and "0 frames" in r.reason


def test_frames_per_clip_range_grows_with_length():
    cfg = SamplingConfig(num_clips=9, frames_per_clip=(5, 16), stride=2)
    sizes = [sample_siamese_clips(T, cfg, np.random.default_rng(0)).frames_per_clip
             for T in (10, 25, 30, 40, 1000)]
    assert sizes == sorted(sizes)
    assert sizes[0] == 5 and sizes[-1] == 16


def test_anchor_copies_ablation():
    r = sample_siamese_clips(200, SamplingConfig(anchor_copies=True), np.random.default_rng(3))
    assert r.clips.shape == (9, 8)
    assert np.all(r.clips == r.clips[0])
    assert len(r.unique) == 8


@pytest.mark.parametrize("placement", ["middle", "uniform"])
@pytest.mark.parametrize("T", [1, 7, 40, 301])
@pytest.mark.parametrize("E", [1, 3])
def test_eval_clips(placement, T, E):
    cfg = SamplingConfig(eval_placement=placement)
    r = sample_eval_clips(T, cfg, E)
    assert r.clips.shape[0] == E
    assert r.clips.min() >= 0 and r.clips.max() < T
    np.testing.assert_array_equal(r.unique[r.inverse], r.clips)
    np.testing.assert_array_equal(r.clips, sample_eval_clips(T, cfg, E).clips)  # deterministic
    if placement == "middle" and E == 1 and T == 301:
        # Centred: as many frames before the clip as after it (within one frame).
        before, after = r.clips[0, 0], T - 1 - r.clips[0, -1]
        assert abs(before - after) <= 1 and r.stride == 4


def _training_one_clip(L, cfg):
    """What training draws for a one-clip group in an L-frame video (no skipping)."""
    one = SamplingConfig(**{**cfg.__dict__, "num_clips": 1, "short_video": "shrink_stride",
                            "min_frames": 1})
    return sample_siamese_clips(L, one, np.random.default_rng(0))


@settings(max_examples=300, deadline=None)
@given(T=st.integers(1, 2000), cfg=configs, E=st.integers(1, 12),
       placement=st.sampled_from(["middle", "uniform"]), min_frames=st.integers(1, 100))
def test_eval_clips_share_one_stride_and_say_what_changed(T, cfg, E, placement, min_frames):
    """Every eval clip of a video has the B and stride training picks for a one-clip group in the
    shortest segment; ``stride`` and ``reason`` describe every clip; nothing is skipped."""
    cfg = SamplingConfig(**{**cfg.__dict__, "eval_placement": placement,
                            "min_frames": min_frames})
    r = sample_eval_clips(T, cfg, E)
    assert not r.skipped  # min_frames and short_video="skip" are ignored at evaluation
    B = r.frames_per_clip
    assert r.clips.shape == (E, B) and r.clips.min() >= 0 and r.clips.max() < T
    np.testing.assert_array_equal(r.unique[r.inverse], r.clips)
    np.testing.assert_array_equal(r.starts, r.clips[:, 0])
    shortest = max(T // E, 1)
    train = _training_one_clip(shortest, cfg)
    assert B == train.frames_per_clip
    if placement == "uniform":
        assert r.stride == 0
        repeated = any(len(set(c)) < B for c in r.clips.tolist())
        assert repeated == ("frames repeated" in r.reason)
        return
    assert r.stride == train.stride
    assert ("stride shrunk" in r.reason) == (r.stride != cfg.stride)
    padded = clip_span(B, r.stride) > T
    assert padded == ("padded" in r.reason)
    if not padded and B > 1:
        assert np.all(np.diff(r.clips, axis=1) == r.stride)  # one stride for every clip


def test_multi_clip_eval_uses_one_stride():
    """57 frames in 2 segments (28 and 29 frames): 8 frames at stride 4 need 29, so both clips use
    stride 3, not 3 for one and 4 for the other."""
    r = sample_eval_clips(57, SamplingConfig(frames_per_clip=8, stride=4), num_clips=2)
    assert {int(x) for x in np.diff(r.clips, axis=1).ravel()} == {3}
    assert r.stride == 3
    assert "stride shrunk from 4 to 3" in r.reason and "shortest of 2 segments" in r.reason
    # Each clip centred in its segment.
    assert r.clips[:, 0].tolist() == [3, 31]


@pytest.mark.parametrize("E, B, stride", [(1, 15, 4), (2, 8, 4), (4, 5, 3)])
def test_eval_frames_per_clip_range_follows_the_segment(E, B, stride):
    """B from a range is chosen for the segment each clip reads, as training chooses it for a
    video of that length: 60 frames in 2 segments of 30 keep stride 4 with B=8 (not B=15 at
    stride 2); in 4 segments of 15 even B=5 needs stride 3 (not B=15 at stride 1)."""
    cfg = SamplingConfig(frames_per_clip=(5, 16), stride=4)
    r = sample_eval_clips(60, cfg, E)
    assert (r.frames_per_clip, r.stride) == (B, stride)
    train = _training_one_clip(60 // E, cfg)
    assert (train.frames_per_clip, train.stride) == (B, stride)


def test_eval_num_clips_none_zero_and_invalid():
    cfg = SamplingConfig(eval_clips=3)
    assert sample_eval_clips(100, cfg).clips.shape[0] == 3  # None: config.eval_clips
    assert sample_eval_clips(100, cfg, np.int64(2)).clips.shape[0] == 2
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"num_clips={bad!r}: must be an integer >= 1"):
            sample_eval_clips(100, cfg, bad)


def test_eval_says_when_it_pads_or_repeats_frames():
    """Evaluation scores every video, however short, and says what it did to fit the clip."""
    r = sample_eval_clips(3, SamplingConfig(frames_per_clip=8, stride=1))
    assert r.clips.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2]]
    assert "padded with the last frame" in r.reason and "video has 3 frames" in r.reason
    cfg = SamplingConfig(frames_per_clip=8, stride=4, min_frames=40, short_video="skip")
    r = sample_eval_clips(3, cfg)
    assert not r.skipped and "stride shrunk from 4 to 1" in r.reason and "padded" in r.reason
    r = sample_eval_clips(3, SamplingConfig(frames_per_clip=8, eval_placement="uniform"))
    assert r.clips.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]] and "frames repeated" in r.reason
    # Long enough: nothing to say.
    assert sample_eval_clips(29, SamplingConfig(frames_per_clip=8, stride=4)).reason == ""
    # A clip longer than the last segment reads back into the previous one, not past the end.
    r = sample_eval_clips(20, SamplingConfig(frames_per_clip=8, stride=1), 3)
    assert r.clips[-1].tolist() == list(range(12, 20)) and r.reason.count("padded") == 0


def test_pad_mode_starts_are_the_clips_first_frames():
    r = sample_siamese_clips(4, SamplingConfig(num_clips=9, frames_per_clip=8, stride=4,
                                               short_video="pad"), np.random.default_rng(0))
    assert r.starts.tolist() == r.clips[:, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3]


@pytest.mark.parametrize("bad", [40.5, 40.0, -1, True, "40"])
def test_num_frames_must_be_a_nonnegative_integer(bad):
    cfg = SamplingConfig()
    match = rf"num_frames={bad!r}: must be an integer >= 0"
    with pytest.raises(ValueError, match=match):
        sample_siamese_clips(bad, cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match=match):
        anchor_distribution(bad, cfg)
    with pytest.raises(ValueError, match=match):
        sample_eval_clips(bad, cfg)
    ok = sample_siamese_clips(np.int64(40), cfg, np.random.default_rng(0))
    assert not ok.skipped and ok.clips.max() < 40


def test_example_rng_independent_of_order():
    a = [example_rng(5, 2, i).integers(1 << 30) for i in range(10)]
    b = [example_rng(5, 2, i).integers(1 << 30) for i in reversed(range(10))][::-1]
    assert a == b
    assert example_rng(5, 2, 0).integers(1 << 30) != example_rng(5, 3, 0).integers(1 << 30)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clips=0), r"num_clips=0: must be an integer >= 1"),
        (dict(stride=-1), r"stride=-1"),
        (dict(frames_per_clip=(9, 5)), r"1 <= lo <= hi"),
        (dict(frames_per_clip="8"), r"frames_per_clip='8'"),
        (dict(pace="sideways"), r"pace='sideways': valid values are both, after"),
        (dict(short_video="drop"),
         r"short_video='drop': valid values are shrink_stride, pad, skip"),
        (dict(eval_placement="random"), r"eval_placement='random'"),
    ],
)
def test_config_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown sampling option\(s\) \['strides'\]"):
        SamplingConfig.from_dict({"strides": 4})
    assert SamplingConfig.from_dict({"frames_per_clip": [5, 16]}).frames_per_clip == (5, 16)


# -- keyframe-aware options (issue 7) -----------------------------------------------------------


@st.composite
def video_keyframes(draw, T):
    """Keyframes of a T-frame video: a fixed GOP, or an irregular set (maybe without frame 0,
    maybe with keyframes before 0 as a segment of a longer video has)."""
    if draw(st.booleans()):
        gop = draw(st.integers(1, 300))
        offset = draw(st.integers(0, gop - 1))
        return list(range(-offset, T, gop))
    return sorted(draw(st.sets(st.integers(-60, T + 20), min_size=1, max_size=40)))


keyframe_options = st.fixed_dictionaries(
    {
        "preroll_temperature": st.one_of(
            st.none(), st.sampled_from([0.0, 0.5, 4.0, 32.0, math.inf])
        ),
        "keyframe_max_shift": st.sampled_from([0, 1, 3, 8, 50, 1000]),
    }
)


def with_options(cfg, options):
    return SamplingConfig(**{**cfg.__dict__, **options})


def distance_to_keyframe(keyframes, frame):
    """Frames from the keyframe at or before ``frame`` to it (from 0 if there is none)."""
    before = [k for k in keyframes if k <= frame]
    return frame - (max(before) if before else 0)


def feasible_first_third(r, T, cfg):
    max_start = T - clip_span(r.frames_per_clip, r.stride)
    d = r.start_spacing
    return [
        a
        for a in range(min(math.ceil(T / 3), max_start + 1))
        if a // d + (max_start - a) // d >= cfg.num_clips - 1
    ]


class FixedAnchor:
    """A stand-in rng whose draw is always ``anchor`` (to build the group around one anchor)."""

    def __init__(self, anchor):
        self.anchor = anchor

    def choice(self, candidates, p=None):
        assert self.anchor in list(candidates)
        return self.anchor


def _group_first_of(T, cfg, anchor):
    """First frame of the group the (uniform) sampler builds around ``anchor``."""
    plain = SamplingConfig(**{**cfg.__dict__, "preroll_temperature": None})
    return sample_siamese_clips(T, plain, FixedAnchor(anchor)).starts.min()


@settings(max_examples=300, deadline=None)
@given(data=st.data(), T=st.integers(1, 1500), cfg=configs, options=keyframe_options,
       seed=st.integers(0, 2**32 - 1))
def test_keyframe_options_keep_the_papers_constraints(data, T, cfg, options, seed):
    """Anchor in the first third whenever a group fits there, consecutive starts, one stride,
    same N / B / stride / spacing / skipping as without the options."""
    keyframes = data.draw(video_keyframes(T))
    kcfg = with_options(cfg, options)
    r = sample_siamese_clips(T, kcfg, np.random.default_rng(seed), keyframes=keyframes)
    plain = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    assert r.skipped == plain.skipped and r.reason == plain.reason
    if r.skipped:
        return
    check_invariants(r, T, kcfg)
    assert (r.frames_per_clip, r.stride, r.start_spacing) == (
        plain.frames_per_clip, plain.stride, plain.start_spacing
    )
    if "padded" in r.reason:
        np.testing.assert_array_equal(r.clips, plain.clips)
        return
    if feasible_first_third(r, T, cfg):
        assert r.anchor_start < T / 3
    # The result is the paper's group around a feasible anchor (FixedAnchor checks it is one of
    # the uniform draw's candidates), moved back by at most keyframe_max_shift frames.
    assert 0 <= r.keyframe_shift <= kcfg.keyframe_max_shift
    paper = sample_siamese_clips(T, cfg, FixedAnchor(r.anchor_start + r.keyframe_shift))
    np.testing.assert_array_equal(r.starts, paper.starts - r.keyframe_shift)
    np.testing.assert_array_equal(r.clips, paper.clips - r.keyframe_shift)
    again = sample_siamese_clips(T, kcfg, np.random.default_rng(seed), keyframes=keyframes)
    np.testing.assert_array_equal(r.clips, again.clips)  # deterministic per rng


@settings(max_examples=200, deadline=None)
@given(data=st.data(), T=st.integers(1, 1500), cfg=configs, options=keyframe_options,
       seed=st.integers(0, 2**32 - 1))
def test_keyframe_options_without_keyframes_change_nothing(data, T, cfg, options, seed):
    kcfg = with_options(cfg, options)
    plain = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    for keyframes in (None, []):
        r = sample_siamese_clips(T, kcfg, np.random.default_rng(seed), keyframes=keyframes)
        np.testing.assert_array_equal(r.clips, plain.clips)
        assert r.reason == plain.reason and r.keyframe_shift == 0
    # Options off: keyframes are not even read.
    r = sample_siamese_clips(T, cfg, np.random.default_rng(seed),
                             keyframes=data.draw(video_keyframes(T)))
    np.testing.assert_array_equal(r.clips, plain.clips)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), T=st.integers(1, 1500), cfg=configs,
       max_shift=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_keyframe_shift_moves_the_same_group_back_toward_its_keyframe(
    data, T, cfg, max_shift, seed
):
    """Same draw as without the option, the whole group moved back by min(pre-roll, M) frames
    (never before frame 0): its pre-roll becomes pre-roll - shift."""
    keyframes = data.draw(video_keyframes(T))
    plain = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    r = sample_siamese_clips(T, with_options(cfg, {"keyframe_max_shift": max_shift}),
                             np.random.default_rng(seed), keyframes=keyframes)
    if plain.skipped:
        assert r.skipped
        return
    first = int(plain.starts.min())
    preroll = distance_to_keyframe(keyframes, first)
    assert r.keyframe_shift == min(preroll, max_shift, first)
    np.testing.assert_array_equal(r.clips, np.maximum(plain.clips - r.keyframe_shift, 0)
                                  if "padded" in r.reason else plain.clips - r.keyframe_shift)
    assert distance_to_keyframe(keyframes, int(r.starts.min())) == preroll - r.keyframe_shift


@settings(max_examples=150, deadline=None)
@given(data=st.data(), T=st.integers(1, 600), cfg=configs, options=keyframe_options)
def test_anchor_distribution_is_a_distribution_over_first_third_anchors(data, T, cfg, options):
    keyframes = data.draw(video_keyframes(T))
    kcfg = with_options(cfg, options)
    starts, p = anchor_distribution(T, kcfg, keyframes)
    r = sample_siamese_clips(T, kcfg, np.random.default_rng(0), keyframes=keyframes)
    if r.skipped:
        assert starts.size == 0
        return
    assert np.all(np.diff(starts) > 0) and np.all(p > 0)
    assert math.isclose(p.sum(), 1.0)
    assert r.anchor_start in starts.tolist()
    if "padded" not in r.reason and feasible_first_third(r, T, cfg):
        assert starts.max() < T / 3
    # Options off (or no keyframes): the paper's uniform draw over the feasible first third.
    if not kcfg.keyframe_aware:
        assert np.allclose(p, 1 / p.size)


@settings(max_examples=150, deadline=None)
@given(gop=st.integers(2, 120), T=st.integers(60, 1500), tau=st.floats(0.25, 200),
       cfg=configs)
def test_preroll_temperature_is_an_exponential_tilt(gop, T, tau, cfg):
    """P(anchor) is proportional to exp(-pre-roll / tau): every feasible anchor is kept, and
    the mean pre-roll is never above the uniform draw's."""
    keyframes = list(range(0, T, gop))
    uniform_starts, uniform_p = anchor_distribution(T, cfg, keyframes)
    kcfg = with_options(cfg, {"preroll_temperature": tau})
    starts, p = anchor_distribution(T, kcfg, keyframes)
    if starts.size == 0 or starts.size == 1:
        return
    np.testing.assert_array_equal(starts, uniform_starts)  # same support
    r = sample_siamese_clips(T, kcfg, np.random.default_rng(0), keyframes=keyframes)
    if "padded" in r.reason:
        return
    # Pre-roll of each anchor's group (the group's first frame, as the sampler places it).
    preroll = np.array([
        distance_to_keyframe(keyframes, int(_group_first_of(T, kcfg, a)))
        for a in starts.tolist()
    ])
    expected = np.exp(-(preroll - preroll.min()) / tau)
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-9)
    assert (p * preroll).sum() <= (uniform_p * preroll).sum() + 1e-9


def test_preroll_temperature_zero_draws_only_keyframe_aligned_groups():
    cfg = SamplingConfig(preroll_temperature=0)
    keyframes = list(range(0, 300, 16))
    firsts = {
        int(sample_siamese_clips(300, cfg, example_rng(0, 0, i), keyframes=keyframes).starts.min())
        for i in range(300)
    }
    assert firsts and all(f % 16 == 0 for f in firsts)
    assert len(firsts) == len([k for k in keyframes if k < 100 - 4])  # every aligned group drawn


@pytest.mark.parametrize("T, kw", [
    (240, {}),
    (100, {"num_clips": 3, "start_spacing": 2}),
    (150, {"pace": "after", "stride": 2}),
    (60, {"num_clips": 5, "frames_per_clip": 4}),
])
def test_default_anchor_draw_is_uniform_over_the_first_third(T, kw):
    """The paper's draw (options off): every feasible first-third anchor equally often. Only
    the support was checked, so a biased draw passed every test."""
    cfg = SamplingConfig(**kw)
    starts, p = anchor_distribution(T, cfg, None)
    assert starts.size > 3 and np.allclose(p, 1 / starts.size)
    draws = 200 * starts.size
    counts = np.zeros(starts.size)
    for i in range(draws):
        a = sample_siamese_clips(T, cfg, example_rng(2, 0, i)).anchor_start
        counts[np.searchsorted(starts, a)] += 1
    assert counts.min() > 0
    # chi-square against uniform; the 0.999 quantile for up to ~80 degrees of freedom is < 130
    expected = draws / starts.size
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 1.7 * starts.size + 20, (chi2, counts)
    assert np.abs(counts / draws - 1 / starts.size).max() < 4 * np.sqrt(expected) / draws + 0.002


def test_sampler_follows_anchor_distribution():
    """Empirical anchor frequencies match anchor_distribution (both options on)."""
    cfg = SamplingConfig(preroll_temperature=6.0, keyframe_max_shift=3)
    keyframes = list(range(0, 240, 12))
    starts, p = anchor_distribution(240, cfg, keyframes)
    draws = 6000
    counts = np.zeros(starts.size)
    for i in range(draws):
        a = sample_siamese_clips(240, cfg, example_rng(1, 0, i), keyframes=keyframes).anchor_start
        counts[np.searchsorted(starts, a)] += 1
    assert np.abs(counts / draws - p).max() < 0.02


def test_keyframe_options_config_fields_and_overrides():
    cfg = load_config(overrides=["sampling.preroll_temperature=8",
                                 "sampling.keyframe_max_shift=4"]).sampling
    assert cfg.preroll_temperature == 8.0 and isinstance(cfg.preroll_temperature, float)
    assert cfg.keyframe_max_shift == 4 and cfg.keyframe_aware
    off = load_config(overrides=["sampling.preroll_temperature=null"]).sampling
    assert off.preroll_temperature is None and not off.keyframe_aware
    assert not SamplingConfig().keyframe_aware  # off by default


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preroll_temperature=-1.0), r"preroll_temperature=-1.0: must be None \(off\)"),
        (dict(preroll_temperature="hot"), r"preroll_temperature='hot'"),
        (dict(preroll_temperature=float("nan")), r"preroll_temperature=nan"),
        (dict(keyframe_max_shift=-2), r"keyframe_max_shift=-2: must be an integer"),
        (dict(keyframe_max_shift=2.5), r"keyframe_max_shift=2.5"),
    ],
)
def test_keyframe_option_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_keyframes_must_be_integers():
    with pytest.raises(ValueError, match=r"keyframes=\[0.5"):
        sample_siamese_clips(100, SamplingConfig(keyframe_max_shift=2), np.random.default_rng(0),
                             keyframes=[0.5, 10.0])


@pytest.mark.parametrize("bad", [[[0, 32], [64]], [0, [32, 64]]])
def test_ragged_keyframes_are_named_in_the_error(bad):
    """Nested lists of unequal length are not frame indices: the error names the value and what
    is valid, not numpy's "inhomogeneous shape" message."""
    cfg = SamplingConfig(keyframe_max_shift=2)
    match = r"keyframes=\[.*must be integer frame indices"
    with pytest.raises(ValueError, match=match):
        sample_siamese_clips(100, cfg, np.random.default_rng(0), keyframes=bad)
    with pytest.raises(ValueError, match=match):
        anchor_distribution(100, cfg, bad)


def test_preroll_floor_and_shift_stop_as_the_module_docstring_says():
    """The documented bounds: a keyframe every 32 frames from frame 0 and tau 16 give at most
    e^(31/16) between the likeliest and least likely anchor; frames before a first keyframe at 40
    count their pre-roll from frame 0 (up to 39, so e^(39/16)); with a large M, groups whose
    keyframe is before frame 0 (a segment starting mid-GOP) stop at frame 0, not on a keyframe."""
    cfg = SamplingConfig(preroll_temperature=16.0)
    _, p = anchor_distribution(3000, cfg, list(range(0, 3000, 32)))
    assert math.isclose(p.max() / p.min(), math.exp(31 / 16), rel_tol=1e-9)
    _, p = anchor_distribution(300, cfg, list(range(40, 300, 32)))
    assert math.isclose(p.max() / p.min(), math.exp(39 / 16), rel_tol=1e-9)
    segment_keyframes = list(range(-20, 300, 32))  # -20, 12, 44, ...
    shift = SamplingConfig(keyframe_max_shift=1000)
    on_keyframe = sample_siamese_clips(300, shift, FixedAnchor(40), keyframes=segment_keyframes)
    assert on_keyframe.starts.min() == 12
    at_zero = sample_siamese_clips(300, shift, FixedAnchor(5), keyframes=segment_keyframes)
    assert at_zero.starts.min() == 0 and 0 not in segment_keyframes


# -- sparse training clips and ClipBERT's evaluation placement ----------------------------------


def sparse(cfg, **kwargs):
    return SamplingConfig(**{**cfg.__dict__, "placement": "sparse", **kwargs})


@settings(max_examples=300, deadline=None)
@given(T=st.integers(1, 2000), cfg=configs, seed=st.integers(0, 2**32 - 1))
def test_sparse_clips_are_clips_of_one_stride_anywhere_a_clip_fits(T, cfg, seed):
    """placement=sparse: N clips of one stride, each fitting the video, independent starts; B,
    the stride and the short-video policy those of a one-clip group of the same config."""
    cfg = sparse(cfg)
    r = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    one = sample_siamese_clips(T, SamplingConfig(**{**cfg.__dict__, "num_clips": 1}),
                               np.random.default_rng(seed))
    assert r.skipped == one.skipped and r.reason == one.reason
    if r.skipped:
        return
    N, B = r.clips.shape
    assert N == cfg.num_clips and B == one.frames_per_clip and r.stride == one.stride
    assert r.start_spacing == 0
    np.testing.assert_array_equal(r.unique[r.inverse], r.clips)
    np.testing.assert_array_equal(r.starts, r.clips[:, 0])
    assert r.anchor_start == r.clips[0, 0]
    if "padded" in r.reason:
        assert np.all(r.starts == 0)
        return
    assert r.clips.min() >= 0 and r.clips.max() <= T - 1
    if B > 1:
        assert np.all(np.diff(r.clips, axis=1) == r.stride)
    assert r.starts.max() <= T - clip_span(B, r.stride)
    # the same draw again: deterministic per generator
    again = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    np.testing.assert_array_equal(again.clips, r.clips)


def test_sparse_starts_are_uniform_over_the_video_and_independent():
    """Unlike the siamese anchor (first third, neighbours d apart), every sparse clip start is
    uniform over the 172 starts at which a clip of 8 frames at stride 4 fits 200 frames."""
    cfg = SamplingConfig(placement="sparse")  # N 9, B 8, stride 4
    starts = np.stack([sample_siamese_clips(200, cfg, example_rng(0, 0, i)).starts
                       for i in range(3000)])  # [draws, N]
    assert starts.min() == 0 and starts.max() == 200 - clip_span(8, 4)
    for clip in range(9):  # each clip's start: mean (171 / 2) and spread of a uniform draw
        assert abs(starts[:, clip].mean() - 85.5) < 4
        assert abs(starts[:, clip].std() - math.sqrt((172**2 - 1) / 12)) < 3
    assert (starts[:, 0] >= 200 / 3).mean() > 0.6  # the anchor is not held to the first third
    # independent: neighbouring clips' starts are uncorrelated (siamese ones are d apart)
    assert abs(np.corrcoef(starts[:, 0], starts[:, 1])[0, 1]) < 0.06
    siamese = np.stack([sample_siamese_clips(200, SamplingConfig(), example_rng(0, 0, i)).starts
                        for i in range(300)])
    assert np.corrcoef(siamese[:, 0], siamese[:, 1])[0, 1] > 0.99


def test_sparse_anchor_distribution_is_the_samplers():
    cfg = SamplingConfig(placement="sparse", frames_per_clip=4, stride=2)
    starts, p = anchor_distribution(30, cfg)
    np.testing.assert_array_equal(starts, np.arange(30 - clip_span(4, 2) + 1))
    np.testing.assert_allclose(p, 1 / starts.size)
    drawn = {sample_siamese_clips(30, cfg, example_rng(1, 0, i)).anchor_start for i in range(500)}
    assert drawn == set(starts.tolist())
    padded = SamplingConfig(placement="sparse", short_video="pad")  # 8 x 4 does not fit 10 frames
    assert anchor_distribution(10, padded)[0].tolist() == [0]
    skipped = SamplingConfig(placement="sparse", min_frames=40)
    assert anchor_distribution(39, skipped)[0].size == 0


def test_sparse_short_videos_follow_the_policy_for_one_clip():
    cfg = SamplingConfig(placement="sparse", short_video="skip")  # one clip needs 29 frames
    assert not sample_siamese_clips(29, cfg, example_rng(0, 0, 0)).skipped  # a group needs 37
    r = sample_siamese_clips(28, cfg, example_rng(0, 0, 0))
    assert r.skipped and "a clip of 8 frames needs 29" in r.reason
    r = sample_siamese_clips(20, SamplingConfig(placement="sparse"), example_rng(0, 0, 0))
    assert r.stride == 2 and "stride shrunk from 4 to 2" in r.reason


def test_sparse_anchor_copies():
    r = sample_siamese_clips(200, SamplingConfig(placement="sparse", anchor_copies=True),
                             example_rng(0, 0, 5))
    assert np.all(r.clips == r.clips[0]) and len(r.unique) == 8


def test_placement_errors_name_the_value():
    with pytest.raises(ValueError, match=r"placement='random': valid values are siamese, sparse"):
        SamplingConfig(placement="random")
    for option in (dict(preroll_temperature=8.0), dict(keyframe_max_shift=4)):
        with pytest.raises(ValueError, match=r"apply to placement='siamese' only"):
            SamplingConfig(placement="sparse", **option)
    with pytest.raises(ValueError, match=r"sampling\.placement='sparse' draws each clip"):
        load_config("configs/synthetic.yaml", ["sampling.placement=sparse",
                                               "sampling.keyframe_max_shift=2"])
    cfg = load_config("configs/synthetic.yaml", ["sampling.placement=sparse"])
    assert cfg.sampling.placement == "sparse"


@pytest.mark.parametrize(
    "T, E, starts",
    [(100, 1, [0]), (100, 3, [0, 24, 48]), (29, 2, [0, 0]), (30, 4, [0, 1, 1, 1]),
     (1000, 16, [-(-971 * i // 16) for i in range(16)])],
)
def test_clipbert_eval_placement_is_clipberts_uniform_clips(T, E, starts):
    """ClipBERT's get_start_end_idx(T, span, i, E): start i * (T - span) / E, read from the first
    frame at or after it; one clip (E = 1) reads the video's first frames."""
    cfg = SamplingConfig(eval_placement="clipbert")  # B 8, stride 4: span 29
    r = sample_eval_clips(T, cfg, E)
    assert r.starts.tolist() == starts and r.stride == 4 and r.frames_per_clip == 8
    np.testing.assert_array_equal(r.clips, np.array(starts)[:, None] + 4 * np.arange(8))
    np.testing.assert_array_equal(r.unique[r.inverse], r.clips)
    assert r.reason == ""


def test_clipbert_eval_placement_repeats_the_last_frame_of_a_short_video():
    r = sample_eval_clips(10, SamplingConfig(eval_placement="clipbert"), 2)
    assert r.clips.tolist() == [[0, 4, 8, 9, 9, 9, 9, 9]] * 2
    assert "padded with the last frame: video has 10 frames" in r.reason
    # a range of frames per clip: the largest that fits the whole video
    r = sample_eval_clips(25, SamplingConfig(eval_placement="clipbert", frames_per_clip=(2, 8)))
    assert r.frames_per_clip == 7 and r.reason == ""


# -- gaps found by mutation testing: pace "both" with even N, the short-video fit, both options ---


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("N", range(1, 13))
def test_pace_both_order_away_from_the_ends(N, d):
    """Far from either end the group is a, a+d, a-d, a+2d, a-2d, ... cut at N clips: with an even
    N the one clip more is after the anchor (a, a+d for N = 2), not before it."""
    cfg = SamplingConfig(num_clips=N, frames_per_clip=2, stride=1, start_spacing=d)
    a = 100  # in the first third of 3000 frames, with room for 6 steps of 3 on both sides
    r = sample_siamese_clips(3000, cfg, FixedAnchor(a))
    offsets = [0] + [k for j in range(1, N) for k in (j, -j)]
    assert r.starts.tolist() == [a + d * k for k in offsets[:N]]


def _expected_short_fit(T, N, B, s, d):
    """(stride, spacing, padded) of shrink_stride, from its rule: the largest stride that fits,
    then (stride 1) the largest spacing that fits, else stride 1, spacing 1 and padding."""
    if group_span(N, B, s, d) <= T:
        return s, d, False
    for s2 in range(s - 1, 0, -1):
        if group_span(N, B, s2, d) <= T:
            return s2, d, False
    for d2 in range(d - 1, 0, -1):
        if group_span(N, B, 1, d2) <= T:
            return 1, d2, False
    return 1, 1, True


@settings(max_examples=150, deadline=None)
@given(N=st.integers(1, 12), B=st.integers(1, 16), s=st.integers(1, 8), d=st.integers(1, 6),
       data=st.data())
def test_shrink_stride_takes_the_largest_stride_then_spacing_that_fits(N, B, s, d, data):
    """Lengths around every stride's and spacing's exact fit: a group that fits exactly keeps
    that stride (or spacing), and no larger one fits."""
    fits = [group_span(N, B, s2, d) for s2 in range(1, s + 1)]
    fits += [group_span(N, B, 1, d2) for d2 in range(1, d + 1)]
    T = max(1, data.draw(st.sampled_from(fits)) + data.draw(st.sampled_from([-1, 0, 1])))
    cfg = SamplingConfig(num_clips=N, frames_per_clip=B, stride=s, start_spacing=d)
    r = sample_siamese_clips(T, cfg, np.random.default_rng(0))
    stride, spacing, padded = _expected_short_fit(T, N, B, s, d)
    assert (r.stride, r.start_spacing, "padded" in r.reason) == (stride, spacing, padded)
    if not padded:
        assert group_span(N, B, r.stride, r.start_spacing) <= T
        check_invariants(r, T, cfg)


def test_shrink_stride_exact_fits():
    """The module's own example lengths: 30 frames hold 9 clips of 8 frames at stride 3 exactly;
    14 frames hold 5 clips of 2 frames at stride 1 and spacing 3 exactly."""
    r = sample_siamese_clips(30, SamplingConfig(**SPAN_CFG), np.random.default_rng(0))
    assert r.stride == 3 and "stride shrunk from 4 to 3" in r.reason
    cfg = SamplingConfig(num_clips=5, frames_per_clip=2, stride=2, start_spacing=4)
    for T in (14, 15):
        r = sample_siamese_clips(T, cfg, np.random.default_rng(0))
        assert (r.stride, r.start_spacing) == (1, 3)
        assert "stride shrunk from 2 to 1 and spacing from 4 to 3" in r.reason


@settings(max_examples=120, deadline=None)
@given(gop=st.integers(2, 60), offset=st.integers(0, 59), T=st.integers(40, 700),
       tau=st.sampled_from([0.0, 0.5, 3.0, 20.0]), max_shift=st.integers(1, 70),
       anchor_copies=st.booleans(), cfg=configs)
def test_both_options_weigh_the_preroll_left_after_the_shift(
    gop, offset, T, tau, max_shift, anchor_copies, cfg
):
    """Both options on: anchor a of the uniform draw (group first frame f, pre-roll r) is drawn
    with weight exp(-(r - shift) / tau), shift = min(r, M, f), and lands at a - shift (module
    docstring). Built here from the paper's group around each anchor (FixedAnchor), anchor copies
    included (their group starts at the anchor)."""
    cfg = SamplingConfig(**{**cfg.__dict__, "anchor_copies": anchor_copies})
    keyframes = list(range(-(offset % gop), T, gop))
    kcfg = with_options(cfg, {"preroll_temperature": tau, "keyframe_max_shift": max_shift})
    probe = sample_siamese_clips(T, cfg, np.random.default_rng(0))
    if probe.skipped or "padded" in probe.reason:
        return
    uniform_starts, _ = anchor_distribution(T, cfg)
    left, landed = [], []
    for a in uniform_starts.tolist():
        first = int(_group_first_of(T, cfg, a))
        if anchor_copies:
            assert first == a
        preroll = distance_to_keyframe(keyframes, first)
        shift = min(preroll, max_shift, first)
        left.append(preroll - shift)
        landed.append(a - shift)
    left = np.array(left, dtype=np.float64)
    r = left - left.min()
    w = (r == 0).astype(np.float64) if tau == 0 else np.exp(-r / tau)
    expected = {}
    for start, weight in zip(landed, w / w.sum()):
        expected[start] = expected.get(start, 0.0) + weight
    expected = {k: v for k, v in expected.items() if v > 0}
    starts, p = anchor_distribution(T, kcfg, keyframes)
    assert starts.tolist() == sorted(expected)
    np.testing.assert_allclose(p, [expected[k] for k in sorted(expected)], rtol=1e-9, atol=1e-15)
    drawn = sample_siamese_clips(T, kcfg, np.random.default_rng(1), keyframes=keyframes)
    assert drawn.anchor_start in expected


def test_preroll_temperature_zero_distribution_holds_only_aligned_anchors():
    """tau = 0: anchor_distribution lists only the anchors drawn (those whose group starts on a
    keyframe), each as likely: 9 clips x 8 frames at stride 4 in 300 frames, a keyframe every 16
    frames, anchors 0..4 (group from frame 0) and 20, 36, ..., 84 (group from a - 4)."""
    cfg = SamplingConfig(preroll_temperature=0)
    starts, p = anchor_distribution(300, cfg, list(range(0, 300, 16)))
    assert starts.tolist() == [0, 1, 2, 3, 4, 20, 36, 52, 68, 84]
    np.testing.assert_allclose(p, 0.1)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), T=st.integers(1, 800), cfg=configs, options=keyframe_options,
       seed=st.integers(0, 2**32 - 1))
def test_keyframes_in_any_order_with_repeats_give_the_same_result(data, T, cfg, options, seed):
    """keyframes are a set of frame indices: their order and repeats do not matter."""
    keyframes = data.draw(video_keyframes(T))
    shuffled = data.draw(st.permutations(keyframes + keyframes[:3]))
    kcfg = with_options(cfg, options)
    a = sample_siamese_clips(T, kcfg, np.random.default_rng(seed), keyframes=keyframes)
    b = sample_siamese_clips(T, kcfg, np.random.default_rng(seed), keyframes=shuffled)
    np.testing.assert_array_equal(a.clips, b.clips)
    assert a.keyframe_shift == b.keyframe_shift
    ordered = anchor_distribution(T, kcfg, keyframes)
    for x, y in zip(ordered, anchor_distribution(T, kcfg, shuffled)):
        np.testing.assert_array_equal(x, y)


def test_keyframes_are_not_read_with_the_options_off():
    """Options off: the keyframes argument is not read, so not even checked."""
    plain = sample_siamese_clips(100, SamplingConfig(), np.random.default_rng(0))
    r = sample_siamese_clips(100, SamplingConfig(), np.random.default_rng(0), keyframes=[0.5, 7.5])
    np.testing.assert_array_equal(r.clips, plain.clips)


@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 2000), E=st.integers(1, 12), cfg=configs,
       placement=st.sampled_from(["middle", "uniform"]))
def test_eval_clips_sit_in_their_equal_segments(T, E, cfg, placement):
    """Clip i reads segment [i T // E, (i + 1) T // E): "middle" centres its clip there (as many
    frames before it as after it, within one), "uniform" reads for frame j the frame that holds
    the centre of the j-th of B equal parts of the segment, whenever the clip fits the segment."""
    cfg = SamplingConfig(**{**cfg.__dict__, "eval_placement": placement})
    r = sample_eval_clips(T, cfg, E)
    B = r.frames_per_clip
    for i, clip in enumerate(r.clips.tolist()):
        lo, hi = i * T // E, max((i + 1) * T // E, i * T // E + 1)
        n = hi - lo
        if placement == "uniform":
            if B <= n:
                for j, f in enumerate(clip):
                    assert f <= lo + (j + 0.5) * n / B < f + 1
        elif clip_span(B, r.stride) <= n:
            assert lo <= clip[0] and clip[-1] < hi
            assert abs((clip[0] - lo) - (hi - 1 - clip[-1])) <= 1
