"""`siasam-fast` bad input: a one-line error naming the value, exit status 2, nothing lost; and
help texts written in words."""

import json
import os
import subprocess
import sys

import av
import pytest
from subprocess_env import cpu_env

from siasam_fast import cli
from siasam_fast.pipeline import manifest as manifest_module
from siasam_fast.pipeline.manifest import load_manifest

HAS_NVENC = "h264_nvenc" in av.codecs_available


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``siasam-fast ARGV`` run in this process."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_info:  # argparse errors
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, err, command, *fragments):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"siasam-fast {command}: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def assert_argument_error(code, err, command, option, value, *fragments):
    """argparse refused ``option value``: exit 2, its usage line and one error line naming both."""
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"siasam-fast {command}: error: argument {option}: invalid value {str(value)!r}"), err
    for fragment in fragments:
        assert fragment in last, (fragment, err)


def snapshot(folder):
    """Every entry under ``folder``: file bytes, or None for a folder."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob("*"))}


def users_folder(tmp_path):
    """A folder of the user's own files, laid out like a synthetic set but not made by it."""
    folder = tmp_path / "userdir"
    (folder / "annotations").mkdir(parents=True)
    (folder / "annotations" / "train_qa.json").write_text('[{"answer": "mine", "id": 7}]')
    (folder / "notes.txt").write_text("keep me")
    return folder


@pytest.fixture
def no_demo_work(monkeypatch):
    """The demo fails loudly (not slowly) if it gets past its argument checks."""
    from siasam_fast import demo

    def refuse(*args, **kwargs):
        raise AssertionError("the demo started working before its arguments were checked")

    monkeypatch.setattr(demo, "ensure_dataset", refuse)
    monkeypatch.setattr(demo, "run_training", refuse)
    return demo


# ----------------------------------------------------------------------------------------------
# index


def test_index_missing_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "index", tmp_path / "nope", "--out", tmp_path / "m.jsonl")
    assert_usage_error(code, err, "index", "nope", "is not a folder (it does not exist)")
    assert not (tmp_path / "m.jsonl").exists()


def test_index_out_is_a_folder_checked_before_probing(capsys, two_videos, tmp_path, monkeypatch):
    folder, _ = two_videos

    def probe(*args, **kwargs):
        raise AssertionError("probed before --out was checked")

    monkeypatch.setattr(manifest_module, "probe_video", probe)
    (tmp_path / "somedir").mkdir()
    code, _, err = run_cli(capsys, "index", folder, "--out", tmp_path / "somedir", "--workers", 1)
    assert_usage_error(code, err, "index", "somedir' is a folder", "manifest.jsonl")
    assert list((tmp_path / "somedir").iterdir()) == []


def test_index_never_overwrites_a_file_that_is_not_a_manifest(capsys, two_videos, tmp_path):
    folder, _ = two_videos
    victim = tmp_path / "victim.yaml"
    victim.write_text("train:\n  epochs: 3\n")
    code, out, err = run_cli(capsys, "index", folder, "--out", victim, "--workers", 1)
    assert_usage_error(code, err, "index", "victim.yaml", "is not a video manifest",
                       "refusing to overwrite")
    assert "ignoring" not in out + err
    assert victim.read_text() == "train:\n  epochs: 3\n"


def test_index_empty_folder_keeps_the_existing_manifest(capsys, two_videos, tmp_path):
    _, manifest = two_videos
    before = manifest.read_bytes()
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "index", tmp_path / "empty", "--out", manifest)
    assert_usage_error(code, err, "index", "empty' holds no videos", ".mp4", ".webm")
    assert manifest.read_bytes() == before and len(load_manifest(manifest)) == 2


def test_index_updates_a_manifest(capsys, two_videos):
    folder, manifest = two_videos
    code, out, _ = run_cli(capsys, "index", folder, "--out", manifest, "--workers", 1)
    assert code == 0 and "2 ok, 0 corrupt, 2 unchanged since the last run (not probed again)" \
        in out, out


def test_index_summary_counts_files_skipped_for_a_taken_video_id(capsys, two_videos):
    folder, manifest = two_videos
    (folder / "a.mkv").write_bytes((folder / "a.mp4").read_bytes())  # video_id 'a' twice
    code, out, _ = run_cli(capsys, "index", folder, "--out", manifest, "--workers", 1)
    assert code == 0 and "2 ok, 0 corrupt" in out
    assert "1 file skipped (video_id already taken)" in out, out


