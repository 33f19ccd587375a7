"""Short-GOP transcoding: frame counts and content kept, keyframes every G, resumable, robust."""

import json
import os
import shutil

import av
import numpy as np
import pytest
from videos import cut_copy, read_indices, video_path, write_index_video

from siasam_fast.pipeline import transcode as transcode_module
from siasam_fast.pipeline.manifest import load_manifest, probe_video
from siasam_fast.pipeline.planner import decode_cost
from siasam_fast.pipeline.pyav_decode import DecodeStats, decode_frames
from siasam_fast.pipeline.transcode import (
    PARAMS_NAME,
    TEMP_SUFFIX,
    EncoderUnavailableError,
    check_encoder,
    choose_encoder,
    encoder_options,
    main_transcode,
    nvenc_available,
    output_size,
    temp_path,
    transcode,
)

GOP = 8
# name -> (codec, frames, (height, width), writer options)
SOURCES = {
    "long_gop": ("h264", 60, (64, 64), dict(gop=30, bframes=2)),
    "sub/wide_vp9": ("vp9", 40, (48, 64), dict(gop=20)),
    "vfr": ("h264", 45, (64, 64), dict(gop=25, vfr=True)),
    "small": ("mjpeg", 20, (24, 24), {}),  # below the target height: not upscaled
}
HAS_X265 = "libx265" in av.codecs_available
NVENC, NVENC_WHY = nvenc_available("h264")


