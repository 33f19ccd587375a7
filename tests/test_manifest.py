"""The video manifest: probing, statuses of bad files, incremental re-runs, atomic writes."""

import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest
from videos import cut_copy, video_path, write_index_video

from siasam_fast.pipeline import manifest as manifest_module
from siasam_fast.pipeline.manifest import (
    VideoRecord,
    build_manifest,
    load_manifest,
    main_index,
    probe_video,
)


def write_zero_frame_avi(path):
    container = av.open(str(path), "w")
    stream = container.add_stream("mjpeg", rate=25)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuvj420p"
    container.start_encoding()
    container.close()


def write_audio_only(path):
    container = av.open(str(path), "w")
    stream = container.add_stream("aac", rate=8000)
    for i in range(4):
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts = 8000, i * 1024
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def faststart_copy(src, dst):
    """Remux with the index (moov) first: truncating it keeps a readable header."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


@pytest.fixture
def video_dir(tmp_path):
    """Good videos of three codecs (one nested) and every kind of bad file."""
    folder = tmp_path / "videos"
    write_index_video(video_path(folder, "video1", "h264"), 60, "h264", size=32, gop=12)
    write_index_video(video_path(folder, "clip_vp9", "vp9"), 30, "vp9", size=32, gop=10)
    write_index_video(video_path(folder / "sub", "x", "mjpeg"), 20, "mjpeg", size=32)
    write_index_video(video_path(folder, "vfr", "h264"), 40, "h264", size=32, vfr=True)
    (folder / "empty.mp4").write_bytes(b"")
    data = (folder / "video1.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    long = write_index_video(tmp_path / "long.mp4", 120, "h264", size=32, gop=12)
    faststart_copy(long, tmp_path / "fs.mp4")
    fs = (tmp_path / "fs.mp4").read_bytes()
    (folder / "truncated_faststart.mp4").write_bytes(fs[: len(fs) * 2 // 3])
    garbled = bytearray(fs)  # damage inside the frames' data, past the first keyframe's packet
    for i in range(len(fs) * 3 // 4, len(fs) * 3 // 4 + 300):
        garbled[i] = (garbled[i] * 7 + 13) % 256
    (folder / "garbled.mp4").write_bytes(bytes(garbled))
    write_zero_frame_avi(folder / "zero.avi")
    write_audio_only(folder / "audio.mp4")
    (folder / "text.mp4").write_text("this is not a video\n" * 20)
    (folder / "notes.txt").write_text("not indexed: not a video extension")
    (folder / ".hidden.mp4").write_text("hidden files are skipped")
    return folder


GOOD = {"video1", "clip_vp9", "sub/x", "vfr"}
CORRUPT = {
    "empty": "empty file",
    "truncated": "invalid data",
    # PyAV 18 (FFmpeg 8.1.2) decodes what is left, and the frame count tells; PyAV 17 (FFmpeg 8.1.1,
    # the newest on Python 3.10) reports invalid data on its last packet first
    "truncated_faststart": ("truncated", "invalid data"),
    "garbled": "invalid data",
    "zero": "zero frames",
    "audio": "no video stream",
    "text": "invalid data",
}


def test_statuses_and_fields(video_dir, tmp_path):
    out = tmp_path / "manifest.jsonl"
    build = build_manifest(video_dir, out, workers=1, progress=False)
    records = load_manifest(out)
    assert set(records) == GOOD | set(CORRUPT)
    assert {v for v, r in records.items() if r.ok} == GOOD
    for vid, reason in CORRUPT.items():
        assert records[vid].status == "corrupt" and records[vid].reason.startswith(reason), vid
    h264 = records["video1"]
    assert (h264.num_frames, h264.fps, h264.codec, h264.width, h264.height) == (
        60,
        25.0,
        "h264",
        32,
        32,
    )
    assert h264.keyframes == [0, 12, 24, 36, 48] and len(h264.keyframe_pts) == 5
    assert h264.duration == pytest.approx(2.4)
    assert records["clip_vp9"].codec == "vp9" and records["clip_vp9"].keyframes == [0, 10, 20]
    assert records["sub/x"].codec == "mjpeg" and records["sub/x"].keyframes == list(range(20))
    assert records["sub/x"].relpath == "sub/x.avi"
    assert records["vfr"].num_frames == 40
    assert build.num_ok == 4 and build.num_corrupt == len(CORRUPT)
    assert "corrupt x" in build.summary()
    lines = out.read_text().splitlines()
    assert len(lines) == len(records) and all(json.loads(line)["video_id"] for line in lines)


def test_demux_mode_is_faster_but_misses_corrupt_data(video_dir, tmp_path):
    records = build_manifest(
        video_dir, tmp_path / "m.jsonl", workers=1, mode="demux", progress=False
    )
    assert records["garbled"].ok  # the trade-off: data corruption inside a demuxable stream
    assert records["truncated_faststart"].reason.startswith("truncated")
    for vid in ("empty", "truncated", "zero", "audio", "text"):
        assert not records[vid].ok, vid
    assert records["video1"].num_frames == 60 and records["video1"].keyframes == [0, 12, 24, 36, 48]
    assert records["video1"].probe == "demux"
    # A decode-mode run does not trust the weaker demux records: it probes everything again.
    again = build_manifest(video_dir, tmp_path / "m.jsonl", workers=1, progress=False)
    assert len(again.probed) == len(records) and not again["garbled"].ok


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: every file is readable")
def test_unreadable_file_is_corrupt(video_dir, tmp_path):
    path = video_dir / "video1.mp4"
    path.chmod(0)
    try:
        record = probe_video(path, video_dir)
    finally:
        path.chmod(0o644)
    assert record.status == "corrupt" and record.reason.startswith("unreadable")


def test_probe_never_raises_on_a_missing_file(tmp_path):
    record = probe_video(tmp_path / "gone.mp4", tmp_path)
    assert record.status == "corrupt" and record.reason.startswith("unreadable")


def test_rerun_probes_only_changed_files(video_dir, tmp_path):
    out = tmp_path / "manifest.jsonl"
    first = build_manifest(video_dir, out, workers=1, progress=False)
    assert sorted(first.probed) == sorted(GOOD | set(CORRUPT)) and not first.reused
    second = build_manifest(video_dir, out, workers=1, progress=False)
    assert second.probed == [] and len(second.reused) == len(first)
    assert second == first

    # Same size, new mtime; a new file; a rewritten file; a removed file.
    stat = (video_dir / "clip_vp9.webm").stat()
    os.utime(video_dir / "clip_vp9.webm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    write_index_video(video_path(video_dir, "new", "h264"), 15, "h264", size=32)
    write_index_video(video_path(video_dir, "video1", "h264"), 33, "h264", size=32)
    (video_dir / "text.mp4").unlink()
    third = build_manifest(video_dir, out, workers=1, progress=False)
    assert sorted(third.probed) == ["clip_vp9", "new", "video1"]
    assert third.removed == ["text"]
    assert third["video1"].num_frames == 33 and third["new"].ok
    assert set(load_manifest(out)) == set(third)


def test_parallel_probing_matches_serial(video_dir, tmp_path):
    serial = build_manifest(video_dir, tmp_path / "a.jsonl", workers=1, progress=False)
    parallel = build_manifest(video_dir, tmp_path / "b.jsonl", workers=2, progress=False)
    assert parallel == serial


def test_write_is_atomic(video_dir, tmp_path, monkeypatch):
    out = tmp_path / "manifest.jsonl"
    build_manifest(video_dir, out, workers=1, progress=False)
    before = out.read_bytes()
    os.utime(video_dir / "video1.mp4", ns=(0, 10**9))  # forces a re-probe and a new write

    calls = {"n": 0}
    to_json = VideoRecord.to_json

    def failing_to_json(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return to_json(self)

    monkeypatch.setattr(VideoRecord, "to_json", failing_to_json)
    with pytest.raises(OSError, match="disk full"):
        build_manifest(video_dir, out, workers=1, progress=False)
    assert out.read_bytes() == before  # the old manifest is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_interrupted_run_keeps_what_it_probed(video_dir, tmp_path, monkeypatch):
    out = tmp_path / "manifest.jsonl"
    probe = manifest_module.probe_video
    seen = []

    def interrupted(path, video_dir, mode="decode"):
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append(path)
        return probe(path, video_dir, mode)

    monkeypatch.setattr(manifest_module, "probe_video", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_manifest(video_dir, out, workers=1, progress=False)
    # A half manifest is never taken for a whole one: training would drop the other videos'
    # questions as "missing from the manifest" and train on the rest.
    missing = len(GOOD | set(CORRUPT)) - 3
    with pytest.raises(ValueError, match=rf"manifest .*manifest.jsonl is incomplete \({missing} "
                       r"video\(s\) had no record yet when `siasam-fast index` stopped\): run the "
                       r"same command again, .* or delete .*manifest.jsonl.incomplete"):
        load_manifest(out)
    assert len(load_manifest(out, allow_incomplete=True)) == 3
    monkeypatch.setattr(manifest_module, "probe_video", probe)
    resumed = build_manifest(video_dir, out, workers=1, progress=False)
    assert len(resumed.reused) == 3 and len(resumed.probed) == missing
    assert not (tmp_path / "manifest.jsonl.incomplete").exists()
    assert len(load_manifest(out)) == len(GOOD | set(CORRUPT))


def test_load_manifest_reroots_paths(video_dir, tmp_path):
    out = tmp_path / "manifest.jsonl"
    build_manifest(video_dir, out, workers=1, progress=False)
    moved = tmp_path / "moved"
    video_dir.rename(moved)
    records = load_manifest(out, video_dir=moved)
    assert records["sub/x"].path == str(moved.resolve() / "sub" / "x.avi")
    with pytest.raises(FileNotFoundError, match=r"does not exist; build it with `siasam-fast index "
                       r"VIDEO_DIR --out .*missing.jsonl` \(or `siasam-fast synth --out DIR`"):
        load_manifest(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match=r"is a folder; give the manifest file, e.g. "
                       r".*moved/manifest.jsonl"):
        load_manifest(moved)
    (tmp_path / "bad.jsonl").write_text('{"video_id": "a"\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a manifest record"):
        load_manifest(tmp_path / "bad.jsonl")


def test_cli_entry_point(video_dir, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert main_index([str(video_dir), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert "4 ok" in capsys.readouterr().out
    assert len(load_manifest(out)) == len(GOOD | set(CORRUPT))
    with pytest.raises(ValueError, match="valid probe modes are decode, demux"):
        build_manifest(video_dir, out, mode="fast")
    with pytest.raises(NotADirectoryError, match=r"is not a folder \(it does not exist\)"):
        build_manifest(tmp_path / "nowhere", out)
    with pytest.raises(NotADirectoryError, match=r"is not a folder \(it is a file\)"):
        build_manifest(out, tmp_path / "other.jsonl")


def _no_probe(monkeypatch):
    def probe(*args, **kwargs):
        raise AssertionError("a video was probed before the arguments were checked")

    monkeypatch.setattr(manifest_module, "probe_video", probe)


def test_empty_folder_is_an_error_and_keeps_the_manifest(two_videos, tmp_path):
    _, out = two_videos
    before = out.read_bytes()
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not a video")
    with pytest.raises(ValueError, match=r"video_dir='.*empty' holds no videos \(looked for "
                       r"\.mp4 \.m4v .*\.ogv files"):
        build_manifest(empty, out, workers=1, progress=False)
    assert out.read_bytes() == before and len(load_manifest(out)) == 2
    with pytest.raises(ValueError, match="holds no videos"):
        build_manifest(empty, tmp_path / "new.jsonl", workers=1, progress=False)
    assert not (tmp_path / "new.jsonl").exists()
    # allow_empty (what transcode uses to re-index its outputs) writes an empty manifest.
    assert build_manifest(empty, tmp_path / "new.jsonl", progress=False, allow_empty=True) == {}
    assert (tmp_path / "new.jsonl").read_bytes() == b""


def test_output_path_checked_before_probing(two_videos, tmp_path, monkeypatch):
    folder, _ = two_videos
    _no_probe(monkeypatch)
    (tmp_path / "somedir").mkdir()
    with pytest.raises(IsADirectoryError, match=r"'.*somedir' is a folder; give a file path, "
                       r"e.g. '.*somedir/manifest.jsonl'"):
        build_manifest(folder, tmp_path / "somedir", workers=1, progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"'.*afile' is a file, not a folder"):
        build_manifest(folder, tmp_path / "afile" / "m.jsonl", workers=1, progress=False)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize(
    "name, content",
    [
        ("victim.yaml", b"model:\n  hidden: 256\n"),
        ("annotations.jsonl", b'{"question": "what?", "answer": "a"}\n'),
        ("list.json", b"[1, 2, 3]\n"),
        ("image.png", b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00"),
    ],
)
def test_file_that_is_not_a_manifest_is_never_overwritten(
    two_videos, tmp_path, monkeypatch, name, content
):
    folder, _ = two_videos
    victim = tmp_path / name
    victim.write_bytes(content)
    _no_probe(monkeypatch)
    with pytest.raises(ValueError, match=r"exists and is not a video manifest .*refusing to "
                       r"overwrite it"):
        build_manifest(folder, victim, workers=1, progress=False)
    assert victim.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_existing_manifest_is_updated(two_videos):
    folder, out = two_videos
    (folder / "b.avi").unlink()
    build = build_manifest(folder, out, workers=1, progress=False)
    assert sorted(load_manifest(out)) == ["a"] and build.removed == ["b"]


def test_main_index_bad_arguments_exit_2(two_videos, tmp_path, capsys):
    _, out = two_videos
    before = out.read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main_index([str(tmp_path / "empty"), "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 2 and out.read_bytes() == before
    err = capsys.readouterr().err
    assert err.startswith("siasam-fast index: error: video_dir=") and "holds no videos" in err
    assert len(err.strip().splitlines()) == 1


def test_old_fast_records_of_avi_with_bframes_are_probed_again(tmp_path, caplog):
    """Before demux mode learnt to decode them, `index --fast` numbered the frames of H.264 with
    B-frames in AVI by packets (decode order there). Loading such a manifest warns, and `index`
    probes those records again (decoding marks the file corrupt); intra-only AVI (MJPEG) keeps
    its fast record."""
    folder = tmp_path / "videos"
    folder.mkdir()
    write_index_video(folder / "b.avi", 30, codec="h264", gop=12, bframes=2)
    write_index_video(folder / "m.avi", 30, codec="mjpeg")
    out = tmp_path / "manifest.jsonl"
    build = build_manifest(folder, out, mode="demux", workers=1, progress=False)
    assert build["b"].probe == "decode" and not build["b"].ok  # what demux mode does now
    assert build["m"].probe == "demux" and build["m"].ok
    # What an older version wrote for b.avi: an ok record numbered by its packets.
    old = VideoRecord(**{**build["b"].__dict__, "status": "ok", "reason": "", "probe": "demux",
                         "num_frames": 30, "keyframes": [0, 12, 24]})
    lines = [old.to_json(), build["m"].to_json()]
    out.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        loaded = load_manifest(out)
    assert loaded["b"].ok
    assert "1 AVI video(s) were indexed with --fast" in caplog.text and "b.avi" in caplog.text
    again = build_manifest(folder, out, mode="demux", workers=1, progress=False)
    assert again.probed == ["b"] and not again["b"].ok
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_manifest(out)
    assert "indexed with --fast" not in caplog.text


def test_an_interrupted_reindex_keeps_the_records_it_had_not_redone(tmp_path, monkeypatch):
    """Upgrading a --fast manifest (or re-probing touched files) and stopping half way wrote a
    manifest without the files not yet probed again: training then dropped their questions."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(6):
        write_index_video(folder / f"v{i}.mp4", 12, codec="h264", size=32, gop=4)
    out = tmp_path / "manifest.jsonl"
    build_manifest(folder, out, mode="demux", workers=1, progress=False)
    real = manifest_module._probe_all

    def two_then_stop(*args, **kwargs):
        for n, record in enumerate(real(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setattr(manifest_module, "_probe_all", two_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_manifest(folder, out, mode="decode", workers=1, progress=False)
    records = load_manifest(out)  # complete: every video keeps a record (no marker)
    assert sorted(records) == [f"v{i}" for i in range(6)]
    assert sorted(r.probe for r in records.values()) == ["decode"] * 2 + ["demux"] * 4
    monkeypatch.setattr(manifest_module, "_probe_all", real)
    resumed = build_manifest(folder, out, mode="decode", workers=1, progress=False)
    assert len(resumed.probed) == 4 and {r.probe for r in resumed.values()} == {"decode"}


SLOW_INDEX = """
import sys, time
from siasam_fast import cli
from siasam_fast.pipeline import manifest
real = manifest.probe_video
calls = [0]
def slow(*args, **kwargs):
    calls[0] += 1
    open(f"{sys.argv[2]}.started{calls[0]}", "w").close()
    time.sleep(0.4)
    return real(*args, **kwargs)
manifest.probe_video = slow
sys.exit(cli.main(["index", sys.argv[1], "--out", sys.argv[2], "--workers", "1"]))
"""


def test_sigterm_to_index_keeps_what_was_probed(tmp_path):
    """A scheduler's SIGTERM ended `index` without writing anything: it now takes the Ctrl-C
    path, writes the videos probed so far and exits 130 with one line, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    from subprocess_env import cpu_env

    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(12):
        write_index_video(folder / f"v{i:02d}.mp4", 8, codec="h264", size=32, gop=4)
    out = tmp_path / "manifest.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_INDEX, str(folder), str(out)],
                            env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # the third probe has begun: two videos were probed and recorded, most not (0.4 s each)
    started = tmp_path / "manifest.jsonl.started3"
    deadline = time.monotonic() + 120
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; what was done is kept" in err and "Traceback" not in err
    kept = load_manifest(out, allow_incomplete=True)
    assert 2 <= len(kept) < 12
    assert (tmp_path / "manifest.jsonl.incomplete").is_file()  # not taken for a whole manifest


def test_symlinked_subfolders_are_followed_once_and_loops_are_not(tmp_path):
    """A dataset assembled from links: a linked folder elsewhere is indexed; a link back up the
    tree, and a second link to a folder already listed, add nothing."""
    from siasam_fast.pipeline.manifest import find_videos

    root, elsewhere = tmp_path / "videos", tmp_path / "other_disk" / "part2"
    (root / "part1").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    for path in (root / "part1" / "a.mp4", elsewhere / "b.mp4", root / "c.mp4"):
        path.write_bytes(b"x")
    (root / "part2").symlink_to(elsewhere, target_is_directory=True)
    (root / "part1" / "up").symlink_to(root, target_is_directory=True)  # a loop
    (root / "zz_again").symlink_to(root / "part1", target_is_directory=True)  # listed already
    (root / "dangling").symlink_to(tmp_path / "gone", target_is_directory=True)
    found = [p.relative_to(root).as_posix() for p in find_videos(root)]
    assert found == ["c.mp4", "part1/a.mp4", "part2/b.mp4"]


def test_camera_transport_streams_are_videos_and_extensions_match_in_any_case(tmp_path):
    """AVCHD cameras write .MTS / .m2ts (MPEG-TS): they were left out of the index without a
    count, and their questions dropped as "missing from the manifest"."""
    from siasam_fast.pipeline.manifest import find_videos

    for name in ("a.MTS", "b.m2ts", "c.mp4", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_videos(tmp_path)] == ["a.MTS", "b.m2ts", "c.mp4"]


def test_a_manifest_is_readable_as_any_new_file_is(tmp_path):
    """mkstemp makes its file 0600; a manifest is shared data (other users, other nodes' jobs), so
    it gets the mode open() would give: 0666 less the umask."""
    from siasam_fast.pipeline.manifest import write_manifest

    path = write_index_video(tmp_path / "videos" / "a.webm", 8, codec="vp9")
    records = list(build_manifest(tmp_path / "videos", tmp_path / "first.jsonl",
                                  progress=False).values())
    old = os.umask(0o022)
    try:
        write_manifest(records, tmp_path / "m.jsonl")
        os.umask(0o077)
        write_manifest(records, tmp_path / "private.jsonl")
    finally:
        os.umask(old)
    assert (tmp_path / "m.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.jsonl").stat().st_mode & 0o777 == 0o600
    assert path.exists()


def _remux(src, dst, fix=None):
    """Copy the video packets of ``src`` into ``dst`` (the container by its extension), after
    ``fix(i, packet)`` changed packet ``i`` as it likes."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for i, packet in enumerate(inp.demux(inp.streams.video[0])):
            if packet.dts is not None:
                if fix is not None:
                    fix(i, packet)
                packet.stream = stream
                out.mux(packet)
    return dst


def test_frames_are_numbered_from_the_first_pts(tmp_path):
    """A stream whose first frame is not at pts 0 (a cut, a capture): frame 0 is the first
    frame, start_pts its pts, and the duration runs from it (not from pts 0)."""
    src = write_index_video(tmp_path / "m.avi", 10, codec="mjpeg", size=16)

    def shift(i, packet):  # 1 / 25 s per frame in ms, the first frame at 4 s
        packet.time_base = Fraction(1, 1000)
        packet.pts = packet.dts = 4000 + 40 * i

    folder = tmp_path / "videos"
    folder.mkdir()
    _remux(src, folder / "late.mkv", shift)
    record = probe_video(folder / "late.mkv", folder)
    assert record.ok and record.num_frames == 10 and record.time_base == "1/1000"
    assert record.start_pts == 4000
    assert record.keyframes == list(range(10))
    assert record.keyframe_pts == [4000 + 40 * i for i in range(10)]
    assert record.fps == pytest.approx(25) and record.duration == pytest.approx(0.4)


def test_repeated_timestamps_are_corrupt(tmp_path):
    """Two frames at the same pts cannot both be frame i: the file is marked corrupt, not numbered
    with a frame missing."""
    src = write_index_video(tmp_path / "m.avi", 6, codec="mjpeg", size=16)

    def repeat(i, packet):  # pts 0 1 1 2 3 4
        if i >= 2:
            packet.pts = packet.dts = i - 1

    folder = tmp_path / "videos"
    folder.mkdir()
    _remux(src, folder / "dup.mkv", repeat)
    record = probe_video(folder / "dup.mkv", folder)
    assert not record.ok and record.reason.startswith("timestamps not increasing")


def test_more_frames_than_the_header_declares_is_ok(tmp_path):
    """The header's frame count is not trusted either way: fewer frames than it says is a
    truncated file, more is fine (the stream is counted)."""
    import struct

    path = write_index_video(tmp_path / "a.avi", 20, codec="mjpeg", size=16)
    data = bytearray(path.read_bytes())
    at = data.find(b"strh")  # AVISTREAMHEADER: dwLength, the stream's frames, at byte 32
    assert struct.unpack("<I", data[at + 40 : at + 44]) == (20,)
    data[at + 40 : at + 44] = struct.pack("<I", 15)
    path.write_bytes(bytes(data))
    record = probe_video(path, tmp_path)
    assert record.declared_frames == 15
    assert record.ok and record.num_frames == 20 and record.keyframes == list(range(20))


def test_demux_mode_decodes_avi_of_a_reordering_codec_from_the_start(tmp_path):
    """H.264 in AVI has no pts to order packets by: demux mode decodes the file instead, from its
    first frame (after the packets were read once)."""
    path = write_index_video(tmp_path / "h.avi", 30, codec="h264", size=16, gop=10, bframes=0)
    record = probe_video(path, tmp_path, mode="demux")
    assert record.ok and record.probe == "decode"
    assert record.num_frames == 30 and record.keyframes == [0, 10, 20]


def test_rerun_probes_again_what_may_have_changed(two_videos, tmp_path):
    """Kept only when the file has the size, mtime and name the record was made from, the record
    is of this manifest version, and its failure was not one worth another try."""
    folder, out = two_videos
    # a's content replaced by a longer video, its mtime put back (cp -p, rsync -t)
    stat = (folder / "a.mp4").stat()
    write_index_video(folder / "a.mp4", 20, "h264", size=16)
    os.utime(folder / "a.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (folder / "a.mp4").stat().st_size != stat.st_size
    again = build_manifest(folder, out, workers=1, progress=False)
    assert again.probed == ["a"] and again["a"].num_frames == 20

    # b.avi renamed b.mkv: same size and mtime, another file
    (folder / "b.avi").rename(folder / "b.mkv")
    again = build_manifest(folder, out, workers=1, progress=False)
    assert again.probed == ["b"] and again["b"].relpath == "b.mkv"
    assert load_manifest(out, video_dir=folder)["b"].path == str((folder / "b.mkv").resolve())

    # an older manifest version; a file that was unreadable; one that crashed its prober
    records = load_manifest(out)
    records["a"].version = manifest_module.MANIFEST_VERSION - 1
    for vid, reason in (("b", "unreadable: [Errno 13] Permission denied"),
                        ("c", "decoder crashed: the probing process died on this file")):
        if vid == "c":
            write_index_video(folder / "c.mp4", 8, "h264", size=16)
            st = (folder / "c.mp4").stat()
            records["c"] = VideoRecord("c", str(folder / "c.mp4"), "c.mp4", "corrupt",
                                       size=st.st_size, mtime_ns=st.st_mtime_ns)
        records[vid].status, records[vid].reason = "corrupt", reason
    manifest_module.write_manifest(records.values(), out)
    again = build_manifest(folder, out, workers=1, progress=False)
    assert sorted(again.probed) == ["a", "b", "c"] and again.num_ok == 3


def test_a_moved_folder_gets_the_new_paths(two_videos, tmp_path):
    """Indexing the folder at its new place reuses every record (a move keeps size and mtime),
    with the path of the file where it is now."""
    folder, out = two_videos
    moved = tmp_path / "moved"
    folder.rename(moved)
    again = build_manifest(moved, out, workers=1, progress=False)
    assert again.probed == [] and len(again.reused) == 2
    for vid, record in load_manifest(out).items():
        assert record.path == str((moved / record.relpath).resolve()), vid


def test_extensions_in_capitals_are_found(tmp_path):
    folder = tmp_path / "videos"
    write_index_video(folder / "A.MP4", 8, "h264", size=16)
    write_index_video(folder / "b.Avi", 4, "mjpeg", size=16)
    build = build_manifest(folder, tmp_path / "m.jsonl", workers=1, progress=False)
    assert sorted(build) == ["A", "b"] and build.num_ok == 2


def test_corrupt_avi_of_a_demux_run_is_not_probed_again(tmp_path, caplog):
    """Only ok records can have been numbered in decode order: a corrupt AVI record of a demux
    run is kept like any other, without the warning."""
    folder = tmp_path / "videos"
    write_index_video(folder / "m.avi", 4, "mjpeg", size=16)
    (folder / "empty.avi").write_bytes(b"")
    (folder / "text.avi").write_text("not a video\n" * 20)
    out = tmp_path / "m.jsonl"
    first = build_manifest(folder, out, mode="demux", workers=1, progress=False)
    assert first.num_ok == 1 and first.num_corrupt == 2
    with caplog.at_level("WARNING"):
        again = build_manifest(folder, out, mode="demux", workers=1, progress=False)
        load_manifest(out)
    assert again.probed == [] and "indexed with --fast" not in caplog.text


def test_checkpoints_write_what_was_probed_so_far(tmp_path, monkeypatch):
    """Every checkpoint_s seconds the manifest on disk holds the videos probed so far (marked
    incomplete): a run killed outright (SIGKILL, out of memory) keeps them."""
    folder = tmp_path / "videos"
    for i in range(3):
        write_index_video(folder / f"v{i}.mp4", 4, "h264", size=16)
    out = tmp_path / "m.jsonl"
    probe = manifest_module.probe_video
    on_disk = []

    def watching(path, video_dir, mode="decode"):
        on_disk.append(sorted(load_manifest(out, allow_incomplete=True)) if out.exists() else None)
        return probe(path, video_dir, mode)

    monkeypatch.setattr(manifest_module, "probe_video", watching)
    build_manifest(folder, out, workers=1, progress=False, checkpoint_s=0)
    assert on_disk == [None, ["v0"], ["v0", "v1"]]
    assert not manifest_module.incomplete_marker(out).exists()


def test_blank_lines_of_a_manifest_are_skipped(two_videos):
    _, out = two_videos
    lines = out.read_text().splitlines()
    out.write_text("\n" + lines[0] + "\n\n  \n" + "\n".join(lines[1:]) + "\n\n")
    assert sorted(load_manifest(out)) == ["a", "b"]


def test_manifest_lines_are_sorted_by_video_id(two_videos, tmp_path):
    """Whatever order the records come in (probing finishes in any order), the file is the same."""
    _, out = two_videos
    records = list(load_manifest(out).values())
    manifest_module.write_manifest(records[::-1], tmp_path / "reversed.jsonl")
    assert (tmp_path / "reversed.jsonl").read_bytes() == out.read_bytes()
    assert [json.loads(line)["video_id"] for line in out.read_text().splitlines()] == ["a", "b"]


def test_a_permission_error_is_unreadable(two_videos, monkeypatch):
    """A file that cannot be opened says "unreadable" (tried again by the next run), also when
    the error comes from the container library (tests as root can't chmod a file unreadable)."""
    folder, _ = two_videos

    def denied(file):
        raise PermissionError(13, "Permission denied", file)

    monkeypatch.setattr(manifest_module, "open_video", denied)
    record = probe_video(folder / "a.mp4", folder)
    assert record.status == "corrupt" and record.reason.startswith("unreadable: ")
    assert "Permission denied" in record.reason


@pytest.mark.parametrize("mode", ["decode", "demux"])
def test_a_cut_with_an_edit_list_is_numbered_as_decoders_output_it(tmp_path, mode):
    """A clip cut without re-encoding starts with packets that the edit list hides: the decoder
    never outputs their frames. Decode mode called the file truncated (the header counts those
    packets), demux mode counted them as frames 0..4 (every frame sampled 5 frames off)."""
    from videos import read_indices

    from siasam_fast.pipeline.pyav_decode import decode_frames

    src = write_index_video(tmp_path / "s.mp4", 48, "h264", size=32, gop=24, bframes=0)
    folder = tmp_path / "videos"
    folder.mkdir()
    cut_copy(src, folder / "cut.mp4", 5)
    record = probe_video(folder / "cut.mp4", folder, mode)
    assert record.ok, record.reason
    assert record.num_frames == 43 and record.start_pts == 0
    # frame 0: reached from the hidden keyframe before it (a seek to its pts lands there)
    assert record.keyframes == [0, 19] and record.keyframe_pts[0] == 0
    assert record.duration == pytest.approx(43 / 25)
    for frames in ([0, 18, 19, 42], [3], [42], [2, 30]):
        assert read_indices(decode_frames(record, frames, seek_threshold=0)) == [
            5 + f for f in frames], frames


def test_demux_mode_does_not_count_packets_before_the_first_keyframe(tmp_path):
    """A file cut mid-GOP (here an MPEG-TS whose head was cut off at a 188-byte packet): its
    packets before the first keyframe decode to no frame. --fast (demux) counted them, so every
    frame index was off by their number and each decode failed ('the manifest is stale'), which
    re-running --fast did not change. It now counts what the decode probe counts."""
    whole = write_index_video(tmp_path / "whole.ts", 120, codec="h264", gop=50, bframes=0)
    data = whole.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[(len(data) // 3) // 188 * 188:])
    decoded = probe_video(cut, tmp_path, mode="decode")
    demuxed = probe_video(cut, tmp_path, mode="demux")
    assert decoded.ok and demuxed.ok, (decoded.reason, demuxed.reason)
    assert decoded.num_frames < 120
    assert (demuxed.num_frames, demuxed.keyframes) == (decoded.num_frames, decoded.keyframes)
    assert demuxed.keyframe_pts == decoded.keyframe_pts