def test_index_on_a_gpu_says_which_videos_its_nvdec_cannot_decode(capsys, two_videos,
                                                                   monkeypatch):
    """On a GPU with DALI (stand-ins: a V100), `index` says at once which videos NVDEC cannot
    decode (16 px H.264 and MJPEG: under its smallest frames), not the training's first epoch."""
    from siasam_fast.pipeline import loaders

    folder, manifest = two_videos
    monkeypatch.setattr(loaders.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    monkeypatch.setattr(loaders.torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(loaders.torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    code, out, _ = run_cli(capsys, "index", folder, "--out", manifest, "--workers", 1)
    assert code == 0 and "2 ok, 0 corrupt" in out
    assert "note: the NVDEC of Tesla V100-SXM2-16GB cannot decode 2 videos" in out, out
    assert "h264 16x16: under NVDEC's smallest h264 frame, 48x16: a.mp4" in out, out
    assert "data.backend=auto will decode this set with PyAV" in out
    monkeypatch.setattr(loaders.torch.cuda, "is_available", lambda: False)
    code, out, _ = run_cli(capsys, "index", folder, "--out", manifest, "--workers", 1)
    assert code == 0 and "NVDEC" not in out


def test_plan_tells_whether_a_transcode_pays(capsys, tmp_path):
    """`siasam-fast plan MANIFEST`: the decode cost table, and the advice a set with a keyframe
    every 250 frames gets (transcode) and one with a keyframe every 8 frames gets (no need)."""
    from siasam_fast.pipeline.manifest import VideoRecord, write_manifest

    for gop in (250, 8):
        write_manifest([VideoRecord(video_id=f"v{i}", path=f"/v/v{i}.mp4", relpath=f"v{i}.mp4",
                                    status="ok", num_frames=900, codec="h264",
                                    keyframes=list(range(0, 900, gop))) for i in range(6)],
                       tmp_path / f"gop{gop}.jsonl")
    code, out, _ = run_cli(capsys, "plan", tmp_path / "gop250.jsonl", "--draws", 4)
    assert code == 0, out
    assert "6 usable videos (6 drawn), median 900 frames, a keyframe every 250 frames" in out
    assert "sampling N=9 clips of B=8 frames, stride 4, 4 draws a video" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  ")] == [
        "set", "as", "--gop", "--gop", "--gop"]
    assert "a transcode (siasam-fast transcode SRC DST --gop 16) would decode" in out
    # ActivityNet-QA's questions carry no time segments (the reader gives whole videos): only
    # How2QA's do, and the note names no other set.
    assert "such as How2QA," in out and "ActivityNet" not in out, out
    code, out, _ = run_cli(capsys, "plan", tmp_path / "gop8.jsonl", "--draws", 4,
                           "--set", "sampling.stride=2", "--gops", 16)
    assert code == 0 and "stride 2" in out and "a transcode would save little" in out, out
    code, _, err = run_cli(capsys, "plan", tmp_path / "missing.jsonl")
    assert_usage_error(code, err, "plan", "missing.jsonl", "does not exist")
    code, _, err = run_cli(capsys, "plan", tmp_path / "gop8.jsonl", "--set", "sampling.stride=0")
    assert_usage_error(code, err, "plan", "stride")


# ----------------------------------------------------------------------------------------------
# transcode


def test_transcode_preset_typo_leaves_a_complete_dst_byte_identical(capsys, two_videos, tmp_path):
    folder, _ = two_videos
    dst = tmp_path / "dst"
    common = ["--workers", 1, "--encoder", "cpu", "--no-progress"]
    code, out, _ = run_cli(capsys, "transcode", folder, dst, "--gop", 4, *common)
    assert code == 0 and "2 transcoded" in out
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dst.rglob("*") if p.is_file()}
    assert {"a.mp4", "b.mp4", "manifest.jsonl"} <= {p.name for p in before}

    for args, fragments in [
        (["--preset", "fsat"], ["--preset fsat:", "ultrafast", "veryslow"]),
        (["--crf", 99], ["--crf 99:", "from 0", "to 51"]),
        (["--crf", -1], ["--crf -1:", "from 0"]),
        (["--bframes", -1], ["--bframes -1:", "from 0"]),
        (["--height", 33], ["--height 33: must be an even integer >= 2 (4:2:0 chroma)"]),
        (["--bframes", 33], ["--bframes 33:", "or leave the flag out for the preset's"]),
    ]:
        code, _, err = run_cli(capsys, "transcode", folder, dst, "--gop", 16, *args, *common)
        assert_usage_error(code, err, "transcode", *fragments)
        after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dst.rglob("*") if p.is_file()}
        assert after == before, args
    assert len(load_manifest(dst / "manifest.jsonl")) == 2


def test_transcode_missing_and_empty_source(capsys, tmp_path):
    code, _, err = run_cli(capsys, "transcode", tmp_path / "nope", tmp_path / "out", "--gop", 16)
    assert_usage_error(code, err, "transcode", "src_dir=", "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "transcode", tmp_path / "empty", tmp_path / "out", "--gop",
                             16, "--encoder", "cpu", "--no-progress")
    assert_usage_error(code, err, "transcode", "empty' holds no videos", ".mp4", ".mkv")
    assert "nan" not in out + err and not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAS_NVENC, reason="this FFmpeg has no NVENC encoder")