def write_sources(folder, names=SOURCES):
    for name in names:
        codec, n, size, options = SOURCES[name]
        write_index_video(video_path(folder, name, codec), n, codec=codec, size=size, **options)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("transcode")
    src = root / "src"
    write_sources(src)
    (src / "garbage.mp4").write_bytes(b"this is not a video")
    whole = (src / "long_gop.mp4").read_bytes()
    (src / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    summary = transcode(src, root / "dst", gop=GOP, height=32, workers=2, encoder="cpu",
                        progress=False)
    return src, root / "dst", summary


def test_frames_keyframes_and_size(converted):
    src, dst, summary = converted
    sources = load_manifest(dst / "source_manifest.jsonl")
    outputs = load_manifest(dst / "manifest.jsonl")
    assert sorted(outputs) == sorted(SOURCES)
    for vid, out in outputs.items():
        assert out.ok and out.relpath == f"{vid}.mp4" and out.codec == "h264"
        assert out.num_frames == sources[vid].num_frames == SOURCES[vid][1]
        assert out.keyframes == list(range(0, out.num_frames, GOP)), vid
        assert out.height % 2 == 0 and out.width % 2 == 0
    assert (outputs["long_gop"].height, outputs["long_gop"].width) == (32, 32)
    assert (outputs["sub/wide_vp9"].height, outputs["sub/wide_vp9"].width) == (32, 42)  # 4:3
    assert (outputs["small"].height, outputs["small"].width) == (24, 24)  # never upscaled
    assert outputs["long_gop"].fps == pytest.approx(25)
    assert len(summary.done) == 4 and not summary.skipped
    assert summary.bytes_in > 0 and summary.bytes_out == sum(r.size for r in outputs.values())
    assert summary.growth == pytest.approx(summary.bytes_out / summary.bytes_in)
    text = summary.summary()
    assert "4 transcoded" in text and "disk: 4 videos" in text and "CPU" in text


def test_content_preserved(converted):
    """Frame i of every output shows index i, as in its source (the index-encoding videos)."""
    _, dst, _ = converted
    for vid, out in load_manifest(dst / "manifest.jsonl").items():
        frames = decode_frames(out, np.arange(out.num_frames))
        assert read_indices(frames) == list(range(out.num_frames)), vid


def test_corrupt_inputs_reported_and_skipped(converted):
    _, dst, summary = converted
    failed = {r.relpath: r.reason for r in summary.failed}
    assert set(failed) == {"garbage.mp4", "truncated.mp4"}
    assert all(reason.startswith("corrupt input") for reason in failed.values())
    assert not (dst / "garbage.mp4").exists() and not (dst / "truncated.mp4").exists()
    assert "failed: garbage.mp4: corrupt input" in summary.summary()
    assert not list(dst.rglob(f"*{TEMP_SUFFIX}"))


def test_a_source_whose_only_fault_is_its_timestamps_is_re_timed(tmp_path):
    """H.264 with B-frames in AVI: its packets carry decode-order times, so its frames, which
    decode in order, cannot be indexed by pts and the manifest marks it corrupt. The transcode,
    which the reason names, used to refuse it as a corrupt input; it now makes an indexable copy
    with every frame in its place."""
    src = tmp_path / "src"
    write_index_video(src / "bframes.avi", 40, "h264", size=32, gop=12, bframes=2)
    summary = transcode(src, tmp_path / "dst", gop=GOP, workers=1, encoder="cpu",
                        progress=False)
    assert not summary.failed, summary.summary()
    source = probe_video(src / "bframes.avi", src)
    assert source.status == "corrupt" and source.num_frames == 40
    assert "`siasam-fast transcode` re-times it" in source.reason
    out = load_manifest(tmp_path / "dst" / "manifest.jsonl")["bframes"]
    assert out.ok and out.num_frames == 40
    assert read_indices(decode_frames(out, np.arange(40))) == list(range(40))


def test_a_tag_that_is_not_utf8_is_no_fault(tmp_path):
    """A Latin-1 byte in a metadata tag: the index calls the file ok, and its transcode failed
    with a bare UnicodeDecodeError (the source was opened without manifest.open_video)."""
    source = video_path(tmp_path / "src", "tag", "h264")
    write_index_video(source, 30, codec="h264", size=(32, 32), gop=10)
    data = source.read_bytes()
    at = data.find(b"Lavf")
    assert at > 0
    source.write_bytes(data[:at] + b"Caf\xe9" + data[at + 4:])
    summary = transcode(tmp_path / "src", tmp_path / "dst", gop=GOP, height=32, workers=1,
                        encoder="cpu", progress=False)
    assert not summary.failed, summary.summary()
    assert read_indices(decode_frames(load_manifest(tmp_path / "dst" / "manifest.jsonl")["tag"],
                                      [0, 29])) == [0, 29]


def write_turned_video(path, degrees: int, frames: int = 6):
    """A 64x32 H.264 video whose left half is white, marked to be shown turned by ``degrees``
    counter-clockwise (a phone's portrait video is stored sideways with such a mark)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :32] = 255
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(degrees)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("mode", ["decode", "demux"])
def test_a_video_turned_for_display_is_indexed_as_such_and_transcoded_upright(tmp_path, mode):
    """Rotation metadata was ignored: a phone's portrait video was indexed, trained on and
    transcoded sideways without a word. The index records it and says so; the transcode turns
    the frames and writes an upright copy (which has no rotation left)."""
    from siasam_fast.pipeline.manifest import build_manifest

    src = tmp_path / "src"
    write_turned_video(src / "clockwise.mp4", -90)  # shown turned 90 degrees clockwise
    write_turned_video(src / "upside.mp4", 180)
    write_turned_video(src / "plain.mp4", 0)
    build = build_manifest(src, tmp_path / "m.jsonl", workers=1, mode=mode, progress=False)
    assert {k: r.rotation for k, r in build.items()} == {"clockwise": -90, "upside": 180,
                                                         "plain": 0}
    assert ("2 videos are turned for display (e.g. clockwise.mp4: -90 degrees): their frames are "
            "read as stored, not turned; `siasam-fast transcode` writes upright copies"
            ) in build.summary()
    if mode == "demux":
        return
    transcode(src, tmp_path / "dst", gop=GOP, workers=1, encoder="cpu", progress=False)
    out = load_manifest(tmp_path / "dst" / "manifest.jsonl")
    assert {k: (r.width, r.height, r.rotation) for k, r in out.items()} == {
        "clockwise": (32, 64, 0), "upside": (64, 32, 0), "plain": (64, 32, 0)}
    first = {k: decode_frames(r, [0])[0].astype(float).mean(-1) for k, r in out.items()}
    top, bottom = first["clockwise"][:32].mean(), first["clockwise"][32:].mean()
    assert top > 200 and bottom < 50  # the white left side, turned clockwise, is on top
    left, right = first["upside"][:, :32].mean(), first["upside"][:, 32:].mean()
    assert right > 200 and left < 50  # upside down: white on the right
    assert first["plain"][:, :32].mean() > 200 and first["plain"][:, 32:].mean() < 50


def test_short_gop_reduces_measured_decoding(converted):
    """The point of it all: the same late frames cost fewer decoded frames after transcoding,
    as the cost model predicts."""
    src, dst, _ = converted
    before = load_manifest(dst / "source_manifest.jsonl")["long_gop"]
    after = load_manifest(dst / "manifest.jsonl")["long_gop"]
    frames = [27, 28, 29]
    costs = []
    for record in (before, after):
        stats = DecodeStats()
        assert read_indices(decode_frames(record, frames, stats=stats)) == frames
        assert stats.decoded == decode_cost(record.keyframes, frames).decoded
        costs.append(stats.decoded)
    assert costs == [30, 6]  # from frame 0 (keyframes 0, 30) vs from keyframe 24


def test_resume_skips_complete_and_redoes_partial(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["long_gop", "vfr", "small"])
    first = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert len(first.done) == 3
    stamp = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.mp4")}

    again = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert len(again.skipped) == 3 and not again.done
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("*.mp4")} == stamp
    assert again.bytes_out == first.bytes_out

    # An interrupted run: a temp file left behind (never indexed) and a truncated output; a
    # complete output whose record never reached the manifest; a deleted output.
    temp_path(dst / "x.mp4").write_bytes(b"half an mp4")
    data = (dst / "long_gop.mp4").read_bytes()
    (dst / "long_gop.mp4").write_bytes(data[: len(data) // 3])
    records = load_manifest(dst / "manifest.jsonl")
    del records["vfr"]
    from siasam_fast.pipeline.manifest import write_manifest

    write_manifest(records.values(), dst / "manifest.jsonl")
    (dst / "small.mp4").unlink()

    resumed = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    status = {r.video_id: r.status for r in resumed.results}
    assert status == {"long_gop": "done", "small": "done", "vfr": "skipped"}
    assert (dst / "vfr.mp4").stat().st_mtime_ns == stamp["vfr.mp4"]  # verified, not redone
    assert not list(dst.rglob(f"*{TEMP_SUFFIX}"))
    outputs = load_manifest(dst / "manifest.jsonl")
    assert sorted(outputs) == ["long_gop", "small", "vfr"]
    for out in outputs.values():
        assert out.ok and out.keyframes == list(range(0, out.num_frames, GOP))
        assert read_indices(decode_frames(out, [out.num_frames - 1])) == [out.num_frames - 1]

    # Other parameters: every output is redone.
    regop = transcode(src, dst, gop=4, workers=1, encoder="cpu", progress=False)
    assert len(regop.done) == 3
    assert all(r.keyframes == list(range(0, r.num_frames, 4))
               for r in load_manifest(dst / "manifest.jsonl").values())
    assert '"gop": 4' in (dst / PARAMS_NAME).read_text()


def test_an_interrupted_transcode_leaves_a_manifest_marked_incomplete(tmp_path, monkeypatch):
    """Stopped after its first output, transcode keeps what is done (the next run continues), and
    its manifest says it is incomplete: loading it for training is refused until a run ends."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["long_gop", "vfr", "small"])
    real = transcode_module._run_all

    def one_then_stop(*args, **kwargs):
        for n, result in enumerate(real(*args, **kwargs)):
            if n == 1:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(transcode_module, "_run_all", one_then_stop)
    with pytest.raises(KeyboardInterrupt):
        transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    with pytest.raises(ValueError, match=r"is incomplete \(2 video\(s\) had no record yet when "
                       r"`siasam-fast transcode` stopped\)"):
        load_manifest(dst / "manifest.jsonl")
    assert len(load_manifest(dst / "manifest.jsonl", allow_incomplete=True)) == 1
    monkeypatch.setattr(transcode_module, "_run_all", real)
    resumed = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    # the second output may have been finished when the stop came: verified and kept
    assert len(resumed.skipped) + len(resumed.done) == 3 and resumed.done
    assert sorted(load_manifest(dst / "manifest.jsonl")) == ["long_gop", "small", "vfr"]
    assert not (dst / "manifest.jsonl.incomplete").exists()


@pytest.mark.skipif(not HAS_X265, reason="this FFmpeg has no libx265")
def test_hevc(tmp_path):
    src = tmp_path / "src"
    write_sources(src, ["vfr"])
    summary = transcode(src, tmp_path / "dst", gop=5, codec="hevc", height=32, workers=1,
                        encoder="cpu", progress=False)
    out = load_manifest(tmp_path / "dst" / "manifest.jsonl")["vfr"]
    assert summary.encoder == "libx265" and out.codec == "hevc"
    assert out.keyframes == list(range(0, 45, 5)) and out.height == 32
    assert read_indices(decode_frames(out, np.arange(45))) == list(range(45))
    # a frame 4 px wide: libx265 does not open (a bare "ArgumentError ... returned 22" before)
    write_index_video(video_path(tmp_path / "thin", "thin", "h264"), 10, codec="h264",
                      size=(480, 4))
    thin = transcode(tmp_path / "thin", tmp_path / "thin_dst", gop=5, codec="hevc", workers=1,
                     encoder="cpu", progress=False)
    assert [r.reason for r in thin.failed] == [
        "libx265 did not open for this video (Invalid argument): it refuses frames a few pixels "
        "wide or high; --codec h264 encodes them"]


@pytest.mark.skipif(not NVENC, reason=f"no NVENC here: {NVENC_WHY}")
def test_nvenc(tmp_path):
    # NVENC (Turing and later) refuses frames under 145 px a side: the sources' 64 px would fail.
    src = tmp_path / "src"
    for name in ("long_gop", "vfr"):
        codec, n, _, options = SOURCES[name]
        write_index_video(video_path(src, name, codec), n, codec=codec, size=(160, 192),
                          **options)
    summary = transcode(src, tmp_path / "dst", gop=GOP, workers=1, encoder="nvenc",
                        progress=False)
    assert summary.hardware and summary.encoder == "h264_nvenc" and "NVENC" in summary.summary()
    for out in load_manifest(tmp_path / "dst" / "manifest.jsonl").values():
        assert out.num_frames == SOURCES[out.video_id][1]
        assert out.keyframes == list(range(0, out.num_frames, GOP))
        assert read_indices(decode_frames(out, np.arange(out.num_frames))) == list(
            range(out.num_frames))


@pytest.mark.skipif(NVENC, reason="NVENC works here")
def test_nvenc_requested_but_missing_says_why(tmp_path):
    with pytest.raises(RuntimeError, match=r"encoder 'nvenc' asked for \(--encoder nvenc\), "
                                           r"but .*encoder 'cpu'"):
        choose_encoder("h264", "nvenc")
    # A bad argument for this machine (the CLI's one-line error), before anything is written.
    with pytest.raises(EncoderUnavailableError) as err:
        transcode(tmp_path, tmp_path.parent / f"{tmp_path.name}_dst", gop=8, encoder="nvenc",
                  progress=False)
    assert isinstance(err.value, ValueError) and "avcodec_open2" not in str(err.value)
    assert not (tmp_path.parent / f"{tmp_path.name}_dst").exists()
    assert choose_encoder("h264", "auto") == ("libx264", False)


def test_cli(tmp_path, capsys):
    src = tmp_path / "src"
    write_sources(src, ["small"])
    dst = tmp_path / "dst"
    argv = [str(src), str(dst), "--gop", "4", "--height", "16", "--workers", "1",
            "--encoder", "cpu", "--no-progress"]
    assert main_transcode(argv) == 0
    out = capsys.readouterr().out
    assert "1 transcoded" in out and "disk: 1 videos" in out
    record = load_manifest(dst / "manifest.jsonl")["small"]
    assert record.height == 16 and record.keyframes == [0, 4, 8, 12, 16]
    shutil.rmtree(src)
    os.makedirs(src)
    (src / "bad.mp4").write_bytes(b"nope")
    assert main_transcode([str(src), str(tmp_path / "dst2"), "--gop", "4", "--no-progress",
                           "--encoder", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "0 transcoded" in out and "1 failed" in out and "disk: 0 videos" in out
    assert "nan" not in out  # no "xnan" growth when no video has an output


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(gop=0), ValueError, r"gop=0: must be an integer >= 1"),
        (dict(gop=8, height=31), ValueError, r"height=31: must be an even integer"),
        (dict(gop=8, codec="vp9"), ValueError, r"codec='vp9': valid codecs are h264, hevc"),
        (dict(gop=8, encoder="gpu"), ValueError, r"encoder='gpu': valid encoders are auto"),
        (dict(gop=8, workers=-1), ValueError, r"workers=-1: must be >= 0"),
        (dict(gop=8, crf=99), ValueError, r"crf=99: libx264 takes a CRF from 0 .* to 51"),
        (dict(gop=8, crf=-1), ValueError, r"crf=-1: libx264 takes a CRF from 0"),
        (dict(gop=8, codec="hevc", crf=52), ValueError, r"crf=52: libx265 takes a CRF from 0"),
        (dict(gop=8, bframes=-1), ValueError, r"bframes=-1: must be an integer from 0 .* to 16"),
        (dict(gop=8, bframes=17), ValueError, r"bframes=17: must be an integer from 0"),
        (dict(gop=8, preset="fsat"), ValueError,
         r"preset='fsat': valid libx264 presets are ultrafast, superfast, .*, veryslow, placebo"),
    ],
)
def test_errors_name_the_value(tmp_path, kwargs, error, match):
    write_sources(tmp_path / "src", ["small"])
    if kwargs.get("codec") == "hevc" and not HAS_X265:
        pytest.skip("this FFmpeg has no libx265")
    with pytest.raises(error, match=match):
        transcode(tmp_path / "src", tmp_path / "dst", progress=False,
                  **{"encoder": "cpu", **kwargs})
    assert not (tmp_path / "dst").exists()  # checked before anything is written


