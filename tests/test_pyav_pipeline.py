"""The PyAV pipeline: exact frames by pts, transforms, the batch contract, sharding and resume."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from videos import index_image, read_index, read_indices, video_path, write_index_video

from siasam_fast.data.examples import QAExample
from siasam_fast.pipeline.dataset import (
    ShardedSampler,
    VideoQADataset,
    build_loader,
    collate_videos,
    resharded_position,
    segment_frames,
)
from siasam_fast.pipeline.manifest import build_manifest
from siasam_fast.pipeline.pyav_decode import DecodeError, DecodeStats, decode_frames
from siasam_fast.pipeline.transforms import (
    denormalize,
    resized_shape,
    video_transform,
)
from siasam_fast.sampling import (
    SamplingConfig,
    example_rng,
    sample_eval_clips,
    sample_siamese_clips,
)

SIZE = 32
# name -> (codec, frames, writer options)
VIDEOS = {
    "h264": ("h264", 160, dict(gop=12, bframes=2)),
    "h264_vfr": ("h264", 120, dict(gop=10, bframes=3, vfr=True)),
    "vp9": ("vp9", 100, dict(gop=10)),
    "vp9_vfr": ("vp9", 90, dict(gop=8, vfr=True)),
    "mjpeg": ("mjpeg", 80, {}),
    "short": ("h264", 30, dict(gop=12)),  # fits 9 clips x 6 frames at stride 4, not 8 frames
    "tiny": ("h264", 10, dict(gop=12)),
}
CFG = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    for name, (codec, n, options) in VIDEOS.items():
        write_index_video(video_path(folder, name, codec), n, codec=codec, size=SIZE, **options)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return build_manifest(folder, folder / "manifest.jsonl", workers=1, progress=False)


def examples_for(names, **kwargs):
    return [
        QAExample(qid=f"q{i}", video_id=v, question="what?", **kwargs) for i, v in enumerate(names)
    ]


def check_batch_frames(batch, dedup=True):
    """Every real clip frame shows the frame number in frame_ids; frames hold the sorted U
    (``dedup``) or every clip frame in clip order."""
    V, N, B = batch["clip_index"].shape
    for v in range(V):
        u = int(batch["num_unique"][v])
        ids = read_indices(denormalize(batch["frames"][v, :u]))
        real = batch["frame_ids"][v][batch["frame_mask"][v]].tolist()
        assert ids == (sorted(set(real)) if dedup else real)
        for n in range(N):
            for b in range(B):
                if not batch["frame_mask"][v, n, b]:
                    continue
                want = int(batch["frame_ids"][v, n, b])
                assert ids[int(batch["clip_index"][v, n, b])] == want
                if "clips" in batch:
                    assert read_index(denormalize(batch["clips"][v, n, b])) == want


# -- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["h264", "h264_vfr", "vp9", "vp9_vfr", "mjpeg"])
def test_decode_returns_exactly_the_sampled_frames(manifest, name):
    record = manifest[name]
    assert record.ok and record.num_frames == VIDEOS[name][1]
    rng = np.random.default_rng(0)
    for trial in range(12):
        clips = sample_siamese_clips(record.num_frames, CFG, example_rng(0, trial, 0))
        stats = DecodeStats()
        frames = decode_frames(record, clips.unique, stats=stats)
        assert frames.dtype == np.uint8 and frames.shape == (len(clips.unique), SIZE, SIZE, 3)
        assert read_indices(frames) == clips.unique.tolist()
        assert stats.seek_targets == sorted(set(stats.seek_targets)), "a seek went backwards"
        wanted = np.unique(rng.integers(0, record.num_frames, rng.integers(1, 30)))
        assert read_indices(decode_frames(record, wanted)) == wanted.tolist()


def test_decode_seeks_forward_only_and_skips_what_it_can(manifest):
    record = manifest["h264"]  # keyframes every 12 frames, B-frames
    assert record.keyframes[:4] == [0, 12, 24, 36]
    stats = DecodeStats()
    decode_frames(record, [150], stats=stats)
    assert stats.seek_targets == [144] and stats.decoded < 12  # not decoded from the start
    stats = DecodeStats()
    decode_frames(record, [1, 3, 5, 40, 41, 100, 130, 159], stats=stats)
    assert stats.seek_targets == [36, 96, 120, 156]
    stats = DecodeStats()
    decode_frames(record, [0, 5, 13], stats=stats)  # close ahead: no seek at all
    assert stats.seeks == 0 and stats.decoded == 14
    stats = DecodeStats()
    decode_frames(record, [0, 150], stats=stats, seek_threshold=10**6)  # never seek
    assert stats.seeks == 0 and stats.decoded == 151


def test_decode_rejects_bad_requests(manifest):
    record = manifest["h264"]
    with pytest.raises(ValueError, match="sorted and unique"):
        decode_frames(record, [5, 3])
    with pytest.raises(ValueError, match="valid frames are 0..159"):
        decode_frames(record, [0, 160])
    with pytest.raises(ValueError, match="only manifest records with status 'ok'"):
        decode_frames(manifest["broken"], [0])
    assert decode_frames(record, []).shape == (0, SIZE, SIZE, 3)


def test_decode_detects_a_stale_manifest(manifest):
    from dataclasses import replace

    stale = replace(manifest["short"], num_frames=40)
    with pytest.raises(DecodeError, match="stream ended"):
        decode_frames(stale, [35])


def test_decode_rejects_repeated_and_negative_frames(manifest):
    record = manifest["h264"]
    with pytest.raises(ValueError, match="sorted and unique"):
        decode_frames(record, [3, 3])
    with pytest.raises(ValueError, match="valid frames are 0..159"):
        decode_frames(record, [-1, 3])
    assert decode_frames(record, [], convert=lambda frame: frame) == []


def test_decode_seek_threshold_bounds(manifest):
    """A keyframe exactly ``seek_threshold`` frames ahead is decoded up to, farther is sought; a
    wanted keyframe is sought itself, not the one before it; 0 is a valid threshold."""
    record = manifest["h264"]  # keyframes every 12 frames
    stats = DecodeStats()
    assert read_indices(decode_frames(record, [13], stats=stats, seek_threshold=12)) == [13]
    assert stats.seeks == 0 and stats.returned == 1
    stats = DecodeStats()
    assert read_indices(decode_frames(record, [13], stats=stats, seek_threshold=11)) == [13]
    assert stats.seek_targets == [12]
    stats = DecodeStats()
    assert read_indices(decode_frames(record, [0, 144], stats=stats)) == [0, 144]
    assert stats.seek_targets == [144] and stats.returned == 2
    stats = DecodeStats()
    wanted = [2, 30, 31, 90]
    assert read_indices(decode_frames(record, wanted, stats=stats, seek_threshold=0)) == wanted
    assert stats.seek_targets == [24, 84]
    with pytest.raises(ValueError, match="seek_threshold=-1: must be >= 0"):
        decode_frames(record, [5], seek_threshold=-1)


class _Container:
    """A PyAV input container whose seeks land one keyframe late (``late_seek``: an imprecise
    index) or whose decoder outputs frame ``repeat`` twice (a repeated timestamp)."""

    def __init__(self, container, keyframe_pts, late_seek=False, repeat=None):
        self.container, self.keyframe_pts = container, list(keyframe_pts)
        self.late_seek, self.repeat = late_seek, repeat
        self.streams = container.streams

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def seek(self, pts, **kwargs):
        if self.late_seek:
            pts = self.keyframe_pts[self.keyframe_pts.index(pts) + 1]
        return self.container.seek(pts, **kwargs)

    def decode(self, stream):
        for n, frame in enumerate(self.container.decode(stream)):
            yield frame
            if n == self.repeat:
                yield frame


def test_decode_starts_again_when_a_seek_lands_past_the_wanted_frame(manifest, monkeypatch):
    from siasam_fast.pipeline import pyav_decode

    record, open_video = manifest["h264"], pyav_decode.open_video
    monkeypatch.setattr(pyav_decode, "open_video", lambda path: _Container(
        open_video(path), record.keyframe_pts, late_seek=True))
    stats = DecodeStats()
    assert read_indices(decode_frames(record, [40, 41, 100], stats=stats)) == [40, 41, 100]
    assert stats.restarts == 1 and stats.seek_targets == [36]
    assert stats.decoded > 100  # the second pass decoded from the start, without seeking


def test_decode_refuses_repeated_timestamps(manifest, monkeypatch):
    from siasam_fast.pipeline import pyav_decode

    record, open_video = manifest["h264"], pyav_decode.open_video
    monkeypatch.setattr(pyav_decode, "open_video", lambda path: _Container(
        open_video(path), record.keyframe_pts, repeat=4))
    with pytest.raises(DecodeError, match="timestamps not increasing"):
        decode_frames(record, [8], seek_threshold=10**6)


def test_decode_detects_keyframes_the_manifest_numbers_otherwise(manifest):
    """A keyframe met while decoding forward at another frame number than the manifest's: the
    manifest is stale (the frames would be numbered wrong), refused."""
    from dataclasses import replace

    record = manifest["h264"]
    stale = replace(record, keyframes=[0] + [k + 1 for k in record.keyframes[1:]])
    with pytest.raises(DecodeError, match="manifest is stale"):
        decode_frames(stale, [20], seek_threshold=10**6)


def test_a_size_of_zero_in_the_manifest_means_unknown(manifest):
    from dataclasses import replace

    from siasam_fast.pipeline.pyav_decode import file_change

    record = manifest["h264"]
    assert file_change(record.path, 0) is None
    assert file_change(record.path, record.size + 1).startswith("changed since")
    assert read_indices(decode_frames(replace(record, size=0), [3])) == [3]


# -- transforms --------------------------------------------------------------------------------


def test_resized_shape():
    assert resized_shape(240, 320, 224) == (224, 299)
    assert resized_shape(720, 1280, 224) == (224, 398)
    assert resized_shape(320, 240, 224) == (299, 224)
    assert resized_shape(64, 64, 32) == (32, 32)
    # rounded to nearest both ways: 325 * 224 / 240 = 303.33 -> 303 (not 304)
    assert resized_shape(325, 240, 224) == (303, 224)
    assert resized_shape(240, 325, 224) == (224, 303)


def test_transform_resize_crop_normalise():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    flat = np.full((2, 48, 64, 3), (30, 120, 200), np.uint8)
    out = video_transform(flat, 24, mean, std)
    assert out.shape == (2, 3, 24, 24) and out.dtype == torch.float32 and out.is_contiguous()
    for c, value in enumerate((30, 120, 200)):
        torch.testing.assert_close(
            out[:, c], torch.full((2, 24, 24), (value / 255 - mean[c]) / std[c]), atol=1e-5, rtol=0
        )
    # A 48 x 64 frame: shorter side 48 -> 24, longer 64 -> 32, centre crop columns 4..28.
    ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 64, 3))
    out = denormalize(video_transform(ramp[None].copy(), 24)[0])
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(ramp.copy()).permute(2, 0, 1)[None].float(),
        size=(24, 32),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0, :, :, 4:28]
    assert (out - ref).abs().max() <= 1.01  # uint8 resize: within one grey level


def test_transform_gives_the_dtype_asked_for():
    frames = np.full((2, 40, 30, 3), (30, 120, 200), np.uint8)
    reference = video_transform(frames, 16)
    for dtype in (torch.float16, torch.bfloat16):
        out = video_transform(frames, 16, dtype=dtype)
        assert out.dtype == dtype and out.shape == (2, 3, 16, 16)
        torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=0)
    assert video_transform(frames[:0], 16, dtype=torch.float16).dtype == torch.float16


def test_transform_refuses_an_image_size_below_one():
    from siasam_fast.pipeline.transforms import frame_resizer

    frames = np.zeros((1, 8, 8, 3), np.uint8)
    for call in (lambda: video_transform(frames, 0), lambda: frame_resizer(0)):
        with pytest.raises(ValueError, match="image_size=0: must be >= 1"):
            call()


def test_transform_keeps_the_index_code():
    frames = np.stack([index_image(i, 64, 64) for i in (0, 1, 777, 65535)])
    out = video_transform(frames, 32)
    assert read_indices(denormalize(out)) == [0, 1, 777, 65535]


# -- dataset and batch contract -----------------------------------------------------------------


@pytest.mark.parametrize("placement", ["siamese", "sparse"])
def test_batch_matches_the_sampler(manifest, placement):
    cfg = SamplingConfig(**{**CFG.__dict__, "placement": placement})
    names = ["h264", "h264_vfr", "vp9", "mjpeg"]
    loader = build_loader(
        examples_for(names),
        manifest,
        cfg,
        "train",
        batch_size=2,
        image_size=SIZE,
        num_workers=0,
        seed=3,
        epoch=5,
        output="clips",
    )
    seen = []
    for batch in loader:
        assert batch["frames"].shape[2:] == (3, SIZE, SIZE)
        assert batch["clips"].shape[:3] == batch["clip_index"].shape
        check_batch_frames(batch)
        for v, index in enumerate(batch["example_index"].tolist()):
            record = manifest[names[index]]
            expected = sample_siamese_clips(record.num_frames, cfg, example_rng(3, 5, index))
            assert batch["frame_ids"][v].tolist() == expected.clips.tolist()
            assert batch["clip_index"][v].tolist() == expected.inverse.tolist()
            assert int(batch["num_unique"][v]) == len(expected.unique)
            seen.append(index)
    assert sorted(seen) == [0, 1, 2, 3]


def test_dedup_off_gives_the_same_clips(manifest):
    names = ["h264", "vp9_vfr", "mjpeg"]
    kwargs = dict(batch_size=3, image_size=SIZE, num_workers=0, seed=1, output="clips")
    examples = examples_for(names)
    on = next(iter(build_loader(examples, manifest, CFG, "train", **kwargs)))
    off = next(iter(build_loader(examples, manifest, CFG, "train", dedup=False, **kwargs)))
    assert torch.equal(on["frame_ids"], off["frame_ids"])
    assert torch.equal(on["clips"], off["clips"])
    assert off["num_unique"].tolist() == [CFG.num_clips * 8] * 3
    assert (on["num_unique"] < off["num_unique"]).all()
    assert off["clip_index"][0].flatten().tolist() == list(range(72))
    check_batch_frames(off, dedup=False)


def test_padding_and_masks_with_a_range_of_frames_per_clip(manifest):
    cfg = SamplingConfig(num_clips=9, frames_per_clip=(4, 8), stride=4)
    loader = build_loader(
        examples_for(["h264", "short"]),
        manifest,
        cfg,
        "train",
        batch_size=2,
        image_size=SIZE,
        num_workers=0,
        shuffle=False,
        output="clips",
    )
    batch = next(iter(loader))
    assert batch["clip_index"].shape == (2, 9, 8)
    assert batch["frame_mask"][0].all()
    assert batch["frame_mask"][1, :, :6].all() and not batch["frame_mask"][1, :, 6:].any()
    assert batch["clip_mask"].all()
    assert (batch["clip_index"][1, :, 6:] == 0).all()
    assert (batch["frame_ids"][1, :, 6:] == -1).all()
    assert (batch["clips"][1, :, 6:] == 0).all()
    u = int(batch["num_unique"][1])
    assert u < int(batch["num_unique"][0]) and (batch["frames"][1, u:] == 0).all()
    check_batch_frames(batch)


def test_collate_pads_a_varying_number_of_clips():
    def item(n, b, u):
        return {
            "frames": torch.ones(u, 3, 4, 4),
            "clip_index": torch.zeros(n, b, dtype=torch.long),
            "frame_ids": torch.zeros(n, b, dtype=torch.long),
            "example_index": 0,
            "answer_index": -1,
            "label": -1,
            "count": math.nan,
            "video_id": "v",
            "qid": "q",
            "question": "?",
            "question_type": "",
            "task": "open",
            "answer": "",
            "candidates": [],
        }

    batch = collate_videos([item(3, 2, 5), item(1, 4, 2)], output="clips")
    assert batch["clip_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["frame_mask"].sum().item() == 3 * 2 + 4
    assert batch["clips"].shape == (2, 3, 4, 3, 4, 4)
    with pytest.raises(ValueError, match="valid outputs are frames, clips"):
        collate_videos([item(1, 1, 1)], output="pixels")


def test_eval_mode_uses_the_evaluation_clips(manifest):
    cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4, eval_clips=2)
    loader = build_loader(
        examples_for(["h264", "vp9"]),
        manifest,
        cfg,
        "val",
        batch_size=2,
        image_size=SIZE,
        num_workers=0,
    )
    batch = next(iter(loader))
    assert batch["example_index"].tolist() == [0, 1]  # no shuffle for evaluation
    for v, name in enumerate(["h264", "vp9"]):
        expected = sample_eval_clips(manifest[name].num_frames, cfg)
        assert batch["frame_ids"][v].tolist() == expected.clips.tolist()
    check_batch_frames(batch)


def test_eval_clips_that_share_frames_are_counted_and_reported(manifest, caplog):
    """eval.num_clips larger than a video holds: clips overlap, the videos are kept, and the run
    says how many videos that hits."""
    cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4, eval_clips=4)
    names = ["h264", "short", "tiny"]  # 160, 30 and 10 frames: 4 x 8 frames fit only the first
    with caplog.at_level("WARNING", logger="siasam_fast.pipeline.dataset"):
        ds = VideoQADataset(examples_for(names), manifest, cfg, split="val", image_size=SIZE)
    assert len(ds) == 3 and ds.overlapping_eval_videos == 2
    assert "eval.num_clips=4: 2 of 3 videos are too short" in caplog.text
    assert "shortest: 10 frames" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="siasam_fast.pipeline.dataset"):
        ds = VideoQADataset(examples_for(["h264"]), manifest, cfg, split="val", image_size=SIZE)
    assert ds.overlapping_eval_videos == 0 and "too short" not in caplog.text
    train = VideoQADataset(examples_for(names), manifest, cfg, split="train", image_size=SIZE)
    assert train.overlapping_eval_videos == 0


def test_eval_clips_that_share_frames_count_videos_not_questions(manifest, caplog):
    """Several questions on one video (MSRVTT-QA has about 4 per test video) count the video
    once; How2QA-style segments of one video count as segments; the questions are counted too."""
    cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4, eval_clips=4)
    names = ["h264", "h264", "short", "short", "short", "tiny"]  # 160, 30 and 10 frames
    with caplog.at_level("WARNING", logger="siasam_fast.pipeline.dataset"):
        ds = VideoQADataset(examples_for(names), manifest, cfg, split="val", image_size=SIZE)
    assert len(ds) == 6 and ds.overlapping_eval_videos == 2
    assert "2 of 3 videos are too short for 4 clips" in caplog.text, caplog.text
    assert "4 of 6 questions" in caplog.text, caplog.text
    caplog.clear()
    # Two segments of h264 (160 frames): [0, 1) s is short, [0, 100) s the whole video.
    segments = [QAExample(qid=f"s{i}", video_id="h264", question="what?", start=0.0, end=end)
                for i, end in enumerate([1.0, 1.0, 100.0])]
    with caplog.at_level("WARNING", logger="siasam_fast.pipeline.dataset"):
        ds = VideoQADataset(segments, manifest, cfg, split="val", image_size=SIZE)
    assert ds.overlapping_eval_videos == 1
    assert "1 of 2 video segments are too short for 4 clips" in caplog.text, caplog.text
    assert "2 of 3 questions" in caplog.text, caplog.text


def test_close_loaders_ends_the_workers_at_once(manifest):
    """Workers that defer SIGTERM (training's loaders) are ended by close_loaders(), as a failing
    run does on its way out, instead of outliving their main process's exit."""
    from siasam_fast.pipeline.dataset import close_loaders

    loader = build_loader(examples_for(["h264", "vp9"]), manifest, CFG, "train", batch_size=1,
                          image_size=SIZE, num_workers=2, defer_stop_signals=True)
    next(iter(loader))
    workers = list(loader._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    close_loaders()
    assert loader._iterator is None and not any(w.is_alive() for w in workers)
    assert len(list(loader)) == 2  # a later pass starts new workers


def test_segments_restrict_sampling(manifest):
    record = manifest["h264"]  # 25 fps, 160 frames
    ex = QAExample(
        qid="a",
        video_id="h264",
        question="?",
        task="mc",
        start=2.0,
        end=4.4,
        candidates=["x", "y"],
        answer_index=1,
    )
    assert segment_frames(ex, record) == (50, 60)
    late = QAExample(qid="b", video_id="h264", question="?", start=100.0, end=110.0)
    assert segment_frames(late, record).startswith("segment empty: [100.0 s, 110.0 s] is outside")
    open_end = QAExample(qid="c", video_id="h264", question="?", start=100.0)  # (ask --start)
    assert segment_frames(open_end, record).startswith("segment empty: [100.0 s, end] is outside")
    ds = VideoQADataset([ex, late], manifest, CFG, "train", image_size=SIZE)
    assert len(ds) == 1 and ds.dropped[0][2].startswith("segment empty")
    for epoch in range(5):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["frame_ids"].min() >= 50 and item["frame_ids"].max() < 110
        unique = sorted(set(item["frame_ids"].flatten().tolist()))
        assert read_indices(denormalize(item["frames"])) == unique
    assert item["candidates"] == ["x", "y"] and item["answer_index"] == 1


def test_keyframe_aware_sampling_in_a_segment_uses_the_videos_keyframes(manifest):
    """A segment starting mid-GOP (frame 50; keyframes every 12 frames): with keyframe_max_shift
    covering a GOP, every group starts on one of the video's keyframes, or at the segment's start
    (its keyframe, 48, lies before it)."""
    record = manifest["h264"]
    ex = QAExample(qid="a", video_id="h264", question="?", start=2.0, end=4.4)
    cfg = SamplingConfig(num_clips=3, frames_per_clip=4, stride=4, keyframe_max_shift=11)
    ds = VideoQADataset([ex], manifest, cfg, "train", image_size=SIZE)
    starts = set()
    for epoch in range(20):
        starts.add(int(ds.plan((epoch, 0)).clips.clips.min()))
    assert starts <= {50} | set(record.keyframes) and starts - {50}, starts


def test_bad_examples_are_dropped_at_construction(manifest, caplog):
    cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4, short_video="skip")
    names = ["h264", "broken", "nowhere", "tiny", "vp9"]
    with caplog.at_level("WARNING"):
        ds = VideoQADataset(examples_for(names), manifest, cfg, "train", image_size=SIZE)
    assert ds.indices == [0, 4]
    reasons = {qid: reason for _, qid, reason in ds.dropped}
    assert reasons["q1"].startswith("video corrupt")
    assert reasons["q2"] == "video missing from the manifest"
    assert reasons["q3"].startswith("sampler skipped: video has 10 frames")
    assert "kept 2 of 5 examples; dropped 3" in caplog.text


def test_drop_log_names_an_example_and_its_reason(manifest, caplog):
    """The one log line about dropped examples is all a user sees before "the train split has no
    usable examples (see the log for the reasons)": it names, for each kind of reason, a question
    and its video with the full reason (the frame count against sampling.min_frames; the video id
    the manifest lacks, e.g. an ActivityNet id without its v_ prefix), not only the kind."""
    cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4, min_frames=40)
    names = ["short", "TIEzvhv6xaI", "mjpeg"]
    with caplog.at_level("WARNING"):
        VideoQADataset(examples_for(names), manifest, cfg, "train", image_size=SIZE)
    line = next(r.getMessage() for r in caplog.records if "dropped" in r.getMessage())
    assert "1 sampler skipped" in line and "1 video missing from the manifest" in line
    assert "fewer than min_frames=40" in line and "q0" in line
    assert "'TIEzvhv6xaI'" in line and "q1" in line