def test_transcode_nvenc_without_a_gpu(capsys, two_videos, tmp_path):
    from siasam_fast.pipeline.transcode import nvenc_available

    if nvenc_available("h264")[0]:
        pytest.skip("NVENC works here")
    folder, _ = two_videos
    code, _, err = run_cli(capsys, "transcode", folder, tmp_path / "out", "--gop", 16,
                           "--encoder", "nvenc", "--no-progress")
    assert_usage_error(code, err, "transcode", "encoder 'nvenc' asked for (--encoder nvenc)",
                       "encoder 'cpu'")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# synth


def test_synth_out_is_a_file(capsys, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("keep me")
    code, _, err = run_cli(capsys, "synth", "--out", victim, "--videos", 2, "--workers", 1)
    assert_usage_error(code, err, "synth", "--out", "notes.txt", "is a file")
    assert victim.read_text() == "keep me"
    code, _, err = run_cli(capsys, "synth", "--out", victim / "sub", "--videos", 2)
    assert_usage_error(code, err, "synth", "notes.txt', a file")
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("option, value, valid", [
    ("--videos", 0, ">= 1"), ("--videos", -2, ">= 1"), ("--videos", "ten", ">= 1"),
    ("--size", 63, "even integer from 16 to 1024"), ("--size", 8, "16 to 1024"),
    ("--size", 2048, "16 to 1024"), ("--seed", -1, ">= 0"), ("--workers", -1, ">= 0"),
])
def test_synth_bad_values_refused_before_anything_is_written(capsys, tmp_path, option, value,
                                                             valid):
    code, _, err = run_cli(capsys, "synth", "--out", tmp_path / "new", option, value)
    assert_argument_error(code, err, "synth", option, value, valid)
    assert not (tmp_path / "new").exists()
    # The module's own command checks the same values.
    from siasam_fast.data import synthetic

    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path / "new"), option, str(value)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"argument {option}: invalid value {str(value)!r}" in err and valid in err
    assert not (tmp_path / "new").exists()


def test_frame_size_check_agrees_with_the_generator():
    import argparse

    from siasam_fast.data.synthetic import SynthConfig

    for size in (2, 14, 15, 16, 17, 48, 63, 64, 1022, 1024, 1025, 1026):
        try:
            SynthConfig(size=size)
            generator_ok = True
        except ValueError:
            generator_ok = False
        try:
            cli.frame_size(str(size))
            cli_ok = True
        except argparse.ArgumentTypeError:
            cli_ok = False
        assert cli_ok == generator_ok, size


def test_synth_never_writes_into_someone_elses_folder(capsys, tmp_path):
    from siasam_fast.data import synthetic

    folder = users_folder(tmp_path)
    before = snapshot(folder)
    code, _, err = run_cli(capsys, "synth", "--out", folder, "--videos", 2, "--size", 32,
                           "--workers", 1)
    assert_usage_error(code, err, "synth", f"--out {str(folder)!r}", "not a synthetic set",
                       "new or empty folder")
    assert snapshot(folder) == before

    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(folder), "--videos", "2", "--size", "32", "--workers", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"python -m siasam_fast.data.synthetic: error: --out {str(folder)!r} is a folder holding "
        "other files, not a synthetic set (it has no meta.json written by "
        "siasam_fast.data.synthetic): refusing to write into it; give a new or empty folder, or "
        "one holding a synthetic set"]
    assert snapshot(folder) == before

    # A meta.json of someone else's is no mark either.
    (folder / "meta.json").write_text('{"project": "mine"}')
    before = snapshot(folder)
    code, _, err = run_cli(capsys, "synth", "--out", folder, "--videos", 2, "--workers", 1)
    assert_usage_error(code, err, "synth", "not a synthetic set")
    assert snapshot(folder) == before