def test_encoder_refusals_are_caught_up_front():
    """What the encoder itself refuses (past the range checks): one ValueError naming the
    settings, FFmpeg's reason, not PyAV's raw "avcodec_open2(name, {options})"."""
    check_encoder("libx264", encoder_options("libx264", 16, 0, "veryslow", 0))
    with pytest.raises(ValueError, match=r"the libx264 encoder refuses the settings "
                       r"preset=fsat, crf=20, g=16 \(Invalid argument\)") as err:
        check_encoder("libx264", {"preset": "fsat", "crf": "20", "g": "16"})
    assert "{" not in str(err.value)


def test_source_folder_errors(tmp_path):
    with pytest.raises(NotADirectoryError, match=r"src_dir='.*nope' is not a folder \(it does "
                       r"not exist\)"):
        transcode(tmp_path / "nope", tmp_path / "dst", gop=8, progress=False)
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "readme.txt").write_text("no videos here")
    with pytest.raises(ValueError, match=r"src_dir='.*src' holds no videos \(looked for \.mp4 "
                       r"\.m4v .* files, in subfolders too"):
        transcode(tmp_path / "src", tmp_path / "dst", gop=8, encoder="cpu", progress=False)
    assert not (tmp_path / "dst").exists()
    write_sources(tmp_path / "src", ["small"])
    (tmp_path / "dst").write_text("a file")
    with pytest.raises(NotADirectoryError, match=r"dst_dir='.*dst' is a file, not a folder"):
        transcode(tmp_path / "src", tmp_path / "dst", gop=8, encoder="cpu", progress=False)