def test_nested_videos_are_found_by_file_name_unless_the_name_repeats(manifest):
    """A manifest of a folder with subfolders keys videos as ``sub/name``: an annotation's bare
    ``name`` finds its video when one subfolder holds it; a name in two subfolders finds neither,
    and the drop reason says why (not "missing")."""
    nested = {"train/h264": manifest["h264"], "a/vp9": manifest["vp9"], "b/vp9": manifest["vp9"]}
    cfg = SamplingConfig(num_clips=9, frames_per_clip=8, stride=4)
    ds = VideoQADataset(examples_for(["h264", "vp9", "nowhere"]), nested, cfg, "train",
                        image_size=SIZE)
    assert ds.indices == [0]
    reasons = {qid: reason for _, qid, reason in ds.dropped}
    assert reasons["q1"].startswith("video name in several subfolders")
    assert reasons["q2"] == "video missing from the manifest"


def test_an_id_written_otherwise_finds_its_video_or_says_how_it_differs(manifest):
    """An id in another Unicode form (a macOS copy writes "vide\u0301o" for the file "vidéo") or
    with its video's extension ("v1.mp4") names that video; one that differs only in case is
    not matched (a case-sensitive file system may hold both), and the drop reason names the
    near miss, which looked the same as "missing" before."""
    composed, decomposed = "vid\u00e9o", "vide\u0301o"
    videos = {f"sub/{composed}": manifest["h264"], "clip7": manifest["vp9"],
              "Video12": manifest["mjpeg"], "a/dup": manifest["h264"], "b/dup": manifest["vp9"]}
    cfg = SamplingConfig(num_clips=3, frames_per_clip=4, stride=4)
    ds = VideoQADataset(examples_for([decomposed, "clip7.MP4", "clip7.txt", "video12",
                                      "dup.mp4", f"sub/{decomposed}"]), videos, cfg, "train",
                        image_size=SIZE)
    assert ds.indices == [0, 1, 5]
    assert [r.path for r in ds.records] == [manifest["h264"].path, manifest["vp9"].path,
                                            manifest["h264"].path]
    reasons = {qid: reason for _, qid, reason in ds.dropped}
    assert reasons["q2"] == "video missing from the manifest"  # (.txt: not a video extension)
    assert reasons["q3"] == ("video missing from the manifest: no id 'video12', but 'Video12' "
                             "differs only in upper / lower case")
    assert reasons["q4"].startswith("video name in several subfolders")