def test_synth_writes_into_new_empty_and_synthetic_folders(capsys, tmp_path):
    from siasam_fast.data.synthetic import IN_PROGRESS, load_meta

    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, videos in [(tmp_path / "new" / "set", 2), (empty, 2), (empty, 3)]:  # 3: again
        code, out, err = run_cli(capsys, "synth", "--out", folder, "--videos", videos, "--size",
                                 16, "--workers", 1)
        assert code == 0, err
        assert f"manifest {folder}/manifest.jsonl: {videos}/{videos} videos ok" in out
        assert load_meta(folder)["num_videos"] == videos and not (folder / IN_PROGRESS).exists()
    assert sorted(p.name for p in (empty / "videos").iterdir()) == [
        "video0.mp4", "video1.mp4", "video2.mp4"]

    # A generation cut short (its in-progress mark, no meta.json yet) is generated again.
    (empty / "meta.json").unlink()
    (empty / IN_PROGRESS).write_text('{"generator": "siasam_fast.data.synthetic"}')
    code, _, err = run_cli(capsys, "synth", "--out", empty, "--videos", 2, "--size", 16,
                           "--workers", 1)
    assert code == 0, err
    assert load_meta(empty)["num_videos"] == 2 and not (empty / IN_PROGRESS).exists()

    # A video the user put there is kept, and the manifest's count says it is not of the set
    (empty / "videos" / "my_clip.mp4").write_bytes((empty / "videos" / "video0.mp4").read_bytes())
    code, out, err = run_cli(capsys, "synth", "--out", empty, "--videos", 2, "--size", 16,
                             "--workers", 1, "--seed", 5)
    assert code == 0, err
    assert (f"note: 1 video(s) in {empty}/videos are not of this set (e.g. my_clip.mp4): indexed "
            "too; remove them to leave them out") in out


# ----------------------------------------------------------------------------------------------
# demo


@pytest.mark.parametrize("option, value, valid", [
    ("--seed", -1, ">= 0"), ("--seed", "x", ">= 0"), ("--videos", 0, ">= 1"),
    ("--videos", -5, ">= 1"),
])
def test_demo_bad_values_refused_before_anything_is_written(capsys, tmp_path, no_demo_work,
                                                            option, value, valid):
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "runs" / "demo", "--quick",
                           option, value)
    assert_argument_error(code, err, "demo", option, value, valid)
    assert list(tmp_path.iterdir()) == []


def test_demo_out_is_a_file(capsys, tmp_path, no_demo_work):
    victim = tmp_path / "demofile"
    victim.write_bytes(b"keep me\n")
    code, _, err = run_cli(capsys, "demo", "--out", victim, "--quick")
    assert_usage_error(code, err, "demo", str(victim), "is a file", "give --out a new folder")
    code, _, err = run_cli(capsys, "demo", "--out", victim / "inside", "--quick")
    assert_usage_error(code, err, "demo", f"is inside {str(victim)!r}, a file")
    assert victim.read_bytes() == b"keep me\n" and [p.name for p in tmp_path.iterdir()] == [
        "demofile"]


def test_demo_never_writes_into_someone_elses_data_folder(capsys, tmp_path, monkeypatch):
    from siasam_fast import demo

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(demo, "run_training", no_training)
    out = tmp_path / "project"
    users_folder(out)
    (out / "userdir").rename(out / "data")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "demo", "--out", out, "--quick")
    assert_usage_error(code, err, "demo", f"data folder {str(out / 'data')!r}",
                       "not a synthetic set")
    assert snapshot(out) == before