def _snapshot(folder):
    """Every file under ``folder``: bytes and mtime."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def complete_dst(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["small", "vfr"])
    first = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert len(first.done) == 2
    return src, dst


def test_bad_settings_leave_a_complete_dst_untouched(complete_dst, capsys):
    """The audit's data loss: other parameters plus a preset typo deleted every finished output
    and emptied the manifest, then failed. Now nothing is touched."""
    src, dst = complete_dst
    before = _snapshot(dst)
    assert {"small.mp4", "vfr.mp4", "manifest.jsonl", PARAMS_NAME} <= set(before)
    for bad in (dict(preset="fsat"), dict(crf=99), dict(bframes=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            transcode(src, dst, gop=16, workers=1, encoder="cpu", progress=False, **bad)
        assert _snapshot(dst) == before, bad
    with pytest.raises(SystemExit) as exit_info:
        main_transcode([str(src), str(dst), "--gop", "16", "--preset", "fsat", "--workers", "1",
                        "--encoder", "cpu", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("siasam-fast transcode: error: --preset fsat: valid libx264 presets")
    assert "ultrafast" in err and "veryslow" in err and len(err.splitlines()) == 1
    assert _snapshot(dst) == before
    assert len(load_manifest(dst / "manifest.jsonl")) == 2


def test_changed_parameters_replace_outputs_only_once_verified(complete_dst, monkeypatch):
    """Other parameters redo every output, but an output whose redo fails keeps its old version
    and manifest record, and the next run redoes it."""
    src, dst = complete_dst
    old_small = (dst / "small.mp4").read_bytes()
    old_record = load_manifest(dst / "manifest.jsonl")["small"]
    encode = transcode_module._encode

    def failing(source, tmp, job):
        if job.video_id == "small":
            tmp.write_bytes(b"half an mp4")
            raise OSError("disk full")
        return encode(source, tmp, job)

    monkeypatch.setattr(transcode_module, "_encode", failing)
    regop = transcode(src, dst, gop=4, workers=1, encoder="cpu", progress=False)
    status = {r.video_id: (r.status, r.reason) for r in regop.results}
    assert status["vfr"] == ("done", "")
    assert status["small"][0] == "failed" and "disk full" in status["small"][1]
    assert "previous parameters is kept" in status["small"][1]
    assert (dst / "small.mp4").read_bytes() == old_small  # never deleted, never half-replaced
    records = load_manifest(dst / "manifest.jsonl")
    assert sorted(records) == ["small", "vfr"]  # the manifest keeps the record not redone
    assert records["small"].keyframes == old_record.keyframes == list(range(0, 20, GOP))
    assert records["vfr"].keyframes == list(range(0, 45, 4))
    assert json.loads((dst / PARAMS_NAME).read_text())["stale"] == ["small"]
    assert not list(dst.rglob(f"*{TEMP_SUFFIX}"))

    monkeypatch.setattr(transcode_module, "_encode", encode)
    again = transcode(src, dst, gop=4, workers=1, encoder="cpu", progress=False)
    assert {r.video_id: r.status for r in again.results} == {"small": "done", "vfr": "skipped"}
    records = load_manifest(dst / "manifest.jsonl")
    assert all(r.keyframes == list(range(0, r.num_frames, 4)) for r in records.values())
    assert json.loads((dst / PARAMS_NAME).read_text())["stale"] == []


def test_folders_must_not_nest(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match="must not contain each other"):
        transcode(tmp_path / "src", tmp_path / "src" / "gop8", gop=8, progress=False)
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        transcode(tmp_path / "nowhere", tmp_path / "dst", gop=8, progress=False)
    # through a link: each run transcoded the previous outputs again, one folder deeper
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "src" / "out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ValueError, match=r"is inside src_dir=.* through the link '.*src/out'"):
        transcode(tmp_path / "src", tmp_path / "elsewhere", gop=8, progress=False)


def test_output_size_and_options():
    assert output_size(1280, 720, 240) == (426, 240)
    assert output_size(1920, 1080, None) == (1920, 1080)
    assert output_size(640, 360, 720) == (640, 360)  # never upscaled
    assert output_size(641, 361, None) == (640, 360)  # even sides for 4:2:0
    assert output_size(218, 100, 20) == (44, 20)  # 43.6 wide: the nearest even width
    x264 = encoder_options("libx264", 16, None, None, None)
    assert x264["g"] == x264["keyint_min"] == "16" and x264["sc_threshold"] == "0"
    assert "open-gop=0" in x264["x264-params"] and "scenecut=0" in x264["x264-params"]
    x265 = encoder_options("libx265", 16, 25, "medium", 2)
    assert "keyint=16:min-keyint=16:scenecut=0:open-gop=0" in x265["x265-params"]
    assert x265["crf"] == "25" and x265["bf"] == "2"
    nv = encoder_options("h264_nvenc", 16, None, None, None)
    assert nv["g"] == "16" and nv["no-scenecut"] == "1" and nv["forced-idr"] == "1"
    assert nv["strict_gop"] == "1"


def test_duplicate_video_ids_reported(tmp_path):
    src = tmp_path / "src"
    write_sources(src, ["small"])
    write_index_video(src / "small.mp4", 10, size=16)  # same video_id as small.avi
    summary = transcode(src, tmp_path / "dst", gop=4, workers=1, encoder="cpu", progress=False)
    assert [r.relpath for r in summary.done] == ["small.avi"]
    assert [(r.relpath, r.status) for r in summary.failed] == [("small.mp4", "failed")]
    assert "same video_id" in summary.summary()


def _transcode_then_replace_a_source(tmp_path, older_mtime: bool):
    """SRC (long_gop, small) transcoded to DST, then long_gop replaced by other content of the
    same length (frames show 500..559), with a newer mtime or one a second older than before."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["long_gop", "small"])
    transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    path = video_path(src, "long_gop", "h264")
    before = path.stat()
    write_index_video(path, 60, codec="h264", size=64, gop=30, bframes=2, first_index=500)
    if older_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns - 10**9))
    return src, dst


