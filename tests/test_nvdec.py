"""What NVDEC decodes, known from the manifest before DALI opens a file (pipeline/nvdec.py), and
the backend choice that follows. GPUs are stand-ins (a compute capability and a name): DALI on a
GPU refuses a codec / chroma / bit depth the driver lacks and frames out of its size limits, and
the loader then leaves the file out as damaged every epoch."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest

from siasam_fast.pipeline import nvdec

V100, T4, A100, A10, H100, B200 = (7, 0), (7, 5), (8, 0), (8, 6), (9, 0), (10, 0)


def rec(codec="h264", pix_fmt="yuv420p", width=320, height=240, **kw):
    return SimpleNamespace(ok=True, codec=codec, pix_fmt=pix_fmt, width=width, height=height, **kw)


@pytest.mark.parametrize("name, expected", [
    ("yuv420p", ("420", 8)), ("yuvj420p", ("420", 8)), ("nv12", ("420", 8)),
    ("yuv420p10le", ("420", 10)), ("yuv420p12le", ("420", 12)), ("p010le", ("420", 10)),
    ("yuv422p", ("422", 8)), ("yuv422p10le", ("422", 10)), ("yuv444p", ("444", 8)),
    ("gray", ("400", 8)), ("gbrp", ("rgb", 8)), ("", None), ("no-such-format", None),
    ("yuv411p", ("411", 8)), ("yuvj440p", ("440", 8)), ("yuv410p", ("410", 8)),
    ("cuda", None)])  # a hardware surface: no planes to tell
def test_pixel_format_gives_chroma_and_bit_depth(name, expected):
    assert nvdec.pixel_format(name) == expected


@pytest.mark.parametrize("cc, arch", [
    (V100, "volta"), ((6, 1), "volta"), (T4, "turing"), (A100, "ga100"), (A10, "ga10x"),
    ((8, 7), "ga10x"), ((8, 9), "ada"), (H100, "hopper"), (B200, "blackwell"),
    ((12, 0), "blackwell")])
def test_architecture_by_compute_capability(cc, arch):
    assert nvdec.architecture(cc) == arch


@pytest.mark.parametrize("record, cc, bad", [
    # NVIDIA's application note (Video Codec SDK 13.0): H.264 is 8-bit 4:2:0 before Blackwell
    (rec(pix_fmt="yuv420p"), V100, None),
    (rec(pix_fmt="yuvj420p"), H100, None),
    (rec(pix_fmt="yuv444p"), H100, "h264 8-bit 4:4:4 (yuv444p)"),
    (rec(pix_fmt="yuv444p"), B200, "h264 8-bit 4:4:4"),
    (rec(pix_fmt="yuv420p10le"), H100, "h264 10-bit 4:2:0"),
    # High10 and High422 on Blackwell's NVDEC, but DALI takes NV12 (8-bit 4:2:0) frames only
    (rec(pix_fmt="yuv420p10le"), B200, "h264 10-bit 4:2:0 (yuv420p10le): NVDEC decodes it"),
    (rec(pix_fmt="yuv422p"), A100, "h264 8-bit 4:2:2"),
    (rec(pix_fmt="yuv422p"), B200, "NVDEC decodes it, but DALI takes 8-bit 4:2:0"),
    (rec(pix_fmt="gbrp"), H100, "h264 RGB (gbrp)"),
    (rec(pix_fmt="gray"), H100, "h264 8-bit 4:0:0"),
    # chroma subsamplings no NVDEC decodes are named as such (not "o:t:h")
    (rec(pix_fmt="yuv411p"), H100, "h264 8-bit 4:1:1 (yuv411p)"),
    (rec("hevc", "yuv440p"), B200, "hevc 8-bit 4:4:0 (yuv440p)"),
    # HEVC: Main / Main 10 / Main 12 everywhere, 4:4:4 from Turing, 4:2:2 on Blackwell, on
    # NVDEC; through DALI 8-bit 4:2:0 only (4:4:4: NVIDIA/DALI#6079; 10-bit: gpu_check_dali 6b)
    (rec("hevc"), V100, None),
    (rec("hevc", "yuv420p10le"), V100, "hevc 10-bit 4:2:0 (yuv420p10le): NVDEC decodes it"),
    (rec("hevc", "yuv420p12le"), V100, "NVDEC decodes it, but DALI takes 8-bit 4:2:0"),
    (rec("hevc", "yuv444p"), V100, "hevc 8-bit 4:4:4 (yuv444p)"),
    (rec("hevc", "yuv444p10le"), T4, "NVDEC decodes it, but DALI takes 8-bit 4:2:0"),
    (rec("hevc", "yuv444p"), H100, "NVDEC decodes it, but DALI takes 8-bit 4:2:0"),
    (rec("hevc", "yuv422p10le"), H100, "hevc 10-bit 4:2:2 (yuv422p10le)"),
    (rec("hevc", "yuv422p10le"), B200, "NVDEC decodes it, but DALI takes 8-bit 4:2:0"),
    # VP9 profiles 0 and 2, not 1 / 3
    (rec("vp9"), V100, None),
    (rec("vp9", "yuv420p10le"), V100, "NVDEC decodes it, but DALI takes 8-bit 4:2:0"),
    (rec("vp9", "yuv444p"), A10, "vp9 8-bit 4:4:4"),
    # AV1 only on GA10x, Ada and Blackwell
    (rec("av1"), H100, "codec av1"),
    (rec("av1"), A10, None),
    (rec("av1", "yuv420p10le"), A10, "NVDEC decodes it, but DALI takes 8-bit 4:2:0"),
    (rec("av1", "yuv444p"), A10, "av1 8-bit 4:4:4"),
    (rec("gif", "pal8"), H100, "codec gif"),
    # sizes: NVDEC compares the coded size (H.264 in 16 px macroblocks)
    (rec(width=32, height=32), H100, "h264 32x32: under NVDEC's smallest h264 frame, 48x16"),
    (rec(width=40, height=40), H100, None),  # coded 48x48
    (rec(width=64, height=8), H100, None),  # coded 64x16
    (rec("hevc", width=128, height=128), H100, "under NVDEC's smallest hevc frame, 144x144"),
    (rec("vp9", width=120, height=128), H100, "under NVDEC's smallest vp9 frame, 128x128"),
    (rec("vp9", width=128, height=128), H100, None),
    # NVDEC decodes JPEG, but DALI's GPU video decoder leaves MJPEG out (see below)
    (rec("mjpeg", "yuvj422p", width=48, height=64), H100, "codec mjpeg"),
    (rec("mjpeg", "yuvj420p", width=320, height=240), B200, "codec mjpeg"),
    (rec(width=5120, height=2880), H100, "h264 5120x2880: over NVDEC's largest h264 frame"),
    (rec(width=5120, height=2880), B200, None),  # H.264 8192x8192 on Blackwell
    (rec("hevc", width=7680, height=4320), V100, None),
    # what the record does not say is not held against it
    (rec(pix_fmt=""), H100, None),
    (rec(pix_fmt="", width=0, height=0), H100, None),
    (SimpleNamespace(ok=True, codec="h264"), H100, None),
])
def test_problem_follows_nvidias_tables(record, cc, bad):
    got = nvdec.problem(record, cc)
    if bad is None:
        assert got is None
    else:
        assert got is not None and bad in got


@pytest.fixture
def h100(monkeypatch):
    """This machine as an H100 with DALI installed (CUDA 12 wheel)."""
    from siasam_fast import envcheck
    from siasam_fast.pipeline import loaders

    monkeypatch.setattr(loaders.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    monkeypatch.setattr(envcheck, "dali_wheel", lambda: "nvidia-dali-cuda120")
    monkeypatch.setattr(loaders.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(loaders.torch.cuda, "get_device_capability", lambda *a: H100)
    return loaders


def test_backend_auto_takes_pyav_for_a_set_with_videos_nvdec_cannot_decode(h100, caplog):
    """Before: data.backend=auto took DALI for any H.264 set, and DALI left out every 4:4:4 or
    10-bit H.264 video (and every frame under 48x16) as damaged, each epoch. Now auto takes PyAV
    and says which videos and why; the set's other videos alone keep DALI."""
    manifest = {
        "a": rec(relpath="a.mp4"),
        "b": rec(pix_fmt="yuv444p", relpath="screen/b.mp4"),
        "c": rec(pix_fmt="yuv420p10le", relpath="c.mkv"),
        "d": rec(width=32, height=32, relpath="tiny.mp4"),
        "bad": SimpleNamespace(ok=False, codec="h264", pix_fmt="yuv444p", width=8, height=8),
    }
    with caplog.at_level(logging.WARNING, logger="siasam_fast.pipeline.loaders"):
        assert h100.resolve_backend("auto", manifest) == "pyav"
    text = caplog.text
    assert "NVDEC of NVIDIA H100 80GB HBM3 cannot decode 3 videos" in text
    assert "screen/b.mp4" in text and "c.mkv" in text and "tiny.mp4" in text
    assert "4:4:4 (yuv444p)" in text and "siasam-fast transcode" in text
    assert h100.resolve_backend("auto", {"a": manifest["a"], "bad": manifest["bad"]}) == "dali"


