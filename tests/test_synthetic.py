"""The synthetic VideoQA generator: determinism, file formats, ranges, splits, balance, evidence."""

import json
import re
from collections import Counter
from fractions import Fraction

import av
import numpy as np
import pytest

from siasam_fast.data.synthetic import (
    COLORS,
    QUESTION_TYPES,
    SPLITS,
    SynthConfig,
    evidence_visibility,
    format_visibility,
    generate,
    plan,
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