def test_demo_never_overwrites_files_it_did_not_write(capsys, tmp_path, no_demo_work):
    """A folder holding the user's own summary.json next to other files: the demo would rewrite
    summary.json, so the whole folder is refused; its own names alone are fine."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": 1}')
    (out / "paper.tex").write_text("keep me")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "demo", "--out", out, "--quick")
    assert_usage_error(code, err, "demo", str(out),
                       "holds files the demo did not write (paper.tex, summary.json (not a "
                       "demo's summary))",
                       "give --out a new folder")
    assert snapshot(out) == before
    (out / "paper.tex").unlink()  # only the demo's names, but not what the demo writes there
    (out / "baseline").mkdir()
    (out / "baseline" / "config.json").write_text(json.dumps(
        {"data": {"manifest": str(tmp_path / "elsewhere" / "manifest.jsonl")}}))
    before = snapshot(out)
    code, _, err = run_cli(capsys, "demo", "--out", out, "--quick")
    assert_usage_error(code, err, "demo", "baseline/ (not a run of this demo)",
                       "summary.json (not a demo's summary)")
    assert snapshot(out) == before
    # An earlier demo's folder: its runs trained on its data, its summary is a demo's.
    (out / "baseline" / "config.json").write_text(json.dumps(
        {"data": {"manifest": str(out / "data" / "manifest.jsonl")}}))
    (out / "summary.json").write_text(json.dumps({"baseline": {}, "siasamrea": {}, "delta": 0}))
    (out / "siasamrea").mkdir()  # a run that had not written anything yet
    (out / "baseline.log").write_text("old log")
    (out / ".DS_Store").write_bytes(b"")  # hidden: never a demo name, not in the way
    with pytest.raises(AssertionError, match="started working"):
        run_cli(capsys, "demo", "--out", out, "--quick")


def test_eval_output_paths_are_checked_before_evaluating(capsys, tmp_path, monkeypatch):
    from siasam_fast import training

    def no_eval(*args, **kwargs):
        raise AssertionError("the evaluation started before its output paths were checked")

    monkeypatch.setattr(training, "evaluate_checkpoint", no_eval)
    victim = tmp_path / "file"
    victim.write_text("keep")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--json", victim / "m.json")
    assert_usage_error(code, err, "eval", "--json", f"{str(victim)!r} is a file, not a folder")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--predictions", tmp_path)
    assert_usage_error(code, err, "eval", "--predictions", "is a folder")
    same = tmp_path / "out" / "same.json"
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--json", same,
                           "--predictions", same)
    assert_usage_error(code, err, "eval", "--json and --predictions name the same file")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--json",
                           tmp_path / "out" / "sub" / ".." / "same.json", "--predictions", same)
    assert_usage_error(code, err, "eval", "--json and --predictions name the same file")
    assert victim.read_text() == "keep"


def test_eval_json_writes_an_unscorable_metric_as_null(capsys, tmp_path, monkeypatch):
    """A split whose answers are all hidden (How2QA's public test) has accuracy NaN: --json holds
    strict JSON (null), which JSON.parse-like readers take; the bare word NaN they refuse."""
    from siasam_fast import training

    metrics = {"accuracy": float("nan"), "num_examples": 0, "num_unlabeled": 3,
               "per_type": {"what": float("inf")}, "curve": [1.0, float("nan")]}
    monkeypatch.setattr(training, "evaluate_checkpoint", lambda *args, **kwargs: dict(metrics))
    out = tmp_path / "m.json"
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--json", out)
    assert code == 0, err
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda word: pytest.fail(f"non-JSON {word}")) == {
        "accuracy": None, "num_examples": 0, "num_unlabeled": 3, "per_type": {"what": None},
        "curve": [1.0, None]}


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_output_file_check_tries_the_folder_not_only_its_permissions(tmp_path):
    """/proc takes no new file, even for root, whom permissions alone let through: refused up
    front; a writable folder passes, and the probe leaves nothing behind."""
    from siasam_fast.paths import check_output_file

    with pytest.raises(ValueError, match=r"--json '/proc/self/m.json': '/proc/self' is not "
                                         r"writable here \((no write permission|creating a "
                                         r"file in it fails: .+)\)"):
        check_output_file("/proc/self/m.json", "--json", writable=True)
    with pytest.raises(ValueError, match="--json '/proc/version': '/proc/version' is not writable"):
        check_output_file("/proc/version", "--json", writable=True)
    assert check_output_file(tmp_path / "new" / "m.json", "--json", writable=True).name == "m.json"
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    check_output_file(kept, "--json", writable=True)
    assert kept.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]


def test_write_text_atomic_makes_folders_and_leaves_no_half_file(tmp_path, monkeypatch):
    from siasam_fast import paths

    path = paths.write_text_atomic(tmp_path / "new" / "m.json", "first")
    assert path.read_text() == "first"

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paths.os, "replace", disk_full)
    with pytest.raises(OSError):
        paths.write_text_atomic(path, "second")
    assert path.read_text() == "first" and os.listdir(path.parent) == ["m.json"]


def test_takes_new_files_needs_a_writable_folder_on_the_way(tmp_path):
    from siasam_fast import paths

    assert paths.takes_new_files(tmp_path / "new" / "deeper")
    (tmp_path / "file").write_text("x")
    assert not paths.takes_new_files(tmp_path / "file")  # a file, not a folder
    assert not paths.takes_new_files(tmp_path / "file" / "sub")
    assert (tmp_path / "file").read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file"]


def test_index_bad_workers(capsys, two_videos, tmp_path):
    folder, _ = two_videos
    code, _, err = run_cli(capsys, "index", folder, "--out", tmp_path / "m.jsonl", "--workers", -1)
    assert_argument_error(code, err, "index", "--workers", -1, ">= 0")
    assert not (tmp_path / "m.jsonl").exists()


def test_error_from_a_real_process(tmp_path):
    """The console command itself (a child process): one line, exit 2, no traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "siasam_fast.cli", "index", str(tmp_path / "nope"), "--out",
         str(tmp_path / "m.jsonl")],
        capture_output=True, text=True, env=cpu_env(), timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"siasam-fast index: error: video_dir={str(tmp_path / 'nope')!r} is not a folder "
        "(it does not exist)"
    ]


# ----------------------------------------------------------------------------------------------
# help texts


def subcommand_help(name):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name].format_help()


def test_transcode_help_in_words():
    text = " ".join(subcommand_help("transcode").split())
    assert "{'" not in text and "':" not in text  # no Python dicts
    assert "default 20 for h264, 22 for hevc, cq 23 with NVENC" in text
    assert "ultrafast" in text and "(default fast)" in text and "p1 to p7" in text


