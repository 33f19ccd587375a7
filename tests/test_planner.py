"""The decode cost model against real decodes; the keyframe-aware sampling options against it."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from videos import read_indices, video_path, write_index_video

from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.dataset import VideoQADataset
from siasam_fast.pipeline.manifest import build_manifest
from siasam_fast.pipeline.planner import decode_cost, sampling_cost
from siasam_fast.pipeline.pyav_decode import DecodeStats, decode_frames
from siasam_fast.sampling import SamplingConfig, example_rng, sample_siamese_clips

FRAMES = 90
# name -> (codec, writer options): several GOP sizes, B-frames, variable frame rate, all-intra.
VIDEOS = {
    "gop1": ("h264", dict(gop=1, bframes=0)),
    "gop5": ("h264", dict(gop=5, bframes=2)),
    "gop12": ("h264", dict(gop=12, bframes=3)),
    "gop30_vfr": ("h264", dict(gop=30, bframes=2, vfr=True)),
    "gop45": ("h264", dict(gop=45, bframes=0)),
    "vp9_gop10": ("vp9", dict(gop=10)),
    "mjpeg": ("mjpeg", {}),
}
THRESHOLDS = [0, 1, 3, 8, 20, 10**6]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planner_videos")
    for name, (codec, options) in VIDEOS.items():
        write_index_video(video_path(folder, name, codec), FRAMES, codec=codec, size=16, **options)
    records = build_manifest(folder, folder / "manifest.jsonl", workers=1, progress=False)
    assert all(r.ok for r in records.values())
    assert records["gop12"].keyframes == list(range(0, FRAMES, 12))
    return records


def check_model_matches_decoder(record, frames, threshold):
    stats = DecodeStats()
    out = decode_frames(record, frames, seek_threshold=threshold, stats=stats)
    cost = decode_cost(record.keyframes, frames, threshold, record.num_frames)
    assert stats.restarts == 0
    assert cost.decoded == stats.decoded
    assert cost.seeks == stats.seeks and list(cost.seek_targets) == stats.seek_targets
    assert cost.needed == len(frames) == stats.returned
    assert read_indices(out) == list(frames)  # and the decode was right
    return cost


# -- the model is what the decoder does ---------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    name=st.sampled_from(sorted(VIDEOS)),
    frames=st.sets(st.integers(0, FRAMES - 1), min_size=1, max_size=24),
    threshold=st.sampled_from(THRESHOLDS),
)
def test_model_matches_decode_stats_on_any_frame_set(manifest, name, frames, threshold):
    check_model_matches_decoder(manifest[name], sorted(frames), threshold)


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(sorted(VIDEOS)),
    stride=st.integers(1, 6),
    frames_per_clip=st.integers(1, 8),
    num_clips=st.integers(1, 9),
    temperature=st.sampled_from([None, 0.0, 4.0]),
    max_shift=st.sampled_from([0, 3, 100]),
    threshold=st.sampled_from(THRESHOLDS),
    seed=st.integers(0, 2**16),
)
def test_model_matches_decode_stats_on_siamese_draws(
    manifest, name, stride, frames_per_clip, num_clips, temperature, max_shift, threshold, seed
):
    record = manifest[name]
    cfg = SamplingConfig(num_clips=num_clips, frames_per_clip=frames_per_clip, stride=stride,
                         preroll_temperature=temperature, keyframe_max_shift=max_shift)
    clips = sample_siamese_clips(record.num_frames, cfg, np.random.default_rng(seed),
                                 keyframes=record.keyframes)
    check_model_matches_decoder(record, clips.unique, threshold)


def test_model_on_the_decoder_tests_cases():
    """The cases test_pyav_pipeline checks on a 160-frame GOP-12 video, by hand."""
    keyframes = list(range(0, 160, 12))
    c = decode_cost(keyframes, [150])
    assert c.seek_targets == (144,) and c.decoded == 7 and c.preroll == 6 and c.ratio == 7
    c = decode_cost(keyframes, [1, 3, 5, 40, 41, 100, 130, 159])
    assert c.seek_targets == (36, 96, 120, 156)
    # 0,1 | 2..5 (gaps 2, 4 from the start, continued) | 36..40 | 41 | 96..100 | 120..130 | 156..159
    assert c.decoded == 6 + 5 + 1 + 5 + 11 + 4 and c.gaps == 2 and c.preroll == 1 + 4 + 4 + 10 + 3
    c = decode_cost(keyframes, [0, 5, 13])
    assert c.seeks == 0 and c.decoded == 14 and c.gaps == 11 and c.preroll == 0
    assert decode_cost(keyframes, [0, 150], seek_threshold=10**6).decoded == 151


@settings(max_examples=300, deadline=None)
@given(
    keyframes=st.sets(st.integers(0, 400), min_size=1, max_size=30),
    frames=st.sets(st.integers(0, 400), min_size=0, max_size=40),
    threshold=st.integers(0, 50),
)
def test_cost_decomposes(keyframes, frames, threshold):
    frames = sorted(frames)
    c = decode_cost(sorted(keyframes), frames, threshold)
    assert c.decoded == c.needed + c.preroll + c.gaps
    assert c.needed == len(frames) and c.discarded == c.preroll + c.gaps >= 0
    if frames:
        assert c.decoded <= frames[-1] + 1  # never more than decoding from the start
        assert c.ratio >= 1
        never = decode_cost(sorted(keyframes), frames, 10**9)
        assert never.seeks == 0 and never.decoded == frames[-1] + 1
    else:
        assert c.decoded == 0 and math.isnan(c.ratio)
    assert list(c.seek_targets) == sorted(set(c.seek_targets))  # forward seeks only
    assert set(c.seek_targets) <= set(keyframes)
    # keyframes are a set: any order, with repeats, costs the same
    assert decode_cost(sorted(keyframes, reverse=True) + [min(keyframes)], frames, threshold) == c


def test_first_keyframe_after_frame_0():
    """Keyframes need not include frame 0: a frame past the first keyframe seeks to it (keyframe
    index 0 is a keyframe like any other); a frame before it decodes from frame 0."""
    c = decode_cost([50, 100], [60])
    assert c.seek_targets == (50,) and c.decoded == 11 and c.preroll == 10
    c = decode_cost([50, 100], [40])
    assert c.seeks == 0 and c.decoded == 41 and c.preroll == 40
    c = decode_cost([50, 100], [40, 60, 105])  # 0..40 | 50..60 | 100..105
    assert c.seek_targets == (50, 100) and c.gaps == 0 and c.preroll == 40 + 10 + 5
    assert c.decoded == 41 + 11 + 6


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: decode_cost([0], [5, 3]), r"sorted and unique \(got \[5, 3\]"),
        (lambda: decode_cost([0], [3, 3]), r"sorted and unique"),
        (lambda: decode_cost([0], [-1, 3]), r"frames -1..3 out of range"),
        (lambda: decode_cost([0], [3, 10], num_frames=10), r"valid frames are 0..9"),
        (lambda: decode_cost([0], [3], seek_threshold=-1), r"seek_threshold=-1: must be >= 0"),
        (lambda: sampling_cost((100, [0]), SamplingConfig(), draws=0), r"draws=0: must be >= 1"),
    ],
)
def test_errors_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- the keyframe-aware options reduce the modelled cost ----------------------------------------


@st.composite
def keyframe_sets(draw, T):
    if draw(st.booleans()):
        return list(range(0, T, draw(st.integers(1, 300))))
    return sorted({0} | draw(st.sets(st.integers(0, T - 1), max_size=30)))


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    T=st.integers(1, 1200),
    num_clips=st.integers(1, 12),
    frames_per_clip=st.integers(1, 16),
    stride=st.integers(1, 8),
    pace=st.sampled_from(["both", "after"]),
    max_shift=st.integers(1, 300),
    threshold=st.sampled_from([0, 3, 8, 16]),
    seed=st.integers(0, 2**32 - 1),
)
def test_shift_saves_exactly_the_frames_it_moves(
    data, T, num_clips, frames_per_clip, stride, pace, max_shift, threshold, seed
):
    """Same draw with and without keyframe_max_shift: when no gap inside U exceeds the seek
    threshold (the usual case: gaps < stride <= threshold), the decoder decodes exactly
    ``keyframe_shift`` frames fewer; never more."""
    keyframes = data.draw(keyframe_sets(T))
    cfg = SamplingConfig(num_clips=num_clips, frames_per_clip=frames_per_clip, stride=stride,
                         pace=pace)
    shifted_cfg = SamplingConfig(**{**cfg.__dict__, "keyframe_max_shift": max_shift})
    plain = sample_siamese_clips(T, cfg, np.random.default_rng(seed))
    shifted = sample_siamese_clips(T, shifted_cfg, np.random.default_rng(seed),
                                   keyframes=keyframes)
    assume(not plain.skipped)
    gaps = np.diff(plain.unique) - 1
    assume(gaps.size == 0 or gaps.max() <= threshold)
    before = decode_cost(keyframes, plain.unique, threshold)
    after = decode_cost(keyframes, shifted.unique, threshold)
    assert after.decoded == before.decoded - shifted.keyframe_shift
    assert after.needed == before.needed


REAL = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)  # the setting


@pytest.mark.parametrize("gop, T", [(8, 300), (32, 300), (100, 300), (250, 1800)])
def test_options_reduce_modelled_cost(gop, T):
    """Decoded frames per needed frame over 200 training draws (common random numbers)."""
    keyframes = list(range(0, T, gop))
    video = (T, keyframes)
    base = sampling_cost(video, REAL, draws=200)
    assert base.needed == 37  # 9 clips x 8 frames at stride 4: 37 unique frames
    costs = {
        name: sampling_cost(video, SamplingConfig(**{**REAL.__dict__, **options}), draws=200)
        for name, options in {
            "tau=gop/4": dict(preroll_temperature=gop / 4),
            "tau=0": dict(preroll_temperature=0.0),
            "shift=gop/2": dict(keyframe_max_shift=gop // 2),
            "shift=gop": dict(keyframe_max_shift=gop),
        }.items()
    }
    for name, cost in costs.items():
        assert cost.needed == base.needed, name
        assert cost.ratio < base.ratio, name
    # Every group on a keyframe: what is left is the seek policy's (decode from frame 0 rather
    # than seek to a keyframe within the threshold).
    threshold = 8
    assert costs["shift=gop"].preroll <= threshold and costs["tau=0"].preroll <= threshold
    if gop >= 32:  # long GOPs: most decoding was pre-roll
        assert base.ratio > 1.3 and costs["shift=gop"].ratio < 1.25


def test_sampling_cost_reads_manifest_records(manifest):
    records = [manifest["gop45"], manifest["gop12"]]
    cost = sampling_cost(records, REAL, draws=20)
    assert cost.draws == 40 and cost.needed > 0
    shifted = sampling_cost(records, SamplingConfig(**{**REAL.__dict__, "keyframe_max_shift": 45}),
                            draws=20)
    assert shifted.decoded < cost.decoded


# -- the options in the training dataset --------------------------------------------------------


def test_dataset_passes_keyframes_in_segment_numbering(manifest):
    """A segment [1 s, 3 s) of a GOP-12 video at 25 fps is frames 25..74: with a large shift every
    group starts on a keyframe of the video (36, 48, ...) or at the segment start (25)."""
    record = manifest["gop12"]
    assert record.fps == 25
    cfg = SamplingConfig(num_clips=3, frames_per_clip=4, stride=2, keyframe_max_shift=100)
    ex = QAExample(qid="q", video_id="gop12", question="?", start=1.0, end=3.0)
    dataset = VideoQADataset([ex], manifest, cfg, split="train", image_size=16)
    firsts = {int(dataset.plan((epoch, 0)).clips.starts.min()) for epoch in range(40)}
    assert firsts <= {25, 36} and 36 in firsts
    plain = VideoQADataset([ex], manifest, SamplingConfig(num_clips=3, frames_per_clip=4,
                                                          stride=2), split="train", image_size=16)
    plain_firsts = {int(plain.plan((epoch, 0)).clips.starts.min()) for epoch in range(40)}
    assert len(plain_firsts) > 2
    item = dataset[(3, 0)]  # and decodes the right frames
    assert item["frames"].shape[0] == len(dataset.plan((3, 0)).clips.unique)


def test_sampling_cost_uses_the_training_rng():
    """Draw i of video v is example_rng(seed, i, v): the same clips training would read."""
    T, keyframes = 300, list(range(0, 300, 50))
    expected = np.mean([
        decode_cost(keyframes, sample_siamese_clips(T, REAL, example_rng(7, i, 0)).unique).decoded
        for i in range(10)
    ])
    assert sampling_cost((T, keyframes), REAL, draws=10, seed=7).decoded == expected


def test_sampling_cost_takes_records_in_a_tuple():
    """A tuple of records is an iterable of records, not a (num_frames, keyframes) pair."""
    from siasam_fast.pipeline.manifest import VideoRecord

    records = tuple(
        VideoRecord(video_id=f"v{gop}", path=f"/v{gop}.mp4", relpath=f"v{gop}.mp4", status="ok",
                    num_frames=300, keyframes=list(range(0, 300, gop)))
        for gop in (12, 45))
    expected = sampling_cost(list(records), REAL, draws=5)
    assert expected.draws == 10
    assert sampling_cost(records, REAL, draws=5) == expected
    assert sampling_cost(records[:1], REAL, draws=5) == sampling_cost([records[0]], REAL, draws=5)


@pytest.mark.parametrize("threshold", [0, 2, 8])
def test_sampling_cost_is_the_mean_of_decode_cost(threshold):
    """Every field of sampling_cost is the mean of decode_cost's over the draws, at the seek
    threshold asked for."""
    T, keyframes = 300, list(range(0, 300, 5))
    costs = [
        decode_cost(keyframes, sample_siamese_clips(T, REAL, example_rng(3, i, 0)).unique,
                    threshold)
        for i in range(12)
    ]
    got = sampling_cost((T, keyframes), REAL, draws=12, seed=3, seek_threshold=threshold)
    assert got.draws == 12
    for name in ("needed", "decoded", "preroll", "gaps", "seeks"):
        assert getattr(got, name) == pytest.approx(np.mean([getattr(c, name) for c in costs])), name


def test_sampling_cost_averages_only_the_draws_it_decodes():
    """Skipped draws (a video too short with short_video='skip') and corrupt records count
    neither as draws nor in the means."""
    from siasam_fast.pipeline.manifest import VideoRecord

    def record(name, status, num_frames):
        return VideoRecord(video_id=name, path=f"/{name}.mp4", relpath=f"{name}.mp4",
                           status=status, num_frames=num_frames,
                           keyframes=list(range(0, num_frames, 12)))

    cfg = SamplingConfig(**{**REAL.__dict__, "short_video": "skip"})  # the group needs 37 frames
    long = record("long", "ok", 300)
    alone = sampling_cost([long], cfg, draws=6)
    assert alone.draws == 6 and alone.needed == 37
    mixed = [long, record("short", "ok", 20), record("bad", "corrupt", 300)]
    assert sampling_cost(mixed, cfg, draws=6) == alone


def long_records(n=30, gop=250):
    from siasam_fast.pipeline.manifest import VideoRecord

    return {f"v{i}": VideoRecord(video_id=f"v{i}", path=f"/videos/v{i}.mp4", relpath=f"v{i}.mp4",
                                 status="ok", num_frames=900 + 7 * i, codec="h264",
                                 keyframes=list(range(0, 900 + 7 * i, gop)))
            for i in range(n)}


def test_plan_set_models_the_set_as_indexed_and_as_transcoded():
    """`siasam-fast plan`: the sampler's decode cost on the set's own keyframes, then on a keyframe
    every G frames (what `transcode --gop G` writes): the same draws, so only the GOP differs."""
    from dataclasses import replace

    from siasam_fast.pipeline.planner import plan_set

    records = long_records()
    records["bad"] = replace(records["v0"], video_id="bad", status="corrupt")
    cfg = SamplingConfig()
    plan = plan_set(records, cfg, gops=(16, 8), videos=500, draws=4)
    assert (plan["videos"], plan["sampled"], plan["gop"]) == (30, 30, 250.0)
    assert [row["set"] for row in plan["rows"]] == ["as indexed", "--gop 16", "--gop 8"]
    ok = [r for r in records.values() if r.ok]
    assert plan["rows"][0]["decoded"] == sampling_cost(ok, cfg, draws=4).decoded
    moved = [replace(r, keyframes=list(range(0, r.num_frames, 16))) for r in ok]
    assert plan["rows"][1]["decoded"] == sampling_cost(moved, cfg, draws=4).decoded
    ratios = [row["decoded_per_needed"] for row in plan["rows"]]
    assert ratios[0] > 3 and 1 < ratios[2] < ratios[1] < 1.5, ratios
    assert len({row["needed"] for row in plan["rows"]}) == 1  # the same draws each time
    few = plan_set(records, cfg, gops=(16,), videos=7, draws=2)
    assert (few["videos"], few["sampled"]) == (30, 7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(videos=0), "videos=0: must be an integer >= 1"),
    (dict(draws=2.5), r"draws=2.5: must be an integer >= 1"),
    (dict(gops=(16, 0)), r"gops=\[16, 0\]: each GOP must be an integer >= 1"),
])
def test_plan_set_names_bad_arguments(kwargs, match):
    from siasam_fast.pipeline.planner import plan_set

    with pytest.raises(ValueError, match=match):
        plan_set(long_records(2), SamplingConfig(), **kwargs)


def test_plan_set_refuses_a_manifest_without_a_usable_video():
    from dataclasses import replace

    from siasam_fast.pipeline.planner import plan_set

    records = {k: replace(r, status="corrupt") for k, r in long_records(2).items()}
    with pytest.raises(ValueError, match="no usable video"):
        plan_set(records, SamplingConfig())


def test_plan_of_an_empty_manifest_says_it_is_empty(tmp_path, capsys):
    """It said 'every one is corrupt' of a manifest that holds no video, and named no file."""
    from siasam_fast.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["plan", str(empty)]) == 2
    assert f"manifest {empty} holds no videos" in capsys.readouterr().err