def test_labels_and_text_pass_through(manifest):
    examples = [
        QAExample(qid="o", video_id="mjpeg", question="what?", answer="dog", question_type="what"),
        QAExample(qid="c", video_id="mjpeg", question="how many?", task="count", answer="3"),
    ]
    loader = build_loader(
        examples,
        manifest,
        CFG,
        "test",
        batch_size=2,
        image_size=SIZE,
        num_workers=0,
        label_fn=label_of,
    )
    batch = next(iter(loader))
    assert batch["label"].tolist() == [5, 9]
    assert batch["answer_index"].tolist() == [-1, -1]
    assert batch["count"][1].item() == 3.0 and math.isnan(batch["count"][0].item())
    assert batch["qid"] == ["o", "c"] and batch["question_type"] == ["what", ""]
    assert batch["task"] == ["open", "count"] and batch["candidates"] == [[], []]


def label_of(example):
    return len(example.question)


def test_unknown_backends_are_refused(manifest):
    args = (examples_for(["h264"]), manifest, CFG, "train", 1)
    with pytest.raises(ValueError, match="valid backends are pyav, dali, auto"):
        build_loader(*args, backend="opencv")
    with pytest.raises(ValueError, match="valid splits"):
        build_loader(examples_for(["h264"]), manifest, CFG, "training", 1)