def test_demo_and_synth_help():
    from siasam_fast import demo

    demo_help = " ".join(subcommand_help("demo").split())
    videos = demo.SYNTHETIC["num_videos"]
    quick = demo.QUICK_SYNTHETIC["num_videos"]
    assert f"(default {videos}; {quick} with --quick)" in demo_help
    assert "demo's" not in demo_help and "(default runs/demo)" in demo_help
    assert "seeds the synthetic set" in demo_help
    synth_help = " ".join(subcommand_help("synth").split())
    assert "random seed" in synth_help and "output folder" in synth_help


def test_synthetic_module_help(capsys):
    from siasam_fast.data import synthetic

    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, words in [("--out", "output folder"), ("--videos", "number of videos"),
                          ("--seed", "random seed"), ("--size", "frame height"),
                          ("--workers", "render processes")]:
        assert f"{option} " in text and words in text, option


def test_parser_imports_nothing_heavy():
    code = ("import sys; from siasam_fast.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'av', 'transformers', 'deepspeed', "
            "'siasam_fast.training', 'siasam_fast.demo') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=cpu_env(), timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_eval_replaces_its_output_files_together_and_a_stop_keeps_the_earlier_pair(
        capsys, tmp_path, monkeypatch):
    """--json and --predictions are made under hidden names and renamed into place together once
    the evaluation has finished: Ctrl-C while the predictions are written (or before the JSON is)
    gives one line and exit 130 and keeps the earlier pair; a finished evaluation replaces both."""
    import json

    from siasam_fast import training

    out = tmp_path / "out"
    out.mkdir()
    metrics, preds = out / "m.json", out / "p.jsonl"
    metrics.write_text("old metrics\n")
    preds.write_text("old predictions\n")

    def stopped(*args, predictions=None, **kwargs):
        predictions.write_text('{"qid": 1}\n')  # half of the new predictions
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "evaluate_checkpoint", stopped)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--json", metrics,
                           "--predictions", preds)
    assert code == 130 and "siasam-fast eval: interrupted; nothing was written" in err
    assert "Traceback" not in err
    assert metrics.read_text() == "old metrics\n" and preds.read_text() == "old predictions\n"
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "p.jsonl"]

    def finished(*args, predictions=None, **kwargs):
        predictions.write_text('{"qid": 1}\n{"qid": 2}\n')
        return {"num_examples": 2, "accuracy": 0.5}

    monkeypatch.setattr(training, "evaluate_checkpoint", finished)
    code, stdout, _ = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--json", metrics,
                              "--predictions", preds)
    assert code == 0 and "accuracy" in stdout
    assert json.loads(metrics.read_text()) == {"num_examples": 2, "accuracy": 0.5}
    assert preds.read_text() == '{"qid": 1}\n{"qid": 2}\n'
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "p.jsonl"]


def test_eval_ends_its_process_group_before_exiting(capsys, monkeypatch):
    """Left to the interpreter's exit, gloo's threads sometimes aborted it ("terminate called
    without an active exception", SIGABRT): about 1 in 12 evaluations on 2 processes, which
    torchrun then reported as failed after the metrics were written."""
    import socket

    import torch.distributed as dist

    from siasam_fast import training

    def evaluated(*args, **kwargs):  # as evaluate_checkpoint's init_distributed does (gloo)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
        return {"num_examples": 1, "accuracy": 1.0}

    monkeypatch.setattr(training, "evaluate_checkpoint", evaluated)
    try:
        code, stdout, _ = run_cli(capsys, "eval", "--checkpoint", "run")
        assert code == 0 and "accuracy" in stdout
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_eval_writes_the_file_behind_a_symlinked_output(capsys, tmp_path, monkeypatch):
    """--json / --predictions naming a symlink write its file (the link stays), as before the
    outputs were staged."""
    from siasam_fast import training

    shared, results = tmp_path / "shared", tmp_path / "results"
    shared.mkdir()
    results.mkdir()
    (shared / "m.json").write_text("old\n")
    (shared / "p.jsonl").write_text("old\n")
    (results / "m.json").symlink_to(shared / "m.json")
    (results / "p.jsonl").symlink_to(shared / "p.jsonl")

    def finished(*args, predictions=None, **kwargs):
        if predictions is not None:
            predictions.write_text('{"qid": 1}\n')
        return {"num_examples": 1, "accuracy": 1.0}

    monkeypatch.setattr(training, "evaluate_checkpoint", finished)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--json",
                           results / "m.json", "--predictions", results / "p.jsonl")
    assert code == 0, err
    assert (results / "m.json").is_symlink() and (results / "p.jsonl").is_symlink()
    assert '"accuracy": 1.0' in (shared / "m.json").read_text()
    assert (shared / "p.jsonl").read_text() == '{"qid": 1}\n'


def folder_taking_no_new_file(tmp_path, monkeypatch, name: str):
    """tmp_path/ro holding the file ``name``, a folder in which no new file can be made (as
    ``paths.takes_new_files`` says), with tmp_path/tmp as the temporary folder."""
    import tempfile

    from siasam_fast import paths

    out = tmp_path / "ro"
    out.mkdir()
    (out / name).write_text("old\n")
    monkeypatch.setattr(paths, "takes_new_files", lambda folder: folder != out)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return out


