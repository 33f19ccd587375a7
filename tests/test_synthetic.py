"""The synthetic VideoQA generator: determinism, file formats, ranges, splits, balance, evidence."""

import copy
import json
import math
import re
from collections import Counter
from fractions import Fraction

import av
import numpy as np
import pytest

from siasam_fast.data.synthetic import (
    COLORS,
    GENERATOR_VERSION,
    NUMBER_WORDS,
    QUESTION_TYPES,
    SPLITS,
    SynthConfig,
    _main_position,
    _shape_mask,
    evidence_visibility,
    format_visibility,
    generate,
    plan,
    render_frames,
)
from siasam_fast.sampling import SamplingConfig

NUM_VIDEOS = 12
SEED = 3
OPTIONS = {"size": 64, "min_frames": 40, "max_frames": 72}
ANNOTATIONS = [f"annotations/{s}_qa.json" for s in SPLITS] + [
    f"annotations/how2qa_{s}.jsonl" for s in SPLITS
]
MSRVTT_FIELDS = {"answer": str, "category_id": int, "id": int, "question": str, "video_id": int}
HOW2QA_FIELDS = ["vid_name", "ts", "qid", "q", "a0", "a1", "a2", "a3", "answer_idx"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    result = generate(root, NUM_VIDEOS, SEED, workers=2, progress=False, **OPTIONS)
    assert f"{NUM_VIDEOS} videos" in str(result) and len(repr(result)) < 500
    return root, result.meta


def decode(path):
    """All frames [T, H, W, 3] and (codec, pixel format, average rate), with PyAV directly."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = (stream.codec_context.name, stream.codec_context.pix_fmt, stream.average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return frames, info


def read_open(root, split):
    return json.loads((root / f"annotations/{split}_qa.json").read_text(encoding="utf-8"))


def read_mc(root, split):
    text = (root / f"annotations/how2qa_{split}.jsonl").read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_same_seed_gives_identical_annotations_and_frames(dataset, tmp_path):
    root, _ = dataset
    again = tmp_path / "again"
    generate(again, NUM_VIDEOS, SEED, workers=1, progress=False, **OPTIONS)  # other worker count
    for rel in [*ANNOTATIONS, "meta.json"]:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    for i in range(NUM_VIDEOS):
        first, _ = decode(root / f"videos/video{i}.mp4")
        second, _ = decode(again / f"videos/video{i}.mp4")
        np.testing.assert_array_equal(first, second, err_msg=f"video{i}")


def test_other_seed_differs(dataset, tmp_path):
    root, _ = dataset
    other = tmp_path / "other"
    generate(other, NUM_VIDEOS, SEED + 1, workers=1, progress=False, **OPTIONS)
    for rel in ANNOTATIONS[:1] + ["meta.json"]:
        assert (root / rel).read_bytes() != (other / rel).read_bytes(), rel
    first, _ = decode(root / "videos/video1.mp4")
    second, _ = decode(other / "videos/video1.mp4")
    assert first.shape != second.shape or not np.array_equal(first, second)


def test_msrvtt_qa_format(dataset):
    root, meta = dataset
    ids = []
    for split in SPLITS:
        rows = read_open(root, split)
        assert isinstance(rows, list)
        for row in rows:
            assert set(row) == set(MSRVTT_FIELDS)
            for name, kind in MSRVTT_FIELDS.items():
                assert type(row[name]) is kind, (name, row)
            assert (root / "videos" / f"video{row['video_id']}.mp4").is_file()
            video = meta["videos"][f"video{row['video_id']}"]
            assert video["split"] == split
            assert row["answer"] in meta["answer_vocabulary"]
            assert row["category_id"] in range(5)
            assert row["question"].endswith("?") and row["question"] == row["question"].lower()
            ids.append(row["id"])
    assert len(ids) == len(set(ids)) == NUM_VIDEOS * len(QUESTION_TYPES)
    assert 10 <= len(meta["answer_vocabulary"]) <= 30


def test_how2qa_value_format(dataset):
    root, meta = dataset
    qids = []
    for split in SPLITS:
        for line in read_mc(root, split):
            assert list(line) == HOW2QA_FIELDS
            assert re.fullmatch(r"video\d+", line["vid_name"])
            assert (root / "videos" / f"{line['vid_name']}.mp4").is_file()
            video = meta["videos"][line["vid_name"]]
            assert video["split"] == split
            match = re.fullmatch(r"(\d+\.\d\d)-(\d+\.\d\d)", line["ts"])
            assert match and float(match[1]) == 0.0
            duration = video["num_frames"] / float(Fraction(video["fps"]))
            assert float(match[2]) == pytest.approx(duration, abs=0.01)
            choices = [line[f"a{j}"] for j in range(4)]
            assert all(isinstance(c, str) and c for c in choices) and len(set(choices)) == 4
            assert type(line["answer_idx"]) is int and line["answer_idx"] in range(4)
            qtype = line["qid"].rsplit("-", 1)[1]
            answer = video["questions"][qtype]["answer"]
            assert re.search(rf"\b{answer}\b", choices[line["answer_idx"]])
            assert all(not re.search(rf"\b{answer}\b", c) for j, c in enumerate(choices)
                       if j != line["answer_idx"])
            qids.append(line["qid"])
    assert len(qids) == len(set(qids)) == NUM_VIDEOS * len(QUESTION_TYPES)


def test_videos_have_the_frames_size_and_codec_asked_for(dataset):
    root, meta = dataset
    assert sorted(p.name for p in (root / "videos").iterdir()) == sorted(
        f"video{i}.mp4" for i in range(NUM_VIDEOS)
    )
    for video_id, video in meta["videos"].items():
        frames, (codec, pix_fmt, rate) = decode(root / "videos" / f"{video_id}.mp4")
        assert OPTIONS["min_frames"] <= len(frames) <= OPTIONS["max_frames"]
        assert len(frames) == video["num_frames"]
        assert frames.shape[1:] == (64, 64, 3)
        assert (codec, pix_fmt) == ("h264", "yuv420p")
        assert 24 <= float(rate) <= 30 and rate == Fraction(video["fps"])


def test_events_show_on_the_frames_meta_says(dataset):
    """The ground truth the analysis relies on matches the decoded pixels."""
    root, meta = dataset
    for video_id, video in meta["videos"].items():
        frames, _ = decode(root / "videos" / f"{video_id}.mp4")
        frames = frames.astype(np.int16)
        T = len(frames)
        flash = video["events"]["flash"]
        lit = np.zeros(T, bool)
        for a, b in flash["frames"]:
            lit[a:b] = True
        th = flash["thickness"]
        top = frames[:, : th - 1, 8:-8].reshape(T, -1, 3)  # a strip inside the border
        off = np.abs(np.median(top, axis=1) - np.array(COLORS[flash["color"]])).max(axis=1)
        assert (off[lit] < 40).all() and (off[~lit] > 60).all(), video_id
        appear = video["events"]["appear"]
        shown = np.zeros(T, bool)
        a, b = appear["frames"][0]
        shown[a:b] = True
        # Near-white pixels; a few also appear where yuv420p chroma blends yellow into blue.
        white = (frames > 200).all(axis=-1).sum(axis=(1, 2))
        assert (white[shown] > 0.3 * appear["size"] ** 2).all(), video_id
        assert (white[~shown] < 0.05 * appear["size"] ** 2).all(), video_id


def test_splits_are_disjoint_by_video(dataset):
    root, meta = dataset
    members = [set(meta["splits"][s]) for s in SPLITS]
    assert all(members), "every split gets videos"
    assert sum(map(len, members)) == len(set().union(*members)) == NUM_VIDEOS
    for split, ids in zip(SPLITS, members):
        assert {f"video{r['video_id']}" for r in read_open(root, split)} <= ids
        assert {r["vid_name"] for r in read_mc(root, split)} <= ids


def test_answers_balanced_within_each_split_and_type():
    cfg = SynthConfig()
    videos = plan(250, 0, cfg)
    for split in SPLITS:
        chosen = [v for v in videos if v["split"] == split]
        assert chosen
        for qtype in QUESTION_TYPES:
            answers = Counter(v["questions"][qtype]["answer"] for v in chosen)
            counts = [answers[a] for a in cfg.answers(qtype)]
            assert sum(counts) == len(chosen) and max(counts) - min(counts) <= 1, (split, qtype)
            positions = Counter(v["questions"][qtype]["mc_answer_idx"] for v in chosen)
            counts = [positions[j] for j in range(4)]
            assert max(counts) - min(counts) <= 1, (split, qtype, "mc")
    for v in videos:  # neither question can be answered from the persistent object
        assert v["events"]["flash"]["color"] != v["main"]["color"]
        assert v["events"]["appear"]["shape"] != v["main"]["shape"]


def test_union_of_siamese_clips_sees_evidence_more_often_than_the_anchor(dataset):
    report = evidence_visibility(plan(150, 0, SynthConfig()), SamplingConfig(), draws=8)
    overall, by_type = report["overall"], report["by_type"]
    assert overall["union"] > overall["anchor"] + 0.1
    assert by_type["flash"]["union"] > 2 * by_type["flash"]["anchor"]  # stride aliasing
    assert by_type["appear"]["union"] > by_type["appear"]["anchor"] + 0.1  # shorter than stride
    for qtype in ("color", "shape"):
        assert by_type[qtype]["eval"] == by_type[qtype]["anchor"] == by_type[qtype]["union"] == 1
    for qtype in ("flash", "appear", "count", "direction"):
        row = by_type[qtype]
        assert row["union"] >= row["anchor"]
        assert 0.2 < row["eval"] < 0.95 and 0.2 < row["anchor"] < 0.95, (qtype, row)
    assert "flash" in format_visibility(report)
    # The same analysis reads a generated dataset's meta.json from its folder.
    root, _ = dataset
    small = evidence_visibility(root, draws=2)
    assert small["overall"]["questions"] == NUM_VIDEOS * len(QUESTION_TYPES)
    assert small["overall"]["union"] >= small["overall"]["anchor"]


def test_bad_options_name_what_is_valid(tmp_path):
    with pytest.raises(ValueError, match="valid"):
        generate(tmp_path, 2, 0, colour_noise=1.0)
    with pytest.raises(ValueError, match="size=63"):
        SynthConfig(size=63)
    with pytest.raises(ValueError, match="colour"):
        SynthConfig(question_types=("colour",))
    with pytest.raises(ValueError, match="min_frames"):
        SynthConfig(min_frames=50, max_frames=40)


def test_generate_writes_only_into_new_empty_or_synthetic_folders(tmp_path):
    from siasam_fast.data.synthetic import IN_PROGRESS, check_output_dir, is_synthetic_set

    theirs = tmp_path / "theirs"
    (theirs / "videos").mkdir(parents=True)
    (theirs / "videos" / "video0.mp4").write_bytes(b"their video")
    with pytest.raises(ValueError, match=r"theirs' is a folder holding other files.*not a synth"):
        generate(theirs, 2, 0, size=16, workers=1, progress=False)
    assert [p.name for p in theirs.rglob("*")] == ["videos", "video0.mp4"]
    assert (theirs / "videos" / "video0.mp4").read_bytes() == b"their video"
    (theirs / "note").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        generate(theirs / "note", 2, 0, size=16, workers=1, progress=False)
    with pytest.raises(ValueError, match="num_videos=0"):
        generate(tmp_path / "none", 0, 0, size=16, workers=1, progress=False)
    assert not (tmp_path / "none").exists()

    ours = tmp_path / "ours"
    check_output_dir(ours)  # new
    ours.mkdir()
    check_output_dir(ours)  # empty
    generate(ours, 2, 0, size=16, workers=1, progress=False)
    assert is_synthetic_set(ours) and not (ours / IN_PROGRESS).exists()
    generate(ours, 3, 1, size=16, workers=1, progress=False)  # regenerated in place
    assert json.loads((ours / "meta.json").read_text())["num_videos"] == 3


def test_regeneration_cut_short_leaves_no_old_annotations_or_manifest(tmp_path, monkeypatch):
    """A regeneration stopped midway (Ctrl-C) must not leave the old set's annotations and
    manifest beside a mix of old and new videos: training would pair new videos with old labels."""
    from siasam_fast.data import synthetic
    from siasam_fast.data.synthetic import IN_PROGRESS

    out = tmp_path / "set"
    generate(out, 4, 0, size=16, workers=1, progress=False)
    (out / "manifest.jsonl").write_text("{}\n")  # as `siasam-fast synth` writes it
    render, calls = synthetic._render_job, []

    def stopped_after_two(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job)
        return render(job)

    monkeypatch.setattr(synthetic, "_render_job", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate(out, 4, 1, size=16, workers=1, progress=False)
    assert (out / IN_PROGRESS).exists() and not (out / "meta.json").exists()
    assert not (out / "manifest.jsonl").exists()
    assert sorted(p.name for p in (out / "annotations").iterdir()) == []


def test_module_cli_interrupted_says_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    """``python -m siasam_fast.data.synthetic`` stopped midway (Ctrl-C, SIGTERM) ends as
    ``siasam-fast synth`` does: one line saying what is left, exit status 130, no traceback."""
    from siasam_fast.data import synthetic

    def stopped(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_render_job", stopped)
    out = tmp_path / "set"
    code = synthetic.main(["--out", str(out), "--videos", "2", "--size", "16", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "python -m siasam_fast.data.synthetic: interrupted; the set is left incomplete"), err
    assert (out / synthetic.IN_PROGRESS).exists() and not (out / "meta.json").exists()


def test_regeneration_removes_the_partial_files_a_stopped_run_left(tmp_path):
    """A run killed while encoding leaves ``videos/video<N>.mp4.tmp`` (and, between a write and
    its rename, ``<file>.tmp``): the next generation removes them, so the folder holds one set."""
    out = tmp_path / "set"
    generate(out, 3, 0, size=16, workers=1, progress=False)
    leftovers = [out / "videos" / "video7.mp4.tmp", out / "annotations" / "train_qa.json.tmp",
                 out / "meta.json.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    (out / "videos" / "notes.tmp").write_text("the user's")  # not the generator's: kept
    generate(out, 3, 0, size=16, workers=1, progress=False)
    assert [p for p in leftovers if p.exists()] == []
    assert (out / "videos" / "notes.tmp").read_text() == "the user's"


def test_bad_seed_fps_and_preset_are_named_before_anything_is_written(tmp_path):
    """A negative seed, no frame rate to choose from and an unknown libx264 preset are refused
    with the value and what is valid, before an existing set is touched (an unknown preset used
    to fail in the encoder after the old set's meta.json and annotations were removed)."""
    out = tmp_path / "set"
    generate(out, 2, 0, size=16, workers=1, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ValueError, match=r"seed=-1: .*>= 0"):
        generate(out, 2, -1, size=16, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"fps_choices=\[\]: .*one frame rate"):
        generate(out, 2, 0, size=16, workers=1, progress=False, fps_choices=[])
    with pytest.raises(ValueError, match=r"preset='fastest': valid: ultrafast, .*veryfast"):
        generate(out, 2, 0, size=16, workers=1, progress=False, preset="fastest")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "meta.json").is_file()


def test_evidence_visibility_names_bad_arguments():
    videos = plan(3, 0, SynthConfig(size=16))
    with pytest.raises(ValueError, match=r"draws=0: .*>= 1"):
        evidence_visibility(videos, draws=0)
    with pytest.raises(ValueError, match=r"question_types: unknown \['colour'\]; valid: color"):
        evidence_visibility(videos, question_types=["colour"])
    with pytest.raises(ValueError, match=r"splits: unknown \['tran'\]; valid: train, val, test"):
        evidence_visibility(videos, splits=["tran"])


# --- Mutation review: what is drawn where, split sizes, annotations and analysis (all cheap:
# planning and rendering without encoding, except two 16 px sets).


def test_split_sizes_follow_the_fractions():
    from siasam_fast.data.synthetic import _split_counts

    fr = (0.7, 0.1, 0.2)
    assert _split_counts(400, fr) == [280, 40, 80]
    assert _split_counts(12, fr) == [9, 1, 2]
    assert _split_counts(3, fr) == [1, 1, 1]  # every requested split gets a video ...
    assert _split_counts(2, fr) == [1, 0, 1]  # ... as soon as there are enough videos for it
    assert _split_counts(1, fr) == [1, 0, 0]
    assert _split_counts(10, (1, 0, 0)) == [10, 0, 0]
    with pytest.raises(ValueError, match=r"num_videos=2 is too few"):
        _split_counts(2, (0.1, 0.9, 0))
    videos = plan(12, 0, SynthConfig(size=16))
    assert Counter(v["split"] for v in videos) == {"train": 9, "val": 1, "test": 2}


def test_events_lie_in_the_event_range_and_last_as_long_as_asked():
    cfg = SynthConfig(min_frames=100, max_frames=102)
    videos = plan(200, 1, cfg)
    lengths = {"flash": cfg.flash_window, "appear": cfg.appear_frames,
               "count": cfg.count_frames, "direction": cfg.move_frames}
    drawn = {name: set() for name in lengths}
    for v in videos:
        T = v["num_frames"]
        lo, hi = math.floor(0.05 * T), math.ceil(0.7 * T)
        for name, (shortest, longest) in lengths.items():
            event = v["events"][name]
            start, stop = event["window"] if name == "flash" else event["frames"][0]
            assert lo <= start < stop <= hi, (v["video_id"], name, start, stop, T)
            assert shortest <= stop - start <= longest
            drawn[name].add(stop - start)
    for name, (shortest, longest) in lengths.items():
        assert drawn[name] == set(range(shortest, longest + 1)), name
    assert {v["num_frames"] for v in videos} == {100, 101, 102}
    assert {v["fps"] for v in videos} == set(cfg.fps_choices)
    assert all(v["duration"] == pytest.approx(v["num_frames"] / float(Fraction(v["fps"])),
                                              abs=1e-3) for v in videos)
    # Events longer than the event range (or the video) still lie inside the video.
    for v in plan(30, 2, SynthConfig(min_frames=20, max_frames=30, event_range=(0.9, 1.0))):
        T = v["num_frames"]
        for name in lengths:
            event = v["events"][name]
            start, stop = event["window"] if name == "flash" else event["frames"][0]
            assert 0 <= start < stop <= T, (v["video_id"], name, start, stop, T)
    assert {v["num_frames"] for v in plan(3, 0, SynthConfig(min_frames=40, max_frames=40))} == {
        40}


def test_flash_is_on_for_on_frames_of_every_period_inside_its_window():
    videos = plan(100, 4, SynthConfig())
    for v in videos:
        flash = v["events"]["flash"]
        f0, f1 = flash["window"]
        assert flash["frames"] == [[s, min(s + flash["on"], f1)]
                                   for s in range(f0, f1, flash["period"])], v["video_id"]
    assert {v["events"]["flash"]["on"] for v in videos} == {1, 2}


def test_rings_never_overlap_and_stay_in_the_frame():
    for v in plan(100, 5, SynthConfig()):
        count = v["events"]["count"]
        size, boxes = count["size"], count["positions"]
        assert len(boxes) == count["count"] == NUMBER_WORDS.index(v["questions"]["count"]["answer"])
        for i, (x, y) in enumerate(boxes):
            assert 0 <= x <= 64 - size and 0 <= y <= 64 - size
            for x2, y2 in boxes[:i]:
                assert abs(x - x2) >= size or abs(y - y2) >= size, (v["video_id"], boxes)


def _without(video, event):
    """The video with one event's frames emptied (rendered without it)."""
    other = copy.deepcopy(video)
    other["events"][event]["frames"] = [[0, 0]]
    return other


def test_comet_moves_the_way_the_answer_says_with_its_tail_behind():
    videos = plan(8, 6, SynthConfig(min_frames=40, max_frames=72))
    for v in videos:
        comet = v["events"]["direction"]
        assert comet["direction"] == v["questions"]["direction"]["answer"]
        dx, dy = np.subtract(comet["end"], comet["start"])
        assert {"left": dx < 0 and dy == 0, "right": dx > 0 and dy == 0,
                "up": dy < 0 and dx == 0, "down": dy > 0 and dx == 0}[comet["direction"]]
        changed = (render_frames(v) != render_frames(_without(v, "direction"))).any(axis=-1)
        m0, m1 = comet["frames"][0]
        shown = changed.any(axis=(1, 2))
        assert shown[m0:m1].all() and not shown[:m0].any() and not shown[m1:].any(), v["video_id"]
        u = np.array([dx, dy]) / math.hypot(dx, dy)
        half = comet["size"] / 2
        for i in range(m0, m1):
            f = (i - m0) / max(1, m1 - m0 - 1)
            head = (np.add(comet["start"], f * np.array([dx, dy])) + half) @ u
            ys, xs = np.nonzero(changed[i])
            along = np.stack([xs, ys], axis=1) @ u
            assert along.max() <= head + half + 1, (v["video_id"], i)  # nothing ahead of the head
            assert along.mean() <= head + 0.5, (v["video_id"], i)  # the tail trails behind


def test_rings_and_white_shape_show_on_their_frames_uncovered():
    videos = plan(16, 7, SynthConfig(min_frames=40, max_frames=72, noise=0.0))
    for v in videos:
        frames = render_frames(v)
        for event in ("count", "appear"):
            changed = (frames != render_frames(_without(v, event))).any(axis=-1).any(axis=(1, 2))
            a, b = v["events"][event]["frames"][0]
            assert changed[a:b].all() and not changed[:a].any() and not changed[b:].any()
        appear = v["events"]["appear"]
        a, b = appear["frames"][0]
        area = _shape_mask(appear["shape"], appear["size"]).sum()
        white = (frames == 250).all(axis=-1).sum(axis=(1, 2))  # WHITE, exactly (no grain)
        assert (white[a:b] == area).all() and (white[:a] == 0).all() and (white[b:] == 0).all()


def test_border_flashes_on_all_four_sides_and_grain_is_added():
    v = plan(1, 8, SynthConfig(noise=0.0))[0]
    frames = render_frames(v).astype(np.int16)
    flash = v["events"]["flash"]
    th, rgb = flash["thickness"], np.array(COLORS[flash["color"]])
    lit = np.zeros(len(frames), bool)
    for a, b in flash["frames"]:
        lit[a:b] = True
    for side in (frames[:, :th], frames[:, -th:], frames[:, :, :th], frames[:, :, -th:]):
        on = (side == rgb).all(axis=-1).all(axis=(1, 2))
        np.testing.assert_array_equal(on, lit)
    grainy = copy.deepcopy(v)
    grainy["background"]["noise"] = 6.0
    grain = render_frames(grainy).astype(np.float64) - frames
    assert 5 < grain.std() < 7


def test_big_object_stays_in_the_frame_and_moves_smoothly():
    for v in plan(40, 9, SynthConfig()):
        main = v["main"]
        x, y = _main_position(main, 64, np.arange(v["num_frames"]))
        for p, vel in ((x, main["vel"][0]), (y, main["vel"][1])):
            assert p.min() >= 0 and p.max() <= 64 - main["size"]
            assert np.abs(np.diff(p)).max() <= abs(vel) + 1e-6


def test_wrong_choices_are_distinct_and_flash_offers_the_big_objects_colour():
    for v in plan(100, 10, SynthConfig(num_distractors=0)):
        for qtype, q in v["questions"].items():
            choices = q["mc_choices"]
            assert len(set(choices)) == 4
            answer = q["answer"]
            assert [j for j, c in enumerate(choices) if re.search(rf"\b{answer}\b", c)] == [
                q["mc_answer_idx"]], (v["video_id"], qtype, choices)
        flash = v["questions"]["flash"]
        assert any(v["main"]["color"] in c for c in flash["mc_choices"]), flash["mc_choices"]


def test_annotations_and_meta_write_only_the_types_asked_for():
    from siasam_fast.data.synthetic import CATEGORY_OF, _annotations, _meta

    cfg = SynthConfig(size=16, question_types=("flash", "count", "direction"),
                      mc_types=("direction",))
    videos = plan(6, 0, cfg)
    open_qa, mc_qa = _annotations(videos, cfg)
    by_id = {q["open_id"]: (qtype, q) for v in videos for qtype, q in v["questions"].items()
             if "open_id" in q}
    rows = [r for s in SPLITS for r in open_qa[s]]
    assert sorted(r["id"] for r in rows) == sorted(by_id) == list(range(18))
    for row in rows:
        qtype, q = by_id[row["id"]]
        assert qtype in cfg.question_types and row["answer"] == q["answer"]
        assert row["category_id"] == CATEGORY_OF[qtype] == {"flash": 0, "count": 2,
                                                            "direction": 4}[qtype]
    lines = [line for s in SPLITS for line in mc_qa[s]]
    assert len(lines) == 6 and all(line["qid"].endswith("-direction") for line in lines)
    meta = _meta(videos, cfg, 0, open_qa, mc_qa)
    assert meta["answer_vocabulary"] == sorted(
        [*COLORS, "two", "three", "four", "five", "left", "right", "up", "down"])
    assert meta["num_questions"] == {
        "open_ended": {s: 3 * len(meta["splits"][s]) for s in SPLITS},
        "multiple_choice": {s: len(meta["splits"][s]) for s in SPLITS},
    }


def test_regenerating_fewer_videos_removes_the_old_ones(tmp_path):
    out = tmp_path / "set"
    generate(out, 4, 0, size=16, min_frames=4, max_frames=6, workers=1, progress=False)
    result = generate(out, 2, 0, size=16, min_frames=4, max_frames=6, mc_types=["flash"],
                      workers=1, progress=False)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["video0.mp4", "video1.mp4"]
    assert (result.num_videos, result.num_open_ended, result.num_multiple_choice) == (2, 12, 2)


def test_videos_get_a_keyframe_every_gop_frames(dataset):
    root, meta = dataset
    gop = meta["params"]["gop"]
    for video_id in meta["videos"]:
        with av.open(str(root / "videos" / f"{video_id}.mp4")) as container:
            keys = [i for i, packet in enumerate(container.demux(video=0))
                    if packet.size and packet.is_keyframe]
        assert keys[0] == 0 and max(np.diff(keys + [meta["videos"][video_id]["num_frames"]])) <= gop


def test_a_folder_with_someone_elses_meta_json_is_not_a_synthetic_set(tmp_path):
    from siasam_fast.data.synthetic import check_output_dir, is_synthetic_set

    (tmp_path / "meta.json").write_text('{"generator": "their tool", "num_videos": 3}')
    assert not is_synthetic_set(tmp_path)
    with pytest.raises(ValueError, match="not a synthetic set"):
        check_output_dir(tmp_path)


def test_visibility_report_counts_the_anchor_draws_splits_and_rescues():
    from siasam_fast.data.synthetic import evidence_frames
    from siasam_fast.sampling import sample_siamese_clips

    videos = plan(40, 11, SynthConfig(size=16))
    report = evidence_visibility(videos, draws=16)
    for qtype, row in report["by_type"].items():
        # Each question has the same number of draws: the union sees it when the anchor does, and
        # otherwise in the "rescued" fraction of the draws the anchor missed.
        rebuilt = row["anchor"] + (1 - row["anchor"]) * row["rescued"]
        assert row["union"] == pytest.approx(rebuilt, abs=2e-3), qtype
        assert row["anchor"] <= row["clip_mean"] + 0.05 and row["clip_mean"] <= row["union"]
    assert all(evidence_frames(v, q).all() for v in videos for q in ("color", "shape"))
    flash = report["by_type"]["flash"]
    assert flash["clip_mean"] < flash["union"] - 0.1 and flash["rescued"] < 1
    # The anchor is clip 0 of each draw, and each draw is a fresh one.
    video = videos[0]
    one = evidence_visibility([video], draws=16, question_types=["flash"])["by_type"]["flash"]
    mask = evidence_frames(video, "flash")
    hits = [mask[sample_siamese_clips(video["num_frames"], SamplingConfig(),
                                      np.random.default_rng([0, d, 0])).clips[0]].any()
            for d in range(16)]
    assert one["anchor"] == pytest.approx(np.mean(hits), abs=1e-4) and 0 < one["anchor"] < 1
    val = [v for v in videos if v["split"] == "val"]
    assert evidence_visibility(videos, draws=1, splits=["val"])["overall"]["questions"] == (
        len(val) * len(QUESTION_TYPES))


def test_bad_flash_split_and_event_range_are_refused():
    with pytest.raises(ValueError, match=r"flash_period=2, flash_on=\(1, 2\)"):
        SynthConfig(flash_period=2, flash_on=(1, 2))
    with pytest.raises(ValueError, match=r"split_fractions=\(0\.8, -0\.1, 0\.3\)"):
        SynthConfig(split_fractions=(0.8, -0.1, 0.3))
    with pytest.raises(ValueError, match=r"event_range=\(0\.5, 0\.5\)"):
        SynthConfig(event_range=(0.5, 0.5))


def test_one_video_splits_never_ask_what_the_big_object_answers():
    """A split of one video has nobody to swap a clashing answer with (the fallback draw)."""
    for seed in range(100):
        for v in plan(3, seed, SynthConfig(size=16)):  # 1 train, 1 val, 1 test video
            assert v["events"]["flash"]["color"] != v["main"]["color"], (seed, v["video_id"])
            assert v["events"]["appear"]["shape"] != v["main"]["shape"], (seed, v["video_id"])


def test_shapes_differ_and_paste_blends_and_clips_at_the_edges():
    from siasam_fast.data.synthetic import SHAPES, _paste, _texture

    for n in (6, 18, 19):
        assert len({_shape_mask(s, n).tobytes() for s in SHAPES}) == len(SHAPES), n
    frame = np.zeros((8, 8, 3), np.float32)
    _paste(frame, np.ones((4, 4), bool), (200, 100, 0), 6, -2, alpha=0.25)  # half outside
    expected = np.zeros((8, 8, 3), np.float32)
    expected[0:2, 6:8] = (50, 25, 0)
    np.testing.assert_allclose(frame, expected)
    assert np.allclose(_texture(5, 96, 0.0), 60)  # texture 0: flat grey
    assert _texture(5, 96, 1.0).std() > 5


def test_per_question_visibility_follows_the_questions_written():
    from siasam_fast.data.synthetic import _annotations, _meta, eval_clip_sees_evidence

    cfg = SynthConfig(size=16, question_types=("flash", "direction"))
    videos = plan(30, 12, cfg)
    open_qa, mc_qa = _annotations(videos, cfg)
    meta = json.loads(json.dumps(_meta(videos, cfg, 12, open_qa, mc_qa)))  # as meta.json holds it
    per_question = eval_clip_sees_evidence(meta)
    assert sorted(per_question) == list(range(60))
    report = evidence_visibility(meta, draws=1)
    assert list(report["by_type"]) == ["flash", "direction"]
    for qtype, row in report["by_type"].items():
        mine = [q["visible"] for q in per_question.values() if q["type"] == qtype]
        assert len(mine) == row["questions"] == 30
        assert sum(mine) / len(mine) == pytest.approx(row["eval"], abs=1e-4)
    assert report["by_type"]["flash"]["eval"] < 0.9


def test_bad_crf_is_named_before_an_existing_set_is_touched(tmp_path):
    """crf=-5 used to fail in libx264 (a bare OverflowError naming avcodec_open2) after the old
    set's meta.json and annotations were removed."""
    out = tmp_path / "set"
    generate(out, 2, 0, size=16, workers=1, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for crf in (-5, 52, "23", float("nan")):
        with pytest.raises(ValueError, match=r"crf=.*: libx264's quality, a number in 0\.\.51"):
            generate(out, 2, 0, size=16, workers=1, progress=False, crf=crf)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert SynthConfig(crf=0).crf == 0 and SynthConfig(crf=51).crf == 51


def test_bad_gop_is_named_before_an_existing_set_is_touched(tmp_path):
    """gop='x' used to fail in libx264 (a bare av ArgumentError) after the old set's meta.json and
    annotations were removed; gop=0 or -3 gave libx264's own keyframe interval while meta.json
    recorded the value asked for."""
    out = tmp_path / "set"
    generate(out, 2, 0, size=16, workers=1, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for gop in ("x", 0, -3, 1.5, True):
        with pytest.raises(ValueError, match=r"gop=.*: must be an integer >= 1"):
            generate(out, 2, 0, size=16, workers=1, progress=False, gop=gop)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert SynthConfig(gop=1).gop == 1


def test_options_of_a_wrong_type_are_named_not_a_bare_type_error():
    """Through the Python API (the command line parses its types): a string, None or a float
    where an integer goes used to end in a bare TypeError of a comparison ("'<' not supported
    between instances of 'str' and 'int'", seed="abc" in int()'s message), and a float frame
    count or period was taken and truncated."""
    for kwargs, name in [({"noise": "3"}, "noise"), ({"texture": None}, "texture"),
                         ({"noise": float("nan")}, "noise"), ({"texture": float("inf")}, "texture"),
                         ({"min_frames": 4.5}, "min_frames"), ({"max_frames": "80"}, "max_frames"),
                         ({"flash_period": 4.5}, "flash_period"), ({"size": True}, "size"),
                         ({"num_distractors": 2.5}, "num_distractors")]:
        with pytest.raises(ValueError, match=rf"^{name}=.*: give a"):
            SynthConfig(**kwargs)
    for num_videos, seed, name in [(2.5, 0, "num_videos"), ("3", 0, "num_videos"),
                                   (3, "abc", "seed"), (3, 1.0, "seed")]:
        with pytest.raises(ValueError, match=rf"^{name}="):
            plan(num_videos, seed, SynthConfig())
    assert SynthConfig(noise=np.float32(2.0), size=np.int64(32)).size == 32
    assert len(plan(np.int64(3), np.int64(1), SynthConfig(size=16))) == 3


def test_big_object_and_distractors_are_drawn_where_meta_says():
    for v in plan(10, 13, SynthConfig(noise=0.0, min_frames=40, max_frames=72)):
        frame = render_frames(v)[0]  # frame 0: no event yet (they start at 5% of the video)
        # Who owns each pixel: the distractors in order, then the big object on top.
        owner = np.full((64, 64), -1)
        for j, d in enumerate(v["distractors"]):
            x, y = (round(p) for p in d["pos0"])
            owner[max(y, 0) : y + d["size"], max(x, 0) : x + d["size"]] = j
        main = v["main"]
        x, y = (round(p) for p in main["pos0"])
        mask = _shape_mask(main["shape"], main["size"])
        owner[y : y + main["size"], x : x + main["size"]][mask] = len(v["distractors"])
        for j, d in enumerate([*v["distractors"], main]):
            assert (frame[owner == j] == COLORS[d["color"]]).all(), (v["video_id"], j)
        assert (owner == len(v["distractors"])).sum() == mask.sum()
        assert sum((owner == j).any() for j in range(len(v["distractors"]))) >= 3


def _fingerprint(split_fractions):
    return [" ".join([v["split"], str(v["num_frames"]),
                      *(v["questions"][q]["answer"] for q in QUESTION_TYPES),
                      str(v["questions"]["color"]["mc_answer_idx"])])
            for v in plan(6, 0, SynthConfig(split_fractions=split_fractions))]


def test_version_1_sets_stay_what_they_were():
    """The demo reuses a set whose generator version, seed and knobs match (dataset_matches): a
    change to what is planned must come with a new GENERATOR_VERSION. These are version 1's."""
    assert GENERATOR_VERSION == 1
    assert _fingerprint((0.7, 0.1, 0.2)) == [
        "val 103 yellow square cyan cross four down 0",
        "test 121 blue cross cyan triangle two left 2",
        "train 107 cyan square blue circle five down 1",
        "train 54 green cross cyan triangle two left 0",
        "train 63 blue triangle yellow square four up 2",
        "train 140 magenta circle green cross three right 3",
    ]
    assert _fingerprint((0.5, 0, 0.5)) == [
        "test 103 red triangle blue square five up 3",
        "test 121 blue circle magenta cross three down 2",
        "train 107 cyan square yellow cross three down 3",
        "train 54 green triangle blue circle two up 2",
        "test 63 green square red circle four left 0",
        "train 140 magenta circle green square four right 1",
    ]