# -- order: determinism, shards, resume --------------------------------------------------------

NAMES = ["h264", "h264_vfr", "vp9", "vp9_vfr", "mjpeg", "short"] * 2


def run_epoch(manifest, epoch, num_workers, rank=0, world_size=1, batch_size=3, **kwargs):
    loader = build_loader(
        examples_for(NAMES),
        manifest,
        CFG,
        "train",
        batch_size=batch_size,
        image_size=SIZE,
        num_workers=num_workers,
        seed=7,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        **kwargs,
    )
    return list(loader)


def test_deterministic_per_seed_epoch_rank_whatever_the_workers(manifest):
    serial = run_epoch(manifest, 2, num_workers=0, rank=1, world_size=2)
    parallel = run_epoch(manifest, 2, num_workers=2, rank=1, world_size=2)
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert a["example_index"].tolist() == b["example_index"].tolist()
        assert torch.equal(a["frame_ids"], b["frame_ids"])
        assert torch.equal(a["frames"], b["frames"])
    other = run_epoch(manifest, 3, num_workers=0, rank=1, world_size=2)
    assert [b["example_index"].tolist() for b in other] != [
        b["example_index"].tolist() for b in serial
    ]


def test_loader_epochs_with_persistent_workers(manifest):
    loader = build_loader(
        examples_for(NAMES),
        manifest,
        CFG,
        "train",
        batch_size=4,
        image_size=SIZE,
        num_workers=2,
        seed=7,
    )
    ids = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        ids[epoch] = torch.cat([b["frame_ids"].flatten() for b in loader]).tolist()
    assert ids[0] != ids[1]  # the workers saw the new epoch (it travels with the key)
    serial = run_epoch(manifest, 1, num_workers=0, batch_size=4)
    assert ids[1] == torch.cat([b["frame_ids"].flatten() for b in serial]).tolist()


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("num_examples, world_size", [(10, 3), (12, 4), (2, 3), (7, 1), (1, 3)])
def test_shards_are_disjoint_equal_and_cover(num_examples, world_size, drop_last):
    shards = [
        list(
            ShardedSampler(num_examples, seed=1, rank=r, world_size=world_size, drop_last=drop_last)
        )
        for r in range(world_size)
    ]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(flat) == len(set(flat)) == (num_examples // world_size) * world_size
    else:
        assert set(flat) == set(range(num_examples))
        assert len(flat) - len(set(flat)) == len(flat) - num_examples  # only the wrap repeats
        # the shards interleave the order, made equal by the start of the order again
        order = [shards[k % world_size][k // world_size] for k in range(len(flat))]
        assert order[num_examples:] == order[: len(flat) - num_examples]
    again = list(
        ShardedSampler(num_examples, seed=1, rank=0, world_size=world_size, drop_last=drop_last)
    )
    assert again == shards[0]


def test_sharded_loader_covers_the_dataset(manifest):
    seen = []
    for rank in range(3):
        for batch in run_epoch(manifest, 0, num_workers=0, rank=rank, world_size=3):
            seen += batch["example_index"].tolist()
    assert sorted(seen) == list(range(len(NAMES)))


def test_sampler_state_resumes_exactly():
    sampler = ShardedSampler(23, seed=4, rank=1, world_size=2)
    sampler.set_epoch(6)
    full = list(sampler)
    it = iter(sampler)
    head = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state["position"] == 5 and state["epoch"] == 6
    resumed = ShardedSampler(23, seed=4, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert list(resumed) == full  # the following pass starts the epoch again
    with pytest.raises(ValueError, match="seed=5"):
        ShardedSampler(23, seed=5, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="drop_last=False but this sampler has drop_last=True"):
        ShardedSampler(23, seed=4, rank=1, world_size=2, drop_last=True).load_state_dict(state)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="rewind to position=6: must be in 0..5"):
        resumed.rewind(6)  # only ever back
    resumed.rewind(2)
    assert list(resumed) == full[2:]


def test_set_epoch_keeps_a_restored_state_for_that_epoch():
    """A resumed run calls set_epoch with the restored epoch: the position stays; another epoch
    starts from its beginning."""
    sampler = ShardedSampler(23, seed=4, rank=1, world_size=2)
    sampler.set_epoch(6)
    full = list(sampler)
    resumed = ShardedSampler(23, seed=4, rank=1, world_size=2)
    resumed.load_state_dict({**sampler.state_dict(), "position": 5})
    resumed.set_epoch(6)
    assert list(resumed) == full[5:]
    resumed.load_state_dict({**sampler.state_dict(), "position": 5})
    resumed.set_epoch(7)
    assert resumed.position == 0 and len(list(resumed)) == len(full)


def test_failed_share_is_more_than_a_tenth_and_more_than_the_tries():
    from siasam_fast.pipeline.dataset import STAND_IN_TRIES, check_failed_share

    def failed(n):
        return {f"v{i}": "unreadable: gone" for i in range(n)}

    check_failed_share(failed(STAND_IN_TRIES), 10, "here")  # every video, but no more than tries
    check_failed_share(failed(17), 170, "here")  # exactly a tenth
    with pytest.raises(DecodeError, match="18 of the 170 videos failed at decode time in here"):
        check_failed_share(failed(18), 170, "here")
    with pytest.raises(DecodeError, match=f"{STAND_IN_TRIES + 1} of the 10 videos"):
        check_failed_share(failed(STAND_IN_TRIES + 1), 10, "here")


@settings(max_examples=200, deadline=None)
@given(num_examples=st.integers(1, 40), old_world=st.integers(1, 5), new_world=st.integers(1, 5),
       drop_last=st.booleans(), cut=st.floats(0, 1), epoch=st.integers(0, 3),
       align=st.integers(1, 4))
def test_sampler_state_resumes_on_another_number_of_processes(num_examples, old_world, new_world,
                                                              drop_last, cut, epoch, align):
    """A run stopped at a position of every old shard and resumed on ``new_world`` processes
    gives every example of the epoch that the old shards had not given yet, skips none, starts
    at a multiple of ``align`` (a step's examples), and gives again fewer than
    ``new_world x align`` of those already given."""
    old = [ShardedSampler(num_examples, seed=3, rank=r, world_size=old_world, drop_last=drop_last)
           for r in range(old_world)]
    length = len(old[0])
    position = round(cut * length)
    given_before = []
    for sampler in old:
        sampler.set_epoch(epoch)
        it = iter(sampler)
        given_before += [next(it) for _ in range(position)]
    state = old[0].state_dict()
    assert all(s.state_dict()["position"] == position for s in old)
    after = []
    for r in range(new_world):
        new = ShardedSampler(num_examples, seed=3, rank=r, world_size=new_world,
                             drop_last=drop_last)
        new.load_state_dict({**state, "rank": r}, align)
        assert new.epoch == epoch
        if old_world == new_world:  # the same shards: exactly where they stopped
            assert new.position == position
        else:
            assert new.position % align == 0 or new.position == len(new)
        after += list(new)
    if position == length > 0:  # a complete epoch stays complete
        assert after == []
        return
    fresh = [ShardedSampler(num_examples, seed=3, rank=r, world_size=new_world,
                            drop_last=drop_last) for r in range(new_world)]
    # The epoch's examples on new_world processes (all of them unless drop_last drops a tail).
    target = {i for sampler in fresh for i in sampler.shard(epoch).tolist()}
    missing = target - set(given_before) - set(after)
    assert not missing, f"skipped {sorted(missing)}"
    # Given more than once: fewer than new_world x align at the cut, plus the wrap-around.
    extra = len(after) - len(target - set(given_before))
    wrap = max(0, len(fresh[0]) * new_world - num_examples)
    assert extra <= new_world * align - 1 + wrap, (extra, position)


def test_resharded_position_refuses_a_position_past_the_shard():
    with pytest.raises(ValueError, match="position=9: must be in 0..8"):
        resharded_position(9, 3, 2, 23, False)


def test_loader_resume_continues_with_the_remaining_examples(manifest):
    kwargs = dict(batch_size=2, image_size=SIZE, seed=7, num_workers=2)
    loader = build_loader(examples_for(NAMES), manifest, CFG, "train", epoch=1, **kwargs)
    full = [b["example_index"].tolist() for b in loader]
    it = iter(loader)
    first = [next(it) for _ in range(2)]  # the workers have prefetched more than this
    state = loader.state_dict()
    assert state["position"] == 4 and state["epoch"] == 1
    del it
    resumed = build_loader(examples_for(NAMES), manifest, CFG, "train", epoch=0, **kwargs)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["example_index"].tolist() for b in first + rest] == full
    assert resumed.state_dict()["position"] == len(NAMES)
    reference = run_epoch(manifest, 1, num_workers=0, batch_size=2)[2]
    assert torch.equal(rest[0]["frame_ids"], reference["frame_ids"])


# -- faults at decode time ---------------------------------------------------------------------


@pytest.fixture
def own_videos(tmp_path):
    """Three videos of their own and their manifest: the tests below damage files."""
    for name in ("h264", "vp9", "mjpeg"):
        codec, n, options = VIDEOS[name]
        write_index_video(video_path(tmp_path, name, codec), n, codec=codec, size=SIZE, **options)
    return tmp_path, build_manifest(tmp_path, tmp_path / "manifest.jsonl", workers=1,
                                    progress=False)


def test_decode_refuses_a_file_rewritten_since_indexing(own_videos):
    """A re-encoded file (a frame fewer, keyframes where they were) decoded to shifted frames
    silently: a file whose size differs from the manifest's is refused, naming it."""
    folder, manifest = own_videos
    path = video_path(folder, "h264", "h264")
    write_index_video(path, 159, codec="h264", size=SIZE, gop=12, bframes=2)
    assert path.stat().st_size != manifest["h264"].size
    with pytest.raises(DecodeError, match=f"{path}: changed since the manifest was built"):
        decode_frames(manifest["h264"], [33, 41])
    path.unlink()
    with pytest.raises(DecodeError, match=f"{path}: unreadable"):
        decode_frames(manifest["h264"], [33, 41])


def test_copied_videos_with_new_modification_times_still_decode(own_videos, tmp_path_factory):
    """`cp -r` gives new mtimes: the sizes match, so nothing is refused (both backends)."""
    import shutil

    from siasam_fast.pipeline.manifest import load_manifest

    folder, _ = own_videos
    moved = tmp_path_factory.mktemp("moved")
    for path in folder.iterdir():
        shutil.copy(path, moved / path.name)  # not copy2: new modification times
    manifest = load_manifest(folder / "manifest.jsonl", video_dir=moved)
    loader = build_loader(examples_for(["h264", "vp9", "mjpeg"]), manifest, CFG, "train",
                          batch_size=3, image_size=SIZE, num_workers=0)
    (batch,) = list(loader)
    assert not batch["stand_in"].any()
    check_batch_frames(batch)


def test_damaged_videos_get_stand_ins_and_every_rank_keeps_its_batches(own_videos, caplog):
    """A file damaged after indexing no longer stops training: its examples get stand-ins (the
    next example whose video decodes), every batch stays full and every rank yields len(loader)
    batches (one that yielded fewer would hang the others' collectives)."""
    folder, manifest = own_videos
    damaged = video_path(folder, "vp9", "vp9")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    names = ["vp9", "h264", "mjpeg"] * 3
    for workers in (0, 2):
        for world in (1, 2):
            counts = []
            for rank in range(world):
                loader = build_loader(examples_for(names), manifest, CFG, "train", batch_size=2,
                                      image_size=SIZE, num_workers=workers, rank=rank,
                                      world_size=world, shuffle=False)
                with caplog.at_level("WARNING", logger="siasam_fast.pipeline.dataset"):
                    batches = list(loader)
                counts.append(len(batches))
                assert len(batches) == len(loader)
                for batch in batches:
                    check_batch_frames(batch)
                    assert "vp9" not in batch["video_id"]
                    shown = [v for v, s in zip(batch["video_id"], batch["stand_in"]) if s]
                    assert shown and set(shown) <= {"h264", "mjpeg"} or not shown
                stand_ins = sum(int(b["stand_in"].sum()) for b in batches)
                assert stand_ins == sum(1 for p in loader.sampler.shard() if names[p] == "vp9")
            assert len(set(counts)) == 1
    assert f"video {damaged} failed" in caplog.text


def test_evaluation_leaves_a_damaged_video_out_without_counting_a_stand_in_twice(own_videos):
    folder, manifest = own_videos
    damaged = video_path(folder, "mjpeg", "mjpeg")
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # same size: only decoding can tell
    loader = build_loader(examples_for(["h264", "mjpeg", "vp9"]), manifest, CFG, "val",
                          batch_size=3, image_size=SIZE, num_workers=0)
    (batch,) = list(loader)
    assert batch["example_index"].tolist() == [0, 2, 2]  # mjpeg's stand-in: the next, vp9
    assert batch["stand_in"].tolist() == [False, True, False]
    assert set(batch["example_index"].tolist()) == {0, 2}  # scored once each by example_index


def test_when_every_stand_in_fails_too_the_loader_says_so(own_videos):
    folder, manifest = own_videos
    for path in folder.glob("*.*"):
        if path.suffix != ".jsonl":
            path.unlink()
    loader = build_loader(examples_for(["h264", "vp9", "mjpeg"]), manifest, CFG, "train",
                          batch_size=3, image_size=SIZE, num_workers=0, shuffle=False)
    with pytest.raises(DecodeError, match=r"failed, and no other video could stand in for it "
                                          r"\(0 more decoded without success; 3 video\(s\) "
                                          r"failed in this process: 3 unreadable\)"):
        list(loader)


def test_stand_in_tries_are_counted_with_the_failed_video(own_videos, monkeypatch):
    """At most STAND_IN_TRIES videos decoded for one example, the failed one included."""
    from siasam_fast.pipeline import dataset as dataset_module

    folder, manifest = own_videos
    for name, codec in (("h264", "h264"), ("vp9", "vp9")):
        path = video_path(folder, name, codec)
        path.write_bytes(b"\0" * path.stat().st_size)  # same size: only decoding can tell
    monkeypatch.setattr(dataset_module, "STAND_IN_TRIES", 2)
    loader = build_loader(examples_for(["h264", "vp9", "mjpeg"]), manifest, CFG, "train",
                          batch_size=1, image_size=SIZE, num_workers=0, shuffle=False)
    with pytest.raises(DecodeError, match=r"no other video could stand in for it \(1 more "
                                          r"decoded without success"):
        list(loader)


def test_a_tag_that_is_not_utf8_is_no_fault(own_videos):
    """A Latin-1 byte in a metadata tag made the probe mark a good file corrupt, and decoding
    raise a UnicodeDecodeError without the file's name."""
    from siasam_fast.pipeline.manifest import probe_video

    folder, manifest = own_videos
    path = video_path(folder, "h264", "h264")
    data = path.read_bytes()
    at = data.find(b"Lavf")
    assert at > 0
    path.write_bytes(data[:at] + b"Caf\xe9" + data[at + 4:])
    record = probe_video(path, folder)
    assert record.ok, record.reason
    assert read_indices(decode_frames(record, [3, 40])) == [3, 40]


def test_open_video_gives_metadata_errors_only_to_pyav_before_19(monkeypatch):
    """PyAV 19 (the newest on Python 3.12) removed av.open's metadata_errors: a TypeError for every
    probe, so every video was marked corrupt. This machine's PyAV is older: both sides, faked."""
    import av

    from siasam_fast.pipeline.manifest import open_video

    calls = []
    monkeypatch.setattr(av, "open", lambda file, **kwargs: calls.append((file, kwargs)))
    for version, kwargs in (("19.0.2", {}), ("20.1.0", {}),
                            ("18.1.0", {"metadata_errors": "ignore"}),
                            ("12.3.0", {"metadata_errors": "ignore"})):
        monkeypatch.setattr(av, "__version__", version)
        open_video("v.mp4")
        assert calls.pop() == ("v.mp4", kwargs), version


def test_segments_use_the_measured_rate_and_name_a_reversed_span(manifest):
    from dataclasses import replace

    record = replace(manifest["h264"], fps=50.0)  # a nominal rate twice the real one
    ex = QAExample(qid="a", video_id="h264", question="?", start=2.0, end=4.4)
    assert segment_frames(ex, record) == (50, 60)  # 160 frames over 6.4 s: 25 per second
    reversed_span = QAExample(qid="b", video_id="h264", question="?", start=4.0, end=2.0)
    assert segment_frames(reversed_span, record) == (
        "segment empty: it ends (2.0 s) before it starts (4.0 s)")


def test_segments_ending_well_after_their_video_are_kept_cut_and_counted(manifest, caplog):
    """A How2QA segment [10 s, 60 s] of a 6.4 s download was cut to the video's end without a
    word: its question is about content the file may lack (another, shorter download)."""
    cfg = SamplingConfig(num_clips=3, frames_per_clip=4, stride=4)
    examples = [QAExample(qid=q, video_id="h264", question="?", start=start, end=end)
                for q, start, end in (("in", 1.0, 6.4), ("near", 1.0, 7.3), ("far", 2.0, 60.0),
                                      ("open", 2.0, None), ("far2", 0.0, 9.0))]
    with caplog.at_level("WARNING"):
        ds = VideoQADataset(examples, manifest, cfg, "train", image_size=SIZE)
    assert ds.indices == [0, 1, 2, 3, 4] and ds.segments[2] == (50, 110)  # kept, cut
    assert ds.segments_past_end == 2  # more than 1 s after the end of the 6.40 s video
    assert ("train: 2 question(s) have a segment ending more than 1 s after their video's end "
            "(e.g. qid far, video 'h264': [2.0 s, 60.0 s] of a 6.40 s video)") in caplog.text


def test_a_zero_length_segment_is_the_frame_at_its_time():
    """How2QA's official CSVs hold instants such as [0.0:0.0], [60.0:60.0] and [121.56:121.56]: the
    question is about the frame shown then, not an empty segment (it was dropped, so evaluation
    left it out of the accuracy, with a reason that called it outside the video)."""
    from siasam_fast.pipeline.manifest import VideoRecord

    record = VideoRecord(video_id="v", path="v.mp4", relpath="v.mp4", status="ok",
                         num_frames=7200, fps=30.0, duration=240.0)
    at = QAExample(qid="a", video_id="v", question="?", start=60.0, end=60.0)
    assert segment_frames(at, record) == (1800, 1)  # 60 s x 30 fps: frame 1800
    off = QAExample(qid="b", video_id="v", question="?", start=121.56, end=121.56)
    assert segment_frames(off, record) == (3646, 1)
    first = QAExample(qid="d", video_id="v", question="?", start=0.0, end=0.0)
    assert segment_frames(first, record) == (0, 1)  # [0.0:0.0]: several in how2QA_val_release
    late = QAExample(qid="c", video_id="v", question="?", start=300.0, end=300.0)
    assert "segment empty" in segment_frames(late, record)  # past the end: still empty


def test_a_video_with_many_consecutive_questions_gets_stand_ins(own_videos):
    """MSRVTT-QA lists a video's ~20 questions one after another: its failed video used up every
    try on its own other questions, and the run stopped."""
    folder, manifest = own_videos
    video_path(folder, "h264", "h264").unlink()
    names = ["h264"] * 20 + ["vp9"] * 4 + ["mjpeg"] * 4
    loader = build_loader(examples_for(names), manifest, CFG, "train", batch_size=4,
                          image_size=SIZE, num_workers=0, shuffle=False)
    batches = list(loader)
    assert len(batches) == 7
    assert sum(int(b["stand_in"].sum()) for b in batches) == 20
    assert "h264" not in [v for b in batches for v in b["video_id"]]


def test_stand_ins_do_not_depend_on_the_workers(own_videos):
    """A file damaged part way (same size) fails only for the frames past the damage: the
    stand-in a process picked depended on what it met before, so batches changed with
    num_workers (and on resume). Now every candidate is decoded, whatever came before."""
    from siasam_fast.pipeline.manifest import load_manifest

    folder, _ = own_videos
    path = video_path(folder, "vp9", "vp9")
    data = bytearray(path.read_bytes())
    cut = len(data) * 35 // 100
    data[cut:] = bytes(len(data) - cut)
    path.write_bytes(bytes(data))
    video_path(folder, "mjpeg", "mjpeg").unlink()
    manifest = load_manifest(folder / "manifest.jsonl")
    examples = examples_for(["vp9", "h264", "h264", "mjpeg"]) + [
        QAExample(qid="early", video_id="vp9", question="?", start=0.0, end=0.6),
        QAExample(qid="last", video_id="h264", question="?")]
    got = {}
    for workers in (0, 2):
        loader = build_loader(examples, manifest, CFG, "val", batch_size=1, image_size=SIZE,
                              num_workers=workers, shuffle=False)
        got[workers] = [b["example_index"].tolist() for b in loader]
    assert got[0] == got[2]
    assert [4] in got[0]  # vp9's first 0.6 s decode: its question is scored


def test_too_many_stand_ins_stop_the_run(tmp_path, monkeypatch):
    """18 of 30 videos gone: three epochs trained on the 12 left, with duplicates for the rest.
    More than a tenth of the examples needing stand-ins is an error naming the fix."""
    from siasam_fast.pipeline import dataset as dataset_module

    monkeypatch.setattr(dataset_module, "STAND_IN_TRIES", 4)  # the share applies past this many
    for i in range(30):
        write_index_video(tmp_path / f"v{i}.webm", 12, codec="vp9", size=16, gop=4)
    manifest = build_manifest(tmp_path, tmp_path / "manifest.jsonl", workers=1, progress=False)
    for i in range(0, 30, 5):
        (tmp_path / f"v{i}.webm").unlink()  # 6 of 30 gone: a fifth
    cfg = SamplingConfig(num_clips=1, frames_per_clip=2, stride=1)
    loader = build_loader(examples_for([f"v{i}" for i in range(30)]), manifest, cfg, "train",
                          batch_size=2, image_size=16, num_workers=0, shuffle=False)
    with pytest.raises(DecodeError, match=r"5 of the 30 videos failed at decode time in this "
                                          r"loader process \(more than 10%; 5 unreadable\).*"
                                          r"run `siasam-fast index`"):
        list(loader)


@pytest.mark.parametrize("dedup", [True, False])
def test_frames_resized_while_decoding_equal_the_stacked_video_transform(manifest, dedup):
    """The loader resizes each frame as it is decoded (transforms.frame_resizer), never stacking
    a video's full-size frames: its frames equal video_transform of those frames stacked, value
    for value, with a resize (32 -> 24 px) and without de-duplication too."""
    names = ["h264", "vp9_vfr", "mjpeg"]
    size = 24
    loader = build_loader(examples_for(names), manifest, CFG, "train", batch_size=3,
                          image_size=size, num_workers=0, seed=2, dedup=dedup)
    batch = next(iter(loader))
    for v, index in enumerate(batch["example_index"].tolist()):
        record = manifest[names[index]]
        ids = batch["frame_ids"][v]
        wanted = (sorted(set(ids[batch["frame_mask"][v]].tolist())) if dedup
                  else ids[batch["frame_mask"][v]].tolist())
        unique, inverse = np.unique(wanted, return_inverse=True)
        raw = decode_frames(record, unique)[inverse]  # full-size frames, stacked
        expected = video_transform(raw, size)
        u = int(batch["num_unique"][v])
        assert u == len(wanted)
        assert torch.equal(batch["frames"][v, :u], expected), (names[index], dedup)


def test_backend_choice_without_any_nvidia_package(monkeypatch):
    """Without DALI and without any other `nvidia` package (a torch that is not PyPI's CUDA
    wheel: NGC containers, conda), data.backend=auto falls back to PyAV and backend=dali says
    how to install DALI: importlib's find_spec("nvidia.dali") raised ModuleNotFoundError there."""
    import sys

    from siasam_fast.pipeline import loaders

    monkeypatch.delitem(sys.modules, "nvidia.dali", raising=False)
    monkeypatch.setitem(sys.modules, "nvidia", None)  # import nvidia -> ModuleNotFoundError
    monkeypatch.setattr(loaders.torch.cuda, "is_available", lambda: True)
    assert loaders.dali_available() is False
    assert loaders.resolve_backend("auto", {}) == "pyav"
    with pytest.raises(ValueError, match=r"siasam-fast\[gpu\]"):
        loaders.resolve_backend("dali", {})


def test_backend_choice_reads_the_usable_videos_and_takes_a_t4(monkeypatch):
    """A corrupt video (skipped by training, whatever its codec) does not decide the backend; a
    T4 (sm_75, the first GPU that DALI's CUDA 13 wheels hold code for) gets DALI."""
    from types import SimpleNamespace

    from siasam_fast import envcheck
    from siasam_fast.pipeline import loaders

    monkeypatch.setattr(loaders.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loaders.torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: "nvidia-dali-cuda130")
    manifest = {"a": SimpleNamespace(ok=True, codec="h264"),
                "b": SimpleNamespace(ok=False, codec="gif")}
    assert loaders.resolve_backend("auto", manifest) == "dali"
    assert loaders.resolve_backend("dali", manifest) == "dali"


def test_the_pyav_loader_is_not_given_the_dali_only_arguments(monkeypatch):
    """build_video_loader takes DALI's arguments whatever the backend: PyAV's loader (data.backend
    =auto without a GPU, say) gets the others only."""
    from siasam_fast.pipeline import loaders

    given = {}
    monkeypatch.setattr(loaders, "build_loader", lambda *args, **kwargs: given.update(kwargs))
    loaders.build_video_loader([], {}, CFG, "train", 2, backend="pyav", device="cuda:0",
                               decode_group=4, trim=True, num_workers=0)
    assert given == {"backend": "pyav", "num_workers": 0}


def test_backend_choice_keeps_av1_off_the_nvdec_of_a_v100_or_t4(monkeypatch):
    """NVDEC has no AV1 on a V100 (sm_70) or T4 (sm_75): DALI would fail on every AV1 file and
    leave it out as damaged. data.backend=auto takes PyAV for an AV1 manifest there, and
    backend=dali says why, naming the GPU; an A10 (sm_86) keeps DALI."""
    from types import SimpleNamespace

    from siasam_fast import envcheck
    from siasam_fast.pipeline import loaders

    monkeypatch.setattr(loaders.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: "nvidia-dali-cuda120")
    monkeypatch.setattr(loaders.torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    av1 = {"a": SimpleNamespace(ok=True, codec="av1"), "b": SimpleNamespace(ok=True, codec="h264")}
    for cc in ((7, 0), (7, 5)):
        monkeypatch.setattr(loaders.torch.cuda, "get_device_capability", lambda *a, cc=cc: cc)
        assert loaders.resolve_backend("auto", av1) == "pyav"
        with pytest.raises(ValueError, match=r"NVDEC.*V100.*av1"):
            loaders.resolve_backend("dali", av1)
        assert loaders.resolve_backend("auto", {"b": av1["b"]}) == "dali"
    monkeypatch.setattr(loaders.torch.cuda, "get_device_capability", lambda *a: (8, 6))
    assert loaders.resolve_backend("auto", av1) == "dali"


@pytest.mark.parametrize("cc, name, av1", [
    ((8, 0), "NVIDIA A100-SXM4-80GB", False), ((9, 0), "NVIDIA H100 80GB HBM3", False),
    ((8, 6), "NVIDIA A10", True), ((8, 7), "Orin", True), ((8, 9), "NVIDIA L4", True),
    ((10, 0), "NVIDIA B200", True), ((12, 0), "NVIDIA RTX PRO 6000", True)])
def test_nvdec_av1_follows_nvidias_table_not_the_architecture_number(monkeypatch, cc, name, av1):
    """NVIDIA's NVDEC application note (Video Codec SDK 12.2, 13.0): AV1 Main Profile decoding is
    'N' for Turing / GA100 / Hopper and 'Y' for GA10x, Ada and Blackwell. An A100 (sm_80) or an
    H100 (sm_90) with an AV1 manifest must get PyAV: DALI would leave out every AV1 file."""
    from types import SimpleNamespace

    from siasam_fast import envcheck
    from siasam_fast.pipeline import loaders

    monkeypatch.setattr(loaders.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: "nvidia-dali-cuda120")
    monkeypatch.setattr(loaders.torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(loaders.torch.cuda, "get_device_capability", lambda *a: cc)
    manifest = {"a": SimpleNamespace(ok=True, codec="av1")}
    assert loaders.resolve_backend("auto", manifest) == ("dali" if av1 else "pyav")
    if av1:
        assert loaders.resolve_backend("dali", manifest) == "dali"
    else:
        with pytest.raises(ValueError, match=rf"NVDEC of {name}.*av1"):
            loaders.resolve_backend("dali", manifest)


@pytest.mark.parametrize("name, codec, frames", [("seek.ts", "h264", 300),
                                                 ("seek.mpg", "mpeg2", 200)])
def test_mpeg_ts_and_ps_files_decode_the_right_frames_after_seeks(tmp_path, name, codec, frames):
    """MPEG-TS and MPEG-PS files (no index): FFmpeg's seek to a keyframe's pts can land on the
    next keyframe, past the last one (no frame at all), or give timestamps out of order. Each of
    those failed the video as damaged ('re-run siasam-fast index', which changed nothing); a seek
    that misses now decodes the video from its start, as it was indexed."""
    path = write_index_video(tmp_path / name, frames, codec=codec, gop=25)
    record = build_manifest(tmp_path, tmp_path / "manifest.jsonl", workers=1,
                            progress=False)[path.stem]
    assert record.ok, record.reason
    for wanted in ([frames - 90], [frames - 10, frames - 9], [frames - 1], [40, 41, frames - 2]):
        stats = DecodeStats()
        out = decode_frames(record, wanted, seek_threshold=0, stats=stats)
        assert [read_index(f) for f in out] == wanted