@pytest.mark.parametrize("older_mtime", [False, True])
def test_a_replaced_source_redoes_its_output(tmp_path, older_mtime):
    """A source replaced by other content with the same frame count kept its old output: with
    a newer mtime the job saw a complete output of the right length and skipped it; with an
    older one (rsync -a, cp -p, tar) the output was trusted outright."""
    src, dst = _transcode_then_replace_a_source(tmp_path, older_mtime)
    again = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    status = {r.video_id: r.status for r in again.results}
    assert status == {"long_gop": "done", "small": "skipped"}
    out = load_manifest(dst / "manifest.jsonl")["long_gop"]
    assert read_indices(decode_frames(out, [0, 59])) == [500, 559]
    third = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert {r.status for r in third.results} == {"skipped"}  # its source is the one recorded


def test_a_copy_of_the_sources_with_new_mtimes_redoes_nothing(tmp_path):
    """`cp -r` gives every source a new mtime: the outputs were all made again (hours on a real
    data set), though "a re-run redoes only what changed". A digest of each source's ends tells
    a copy from a replaced file; a source replaced in the copy is still redone."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["long_gop", "small"])
    transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, copy_function=shutil.copy)  # (new mtimes: not cp -p)
    (copy / "manifest.jsonl").unlink(missing_ok=True)
    for path in copy.rglob("*.mp4"):
        assert path.stat().st_mtime_ns > (src / path.relative_to(copy)).stat().st_mtime_ns
    again = transcode(copy, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert {r.video_id: r.status for r in again.results} == {"long_gop": "skipped",
                                                             "small": "skipped"}
    write_index_video(video_path(copy, "long_gop", "h264"), 60, codec="h264", size=64, gop=30,
                      bframes=2, first_index=500)
    third = transcode(copy, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert {r.video_id: r.status for r in third.results} == {"long_gop": "done",
                                                             "small": "skipped"}
    out = load_manifest(dst / "manifest.jsonl")["long_gop"]
    assert read_indices(decode_frames(out, [0, 59])) == [500, 559]


def test_outputs_of_deleted_sources_are_kept_and_named(tmp_path):
    """A source deleted after its transcode (to save disk, say) leaves its output the only copy:
    kept in dst and its manifest, and the summary names it, so that training on a manifest with
    more videos than the sources never goes unnoticed."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["long_gop", "small"])
    first = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert first.orphans == [] and "no output of a source" not in first.summary()
    video_path(src, "long_gop", "h264").unlink()
    again = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert again.orphans == ["long_gop"]
    assert (dst / "long_gop.mp4").is_file()
    assert set(load_manifest(dst / "manifest.jsonl")) == {"long_gop", "small"}
    assert ("1 video(s) of the manifest are no output of a source video (deleted or moved since "
            "they were transcoded, or put there): long_gop; kept") in again.summary()


