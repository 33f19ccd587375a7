"""Test videos whose frames show their own index (shared by the PyAV and DALI pipeline tests).

Every frame is a 4 x 4 grid of grey cells, one bit of the frame index per cell (bit ``r * 4 + c``
in row ``r``, column ``c``; bright = 1, dark = 0), so 16 bits, frames 0..65535. Cells are a quarter
of the frame on each side: the code survives lossy codecs, chroma subsampling and downscaling;
:func:`read_index` reads the centre of each cell back. Use square videos when frames go through
the centre crop (a crop of a non-square frame cuts cells off).

:func:`write_index_video` writes H.264 (mp4, with B-frames and a fixed GOP so that reading a late
frame needs a seek), VP9 (webm) or MJPEG (avi), at a constant or variable frame rate.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

GRID = 4
BITS = GRID * GRID
DARK, BRIGHT = 24, 232
# codec name -> (PyAV encoder, container extension, pixel format)
CODECS = {
    "h264": ("libx264", ".mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", ".webm", "yuv420p"),
    "mjpeg": ("mjpeg", ".avi", "yuvj420p"),
    "mpeg2": ("mpeg2video", ".mpg", "yuv420p"),  # MPEG-PS (.mpg) or MPEG-TS (.ts): no index
}
# Frame durations (in ms) cycled through by variable-frame-rate videos: irregular pts.
VFR_STEPS_MS = (40, 20, 70, 33, 50, 25)


def index_image(index: int, height: int, width: int) -> np.ndarray:
    """uint8 RGB [height, width, 3] showing ``index`` as 16 grey cells."""
    if not 0 <= index < 2**BITS:
        raise ValueError(f"index={index}: must be in 0..{2**BITS - 1}")
    bits = (index >> np.arange(BITS)) & 1
    cells = np.where(bits.reshape(GRID, GRID) == 1, BRIGHT, DARK).astype(np.uint8)
    rows = (np.arange(height) * GRID) // height
    cols = (np.arange(width) * GRID) // width
    grey = cells[rows[:, None], cols[None, :]]
    return np.repeat(grey[:, :, None], 3, axis=2)


def read_index(image) -> int:
    """The index shown by a frame: uint8/float RGB, [H, W, 3] or [3, H, W] (0..255 values)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"expected one frame [H, W, 3] or [3, H, W], got shape {img.shape}")
    if img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    grey = img.mean(axis=2)
    h, w = grey.shape
    value = 0
    for r in range(GRID):
        for c in range(GRID):
            y0, y1 = (4 * r + 1) * h // (4 * GRID), (4 * r + 3) * h // (4 * GRID)
            x0, x1 = (4 * c + 1) * w // (4 * GRID), (4 * c + 3) * w // (4 * GRID)
            cell = grey[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
            if cell.mean() > (DARK + BRIGHT) / 2:
                value |= 1 << (r * GRID + c)
    return value


def read_indices(frames) -> list[int]:
    """:func:`read_index` of every frame of a [U, ...] stack."""
    return [read_index(f) for f in frames]


def write_index_video(
    path: str | Path,
    num_frames: int,
    codec: str = "h264",
    size: int | tuple[int, int] = 64,
    fps: int = 25,
    gop: int = 12,
    bframes: int = 2,
    vfr: bool = False,
    first_index: int = 0,
    open_gop: bool = False,
) -> Path:
    """Write a video whose frame ``i`` shows ``first_index + i``; returns the path.

    ``size``: side of a square frame or (height, width) (even numbers: 4:2:0 chroma). ``gop``:
    frames between keyframes (H.264 / VP9; MJPEG is all keyframes). ``bframes``: H.264 B-frames.
    ``vfr``: irregular frame durations (pts steps cycle through ``VFR_STEPS_MS``). ``open_gop``:
    H.264 keyframes after the first are recovery-point I-frames whose leading B-frames reference
    the GOP before (x264's open-gop).
    """
    import av

    if codec not in CODECS:
        raise ValueError(f"codec={codec!r}: valid codecs are {', '.join(CODECS)}")
    encoder, _, pix_fmt = CODECS[codec]
    height, width = (size, size) if isinstance(size, int) else size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), "w")
    try:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "h264":
            stream.options = {
                "crf": "16",
                "preset": "veryfast",
                "bf": str(bframes),
                "g": str(gop),
                "keyint_min": str(gop),
                "sc_threshold": "0",
                **({"x264-params": "open-gop=1"} if open_gop else {}),
            }
        elif codec == "vp9":
            stream.options = {
                "g": str(gop),
                "crf": "16",
                "b": "0",
                "deadline": "realtime",
                "cpu-used": "8",
            }
        elif codec == "mpeg2":
            stream.options = {"g": str(gop), "bf": str(bframes), "q:v": "2"}
        else:
            stream.options = {"q:v": "2"}
        time_base = Fraction(1, 1000) if vfr else Fraction(1, fps)
        stream.codec_context.time_base = time_base
        pts = 0
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(
                index_image(first_index + i, height, width), format="rgb24"
            )
            frame.pts, frame.time_base = pts, time_base
            pts += VFR_STEPS_MS[i % len(VFR_STEPS_MS)] if vfr else 1
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path


def video_path(folder: str | Path, name: str, codec: str) -> Path:
    """``folder/name`` with the codec's container extension."""
    return Path(folder) / (name + CODECS[codec][1])


def cut_copy(src, dst, frames: int) -> Path:
    """``src`` without its first ``frames`` frames, cut as `ffmpeg -ss T -c copy` cuts: the
    packets from the keyframe before the cut are kept, before pts 0, and the mp4 edit list hides
    them (FFmpeg flags them discard: decoders drop their frames)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        source = inp.streams.video[0]
        shift = int(frames / source.average_rate / source.time_base)
        stream = out.add_stream_from_template(source)
        for packet in inp.demux(source):
            if packet.dts is not None:
                packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
                packet.stream = stream
                out.mux(packet)
    return Path(dst)