def test_backend_dali_refuses_such_a_set_naming_the_videos(h100):
    manifest = {f"v{i}": rec(pix_fmt="yuv422p", relpath=f"v{i}.mp4") for i in range(5)}
    manifest["ok"] = rec(relpath="ok.mp4")
    with pytest.raises(ValueError) as err:
        h100.resolve_backend("dali", manifest)
    message = str(err.value)
    assert "NVDEC of NVIDIA H100 80GB HBM3 cannot decode 5 videos" in message
    assert "h264 8-bit 4:2:2 (yuv422p): v0.mp4, v1.mp4, v2.mp4, ... (5 videos)" in message
    assert "backend=pyav" in message and "ok.mp4" not in message
    del manifest["v0"], manifest["v1"], manifest["v2"], manifest["v3"], manifest["v4"]
    assert h100.resolve_backend("dali", manifest) == "dali"


def test_backend_auto_keeps_an_mjpeg_set_off_dali(h100, caplog):
    """NVDEC decodes JPEG, but DALI's GPU video decoder does not hand MJPEG to it: its
    FramesDecoderGpu::SelectVideoStream lists H.264, HEVC, VP8, VP9, AV1 and MPEG-4 Part 2, with
    MJPEG commented out ("TODO: add support for MJPEG"; NVIDIA/DALI
    dali/operators/video/frames_decoder_gpu.cc), and the operator then fails with "Failed to
    create video decoder". Before, auto took DALI for an MJPEG set on any GPU and every video
    was left out as damaged, every epoch."""
    manifest = {"a": rec("mjpeg", "yuvj420p", relpath="a.avi")}
    with caplog.at_level(logging.WARNING, logger="siasam_fast.pipeline.loaders"):
        assert h100.resolve_backend("auto", manifest) == "pyav"
    assert "codec mjpeg" in caplog.text and "a.avi" in caplog.text
    with pytest.raises(ValueError, match="codec mjpeg"):
        h100.resolve_backend("dali", manifest)
    assert nvdec.summary(H100).endswith("; no av1, mjpeg"), nvdec.summary(H100)