def test_eval_writes_in_place_where_the_folder_takes_no_new_file(capsys, tmp_path, monkeypatch):
    """A writable output file in a folder that takes no new file (read-only folder, /dev): the
    staged copy waits in the temporary folder and is written into the file at the end, after the
    evaluation as before; nothing is left in the temporary folder."""
    from siasam_fast import training

    out = folder_taking_no_new_file(tmp_path, monkeypatch, "m.json")
    monkeypatch.setattr(training, "evaluate_checkpoint",
                        lambda *a, **k: {"num_examples": 1, "accuracy": 1.0})
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--json", out / "m.json")
    assert code == 0, err
    assert '"accuracy": 1.0' in (out / "m.json").read_text()
    assert list((tmp_path / "tmp").iterdir()) == [] and [p.name for p in out.iterdir()] == [
        "m.json"]


@pytest.mark.parametrize("num_bad, more", [(20, None), (21, "  ... and 1 more (see the manifest)")])
def test_index_lists_at_most_20_corrupt_files(capsys, tmp_path, monkeypatch, num_bad, more):
    """The summary names the first 20 corrupt files, then how many more; --fast demuxes only."""
    from types import SimpleNamespace

    modes = []

    class Build(dict):
        duplicates = []
        reused = []

    def build(video_dir, out, workers=None, mode="decode"):
        modes.append(mode)
        return Build({f"v{i}": SimpleNamespace(status="ok" if i < 3 else "corrupt",
                                               path=f"v{i}.mp4", reason="no frames")
                      for i in range(3 + num_bad)})

    monkeypatch.setattr(manifest_module, "build_manifest", build)
    code, out, _ = run_cli(capsys, "index", tmp_path, "--out", tmp_path / "m.jsonl", "--fast")
    lines = out.splitlines()
    assert code == 0 and lines[0].endswith(f": 3 ok, {num_bad} corrupt") and modes == ["demux"]
    assert [line for line in lines if line.startswith("  corrupt: ")] == [
        f"  corrupt: v{i}.mp4: no frames" for i in range(3, 23)]
    assert lines[21:] == ([more] if more else [])
    run_cli(capsys, "index", tmp_path, "--out", tmp_path / "m.jsonl")
    assert modes == ["demux", "decode"]


def test_eval_stages_predictions_in_the_temporary_folder_where_the_folder_takes_no_new_file(
        capsys, tmp_path, monkeypatch):
    """The evaluation writes its predictions into a staged copy in the temporary folder (not
    beside the output, where no new file can be made), copied into the output at the end."""
    from siasam_fast import training

    out = folder_taking_no_new_file(tmp_path, monkeypatch, "p.jsonl")
    staged = []

    def evaluated(*args, predictions=None, **kwargs):
        staged.append(predictions.parent)
        predictions.write_text('{"qid": 1}\n')
        return {"num_examples": 1, "accuracy": 1.0}

    monkeypatch.setattr(training, "evaluate_checkpoint", evaluated)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--predictions",
                           out / "p.jsonl")
    assert code == 0, err
    assert staged == [tmp_path / "tmp"] and (out / "p.jsonl").read_text() == '{"qid": 1}\n'


def test_a_failing_evaluation_closes_its_loaders(capsys, tmp_path, monkeypatch):
    """Its loader's workers would otherwise outlive the error (the traceback keeps them)."""
    from siasam_fast import training
    from siasam_fast.pipeline import dataset

    closed = []
    monkeypatch.setattr(dataset, "close_loaders", lambda: closed.append(True))

    def failing(*args, **kwargs):
        raise ValueError("eval.split='nope': valid: val, test, train")

    monkeypatch.setattr(training, "evaluate_checkpoint", failing)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path)
    assert_usage_error(code, err, "eval", "eval.split='nope'")
    assert closed == [True]


def test_ask_candidates_and_printed_answers(capsys, tmp_path, monkeypatch):
    """--candidates is split on | and stripped (fewer than two, or an empty one, refused before
    the checkpoint is read); the answers print as percentages, a count as its integer."""
    from siasam_fast import training

    asked, result = [], {}

    def answer(checkpoint, video, question, candidates, top, overrides, start=None, end=None,
               task=None):
        asked.append(candidates)
        return dict(result)

    monkeypatch.setattr(training, "answer_question", answer)
    base = ["ask", "--checkpoint", tmp_path, "--video", tmp_path / "v.mp4", "--question", "what?"]
    for bad in ("yes", "yes|", "yes| |no"):
        code, _, err = run_cli(capsys, *base, "--candidates", bad)
        assert_usage_error(code, err, "ask", f"--candidates {bad!r}", "two or more non-empty")
    assert asked == []
    result.update(task="mc", answers=[("yes", 0.75), ("no", 0.25)])
    code, out, _ = run_cli(capsys, *base, "--candidates", " yes | no ")
    assert code == 0 and asked == [["yes", "no"]]
    assert out.splitlines() == ["yes   75.0%", "no    25.0%"]
    for count, output, printed in ((3, 2.7, "count: 3 (model output 2.70)"),
                                   (None, float("nan"), "count: - (model output nan)"),
                                   (2.5, 2.5, "count: 2.50")):
        result.clear()
        result.update(task="count", count=count, output=output)
        code, out, _ = run_cli(capsys, *base)
        assert code == 0 and out.strip() == printed, out
    code, _, err = run_cli(capsys, *base, "--top", 0)
    assert_argument_error(code, err, "ask", "--top", 0, ">= 1")