def _statuses(summary):
    return {r.video_id: r.status for r in summary.results}


def test_a_source_manifest_counting_other_frames_fails_the_video(complete_dst):
    """The source manifest is the reference: a count that the source (or its existing output)
    does not have fails the video with the reason, never keeps an output of another length."""
    src, dst = complete_dst
    from siasam_fast.pipeline.manifest import write_manifest

    records = load_manifest(dst / "source_manifest.jsonl")
    records["small"].num_frames = 19  # size and mtime kept: the record is reused as it is
    write_manifest(records.values(), dst / "source_manifest.jsonl")
    again = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert _statuses(again) == {"small": "failed", "vfr": "skipped"}
    assert again.failed[0].reason == ("the source decoded to 20 frames but its manifest counts "
                                      "19 (stale manifest?)")


def test_an_output_changed_since_its_record_is_verified_again(complete_dst):
    """An output whose size (mtime put back) or mtime (same size) differs from its manifest
    record is verified again, and redone when it fails."""
    src, dst = complete_dst
    stat = (dst / "small.mp4").stat()
    data = (dst / "small.mp4").read_bytes()
    (dst / "small.mp4").write_bytes(data[: len(data) // 3])
    os.utime(dst / "small.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    size = (dst / "vfr.mp4").stat().st_size
    (dst / "vfr.mp4").write_bytes(b"\0" * size)
    again = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert _statuses(again) == {"small": "done", "vfr": "done"}
    for out in load_manifest(dst / "manifest.jsonl").values():
        assert out.ok and read_indices(decode_frames(out, [out.num_frames - 1])) == [
            out.num_frames - 1]


def _forget_sources(dst):
    """transcode.json as an older siasam-fast wrote it: no fingerprints of the sources."""
    stamp = json.loads((dst / PARAMS_NAME).read_text())
    del stamp["sources"]
    (dst / PARAMS_NAME).write_text(json.dumps(stamp))


def test_outputs_of_an_older_version_without_source_fingerprints(tmp_path):
    """Outputs of a run that recorded no source fingerprints are kept and get theirs; a source
    probed again since (it changed) redoes its output all the same."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["long_gop", "small"])
    transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    _forget_sources(dst)
    again = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert _statuses(again) == {"long_gop": "skipped", "small": "skipped"}
    assert sorted(json.loads((dst / PARAMS_NAME).read_text())["sources"]) == ["long_gop", "small"]

    _forget_sources(dst)
    path = video_path(src, "long_gop", "h264")
    before = path.stat()
    write_index_video(path, 60, codec="h264", size=64, gop=30, bframes=2, first_index=500)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns - 10**9))  # older: cp -p, rsync -a
    third = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert _statuses(third) == {"long_gop": "done", "small": "skipped"}
    out = load_manifest(dst / "manifest.jsonl")["long_gop"]
    assert read_indices(decode_frames(out, [0, 59])) == [500, 559]


def test_a_source_replaced_and_indexed_before_the_transcode(tmp_path):
    """`siasam-fast index` run on the sources after one was replaced (by a copy keeping an older
    mtime): the transcode finds the source manifest up to date (nothing probed) and the output
    newer than the source, and still redoes that output (the source's fingerprint tells)."""
    from siasam_fast.pipeline.manifest import build_manifest

    src, dst = _transcode_then_replace_a_source(tmp_path, older_mtime=True)
    indexed = build_manifest(src, dst / "source_manifest.jsonl", workers=1, progress=False)
    assert indexed.probed == ["long_gop"]
    again = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert _statuses(again) == {"long_gop": "done", "small": "skipped"}
    out = load_manifest(dst / "manifest.jsonl")["long_gop"]
    assert read_indices(decode_frames(out, [0, 59])) == [500, 559]


def test_an_interrupted_redo_keeps_the_records_of_outputs_not_yet_redone(complete_dst,
                                                                        monkeypatch):
    """Other parameters, stopped after the first output: the manifest still lists the other
    output (its old version is still there), not only the one redone."""
    src, dst = complete_dst
    real = transcode_module._run_all

    def one_then_stop(*args, **kwargs):
        for result in real(*args, **kwargs):
            yield result
            raise KeyboardInterrupt

    monkeypatch.setattr(transcode_module, "_run_all", one_then_stop)
    with pytest.raises(KeyboardInterrupt):
        transcode(src, dst, gop=4, workers=1, encoder="cpu", progress=False)
    records = load_manifest(dst / "manifest.jsonl", allow_incomplete=True)
    assert sorted(records) == ["small", "vfr"]
    assert sorted(len(r.keyframes) for r in records.values()) in ([3, 12], [5, 6])


def test_a_redo_marks_the_manifest_incomplete_before_it_replaces_an_output(complete_dst,
                                                                            monkeypatch):
    """A run killed outright (SIGKILL, the OOM killer) saves nothing on its way out: from its
    first replaced output on, the manifest must already be refused, not list the old outputs'
    records (size, keyframes) as if complete."""
    src, dst = complete_dst
    real = transcode_module._run_all
    seen = []

    def check_first(*args, **kwargs):
        for result in real(*args, **kwargs):
            # the first output has been replaced: a SIGKILL now leaves the manifest as it is
            try:
                load_manifest(dst / "manifest.jsonl")
                seen.append("loads as complete")
            except ValueError as err:
                seen.append(str(err))
            yield result

    monkeypatch.setattr(transcode_module, "_run_all", check_first)
    summary = transcode(src, dst, gop=4, workers=1, encoder="cpu", progress=False)
    assert len(summary.done) == 2
    assert seen and "is incomplete" in seen[0], seen
    assert not (dst / "manifest.jsonl.incomplete").exists()  # the finished run removes it


def test_a_rerun_with_nothing_to_do_shows_no_empty_progress_bar(complete_dst, capsys):
    """As ``index`` does: a re-run that finds every output complete draws no "0video" bar."""
    src, dst = complete_dst
    capsys.readouterr()
    summary = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=True)
    assert len(summary.skipped) == 2 and not summary.done
    assert "transcode gop=" not in capsys.readouterr().err


def test_a_replaced_source_whose_transcode_fails_loses_its_old_output(tmp_path, monkeypatch):
    """The old output shows another video than the source now: when the redo fails it is removed
    (and left out of the manifest), never kept as the source's output."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["long_gop", "small"])
    transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    write_index_video(video_path(src, "long_gop", "h264"), 60, codec="h264", size=64, gop=30,
                      bframes=2, first_index=500)
    encode = transcode_module._encode

    def failing(source, tmp, job):
        if job.video_id == "long_gop":
            raise OSError("disk full")
        return encode(source, tmp, job)

    monkeypatch.setattr(transcode_module, "_encode", failing)
    again = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert _statuses(again) == {"long_gop": "failed", "small": "skipped"}
    assert "the output made from the source's earlier version was removed" in again.failed[0].reason
    assert not (dst / "long_gop.mp4").exists()
    assert sorted(load_manifest(dst / "manifest.jsonl")) == ["small"] and again.orphans == []


def test_outputs_with_other_keyframes_are_reported(tmp_path, monkeypatch):
    """An encoder that ignored the GOP settings: the outputs are kept and the summary names them,
    also when such an output is verified again by a later run."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["small"])
    regular = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert "keyframes other than" not in regular.summary()
    options = transcode_module.encoder_options
    monkeypatch.setattr(transcode_module, "encoder_options",
                        lambda name, gop, *args: options(name, 5, *args))
    other = tmp_path / "other"
    irregular = transcode(src, other, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert load_manifest(other / "manifest.jsonl")["small"].keyframes == [0, 5, 10, 15]
    text = "1 outputs have keyframes other than every 8 frames (encoder ignored the GOP settings?)"
    assert text in irregular.summary()
    from siasam_fast.pipeline.manifest import write_manifest

    write_manifest([], other / "manifest.jsonl")  # the output is verified again, not redone
    again = transcode(src, other, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert _statuses(again) == {"small": "skipped"} and text in again.summary()


def test_source_inside_destination_is_refused(tmp_path):
    (tmp_path / "out" / "src").mkdir(parents=True)
    with pytest.raises(ValueError, match="must not contain each other"):
        transcode(tmp_path / "out" / "src", tmp_path / "out", gop=8, progress=False)


def test_another_height_redoes_every_output(complete_dst):
    src, dst = complete_dst
    again = transcode(src, dst, gop=GOP, height=16, workers=1, encoder="cpu", progress=False)
    assert _statuses(again) == {"small": "done", "vfr": "done"}
    assert {r.height for r in load_manifest(dst / "manifest.jsonl").values()} == {16}


def test_a_source_replaced_and_indexed_since_an_older_version_made_its_output(tmp_path):
    """No source fingerprints (transcode.json of an older siasam-fast) and the replaced source
    indexed before the transcode (nothing probed by it): the source, newer than the output, was
    seen to have changed, yet the job verified the old output and kept it."""
    from siasam_fast.pipeline.manifest import build_manifest

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_sources(src, ["long_gop", "small"])
    transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    _forget_sources(dst)
    write_index_video(video_path(src, "long_gop", "h264"), 60, codec="h264", size=64, gop=30,
                      bframes=2, first_index=500)
    assert build_manifest(src, dst / "source_manifest.jsonl", workers=1,
                          progress=False).probed == ["long_gop"]
    again = transcode(src, dst, gop=GOP, workers=1, encoder="cpu", progress=False)
    assert _statuses(again) == {"long_gop": "done", "small": "skipped"}
    out = load_manifest(dst / "manifest.jsonl")["long_gop"]
    assert read_indices(decode_frames(out, [0, 59])) == [500, 559]


def test_a_cut_source_is_transcoded_from_its_first_shown_frame(tmp_path):
    """A source cut without re-encoding (packets hidden by an mp4 edit list before its first
    frame) was a corrupt input ("truncated"); its output starts at the cut."""
    whole = write_index_video(tmp_path / "whole.mp4", 48, codec="h264", size=32, gop=24,
                              bframes=0)
    (tmp_path / "src").mkdir()
    cut_copy(whole, tmp_path / "src" / "cut.mp4", 5)
    summary = transcode(tmp_path / "src", tmp_path / "dst", gop=GOP, workers=1, encoder="cpu",
                        progress=False)
    assert _statuses(summary) == {"cut": "done"}, summary.summary()
    out = load_manifest(tmp_path / "dst" / "manifest.jsonl")["cut"]
    assert out.num_frames == 43 and out.keyframes == list(range(0, 43, GOP))
    assert read_indices(decode_frames(out, np.arange(43))) == list(range(5, 48))


def test_nvenc_crf_0_is_best_quality_not_automatic():
    # NVENC's cq 0 means "automatic" (FFmpeg: "0 to 51, 0 means automatic"): plain VBR at the
    # encoder's default 2 Mbit/s, not the best quality that --crf 0 promises.
    for name in ("h264_nvenc", "hevc_nvenc"):
        best = encoder_options(name, 16, 0, None, None)
        assert best.get("cq") != "0"
        assert best["rc"] == "constqp" and best["qp"] == "0"
        assert encoder_options(name, 16, 1, None, None)["cq"] == "1"


@pytest.mark.skipif(NVENC or "h264_nvenc" not in av.codecs_available,
                    reason="needs an FFmpeg with h264_nvenc that does not open here")
def test_nvenc_open_failure_of_one_video_says_why(tmp_path):
    # NVENC opened on the check's 256x256 frame, but refuses a video (frames under its minimum
    # size, more sessions than a GeForce allows): the reason says so, not a bare errno. Here the
    # open fails for want of a GPU, which takes the same path.
    src = write_index_video(tmp_path / "a.mp4", 4, size=32)
    dst = tmp_path / "out"
    dst.mkdir()
    options = encoder_options("h264_nvenc", 4, None, None, None)
    job = transcode_module._Job(str(src), str(dst / "a.mp4"), str(dst), "a", 4, 4, None,
                                "h264_nvenc", options, 1, "decode")
    result = transcode_module._transcode_one(job)
    assert result.status == "failed"
    assert "h264_nvenc did not open for this video" in result.reason
    assert "145" in result.reason and "--workers" in result.reason
    assert "--encoder cpu" in result.reason and "avcodec_open2" not in result.reason