def _encode(path: Path, pix_fmt: str, width=64, height=48, frames=3) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i in range(frames):
            rgb = np.full((height, width, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_manifest_records_the_pixel_format_and_fills_it_into_older_records(tmp_path):
    """The manifest says each video's pixel format; a manifest written before it did gets it
    from the file's header on its next build, without a new probe of the file."""
    from siasam_fast.pipeline.manifest import build_manifest, load_manifest

    videos = tmp_path / "videos"
    videos.mkdir()
    _encode(videos / "plain.mp4", "yuv420p")
    _encode(videos / "screen.mp4", "yuv444p")
    out = tmp_path / "manifest.jsonl"
    build_manifest(videos, out, workers=0)
    records = load_manifest(out)
    assert {k: r.pix_fmt for k, r in records.items()} == {"plain": "yuv420p",
                                                          "screen": "yuv444p"}
    # the same manifest as an older version wrote it: no pix_fmt
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    for line in lines:
        del line["pix_fmt"]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert {r.pix_fmt for r in load_manifest(out).values()} == {""}
    build = build_manifest(videos, out, workers=0)
    assert sorted(build.reused) == ["plain", "screen"] and build.probed == []
    assert {k: r.pix_fmt for k, r in load_manifest(out).items()} == {"plain": "yuv420p",
                                                                     "screen": "yuv444p"}


def test_the_gpu_checks_nvdec_cases_are_written_and_predicted(tmp_path):
    """Section 6b of scripts/gpu_check_dali.py compares NVDEC's refusals with this table on the
    loan's GPU; here its fixtures are written, indexed (with their pixel formats) and predicted
    for an H100, so the GPU's minutes go to the comparison alone."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check_dali.py"
    spec = importlib.util.spec_from_file_location("gpu_check_dali", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    manifest, predicted = script.nvdec_cases(tmp_path, H100)
    written = {name for name, (encoder, *_) in script.NVDEC_CASES.items()
               if encoder in av.codecs_available}
    assert set(manifest) == written and {"control", "h264_444", "h264_32px", "mjpeg"} <= written
    for name in written:
        encoder, pix_fmt, width, height = script.NVDEC_CASES[name]
        record = manifest[name]
        assert (record.pix_fmt, record.width, record.height) == (pix_fmt, width, height), name
    decodes = {name for name, why in predicted.items() if why is None}
    assert decodes == written & {"control", "vp9_128px"}