def test_eval_writes_into_a_fifo_in_place(capsys, tmp_path, monkeypatch):
    """A special file (a named pipe here, /dev/stdout in use) is written into, never replaced by
    the staged copy."""
    import stat

    from siasam_fast import training

    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader: the write does not block
    try:
        monkeypatch.setattr(training, "evaluate_checkpoint",
                            lambda *a, **k: {"num_examples": 1, "accuracy": 1.0})
        code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path, "--json", fifo)
        assert code == 0, err
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert json.loads(os.read(reader, 65536)) == {"num_examples": 1, "accuracy": 1.0}
    finally:
        os.close(reader)


def test_weights_passes_force_and_refuses_heads_without_clipbert(capsys, tmp_path, monkeypatch):
    from siasam_fast import weights

    calls = []

    def fetch(out, visual, text, force=False):
        calls.append(force)
        return {}

    monkeypatch.setattr(weights, "fetch_weights", fetch)
    monkeypatch.setattr(weights, "config_lines", lambda folders: "")
    for argv, force in (([], False), (["--force"], True)):
        code, _, err = run_cli(capsys, "weights", tmp_path / "w", *argv)
        assert code == 0 and calls[-1] is force, err
    code, _, err = run_cli(capsys, "weights", tmp_path / "w", "--heads", 12)
    assert_usage_error(code, err, "weights", "--heads goes with --clipbert")
    assert len(calls) == 2


def test_demo_gets_its_options(capsys, tmp_path, monkeypatch):
    from siasam_fast import demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: calls.append((a, k)))
    assert run_cli(capsys, "demo", "--out", tmp_path, "--videos", 5, "--seed", 3, "--quick")[0] \
        == 0
    assert calls == [((str(tmp_path),), {"videos": 5, "seed": 3, "quick": True})]


def test_train_goes_to_the_training_entry_point(capsys, monkeypatch):
    """`siasam-fast train ARGS` hands ARGS to train.py's main (its own parser); Ctrl-C while the
    training modules import is one line and exit status 130."""
    from siasam_fast import training

    calls = []

    def train_main(argv, prog=None):
        calls.append((argv, prog))
        return 7

    monkeypatch.setattr(training, "main", train_main)
    assert cli.main(["train", "--config", "x.yaml", "--set", "train.epochs=1"]) == 7
    assert calls == [(["--config", "x.yaml", "--set", "train.epochs=1"], "siasam-fast train")]

    def interrupted(argv, prog=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "main", interrupted)
    code, _, err = run_cli(capsys, "train")
    assert code == 130 and "interrupted while starting: nothing was written" in err


def test_sigterm_takes_the_ctrl_c_path_of_the_commands_that_keep_their_work(capsys, tmp_path,
                                                                            monkeypatch):
    """eval (one that writes what it has on a stop) gets SIGTERM as a KeyboardInterrupt; a
    command with nothing to keep (env) lets Ctrl-C through as it is."""
    import signal

    from siasam_fast import envcheck, training

    handlers = []

    def evaluated(*args, **kwargs):
        handlers.append(signal.getsignal(signal.SIGTERM))
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.setattr(training, "evaluate_checkpoint", evaluated)
        code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path)
        assert code == 130 and handlers == [cli._interrupt]
        assert "siasam-fast eval: interrupted; nothing was written" in err
    finally:
        signal.signal(signal.SIGTERM, previous)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(envcheck, "run_checks", stopped)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["env", "--no-decode"])


def test_train_help_shows_the_deepspeed_config_flag_not_deepspeeds_deprecated_ones(capsys):
    """`train --help` listed DeepSpeed's deprecated --deepscale flags and said nothing of the
    default DeepSpeed config (a newcomer walkthrough)."""
    from siasam_fast.training import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # (argparse wraps the help)
    assert "deepscale" not in out and "default: ZeRO stage 2 in the machine's precision" in out
    assert parse_args(["--deepspeed_config", "x.json"]).deepspeed_config == "x.json"
