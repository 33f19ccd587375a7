"""DALI decoding a known clip, whole or cut as ``data.dali_trim`` cuts files: the check that
``siasam-fast env`` shows, and that the DALI loader runs once per process on the GPU before it
trims anything.

The clip: ``CLIP_FRAMES`` flat grey frames, frame i at ``grey(i)`` (15 grey levels apart, so a frame
off by one is seen), a keyframe every ``CLIP_GOP`` frames; H.264 with B-frames in MP4 for NVDEC,
VP9 in WebM for DALI's CPU decoder (which reads VP8 / VP9 / MJPEG only). The whole clip is decoded
at ``WANTED``. The trimmed check decodes ``TRIM_WANTED`` from the stretch that
:func:`~siasam_fast.pipeline.dali.trim_stretch` cuts: it starts at the keyframe of frame 8 and
ends after frame 14, so the frames are renumbered, as the loader's are.
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np

logger = logging.getLogger(__name__)

CLIP_FRAMES, CLIP_GOP = 16, 4
WANTED = (3, 7, 11)
TRIM_WANTED = (9, 12, 14)
TOLERANCE = 5  # grey levels; frames are 15 apart


def grey(i: int) -> int:
    return 8 + 15 * i


def make_clip(codec: str) -> bytes:
    """The clip, encoded in memory: ``codec`` "h264" (MP4, B-frames) or "vp9" (WebM)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4" if codec == "h264" else "webm") as out:
        stream = out.add_stream("libx264" if codec == "h264" else "libvpx-vp9", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        gop = str(CLIP_GOP)
        stream.options = ({"g": gop, "keyint_min": gop, "bf": "2", "crf": "10"}
                          if codec == "h264" else
                          {"g": gop, "keyint_min": gop, "crf": "10", "b": "0",
                           "deadline": "realtime"})
        for i in range(CLIP_FRAMES):
            image = np.full((64, 64, 3), grey(i), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decode_check(on_gpu: bool, trimmed: bool = False, device_id: int = 0) -> tuple[bool, str]:
    """Decode the clip with DALI's video decoder as the loader does (NVDEC with ``on_gpu``, else
    DALI's CPU decoder), whole at ``WANTED`` or trimmed at ``TRIM_WANTED``, and check each frame's
    brightness. Returns (right, what was decoded and how it compares)."""
    from nvidia.dali import fn, pipeline_def, types

    from siasam_fast.pipeline.dali import trim_stretch

    codec = "h264" if on_gpu else "vp9"
    data = np.frombuffer(make_clip(codec), np.uint8)
    wanted = np.array(TRIM_WANTED if trimmed else WANTED, np.int32)
    frames = wanted
    where = "NVDEC (H.264 with B-frames)" if on_gpu else "DALI's CPU decoder (VP9)"
    detail = f"decoded frames {', '.join(map(str, wanted))} of a {CLIP_FRAMES}-frame clip"
    if trimmed:
        cut = trim_stretch(data, wanted, CLIP_FRAMES)
        if cut is None:
            return False, f"{detail}: the clip was not cut (trim_stretch gave the whole file)"
        data, frames = cut
        detail += (f" from the stretch that data.dali_trim cuts for them (frames "
                   f"{', '.join(map(str, frames))} there)")
    detail += f" on {where}"

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id if on_gpu else None)
    def pipe():
        encoded, indices = fn.external_source(
            source=lambda: ([data], [frames]), num_outputs=2, batch=True,
            dtype=[types.UINT8, types.INT32], ndim=[1, 1])
        return fn.decoders.video(encoded, device="mixed" if on_gpu else "cpu", frames=indices,
                                 pad_mode="none")

    p = pipe()
    p.build()
    try:
        (out,) = p.run()
        video = np.asarray((out.as_cpu() if on_gpu else out)[0])  # [F, H, W, 3] uint8
    finally:
        del p
    got = [round(float(frame.mean())) for frame in video]
    want = [grey(int(i)) for i in wanted]
    if len(got) == len(want) and all(abs(g - w) <= TOLERANCE for g, w in zip(got, want)):
        return True, f"{detail}: the right frames"
    return False, f"{detail}: grey levels {got}, expected {want}"


@functools.cache
def gpu_trims_exactly(device_id: int) -> tuple[bool, str]:
    """Whether NVDEC on this GPU decodes a trimmed clip's frames exactly (once per process and
    GPU). Any failure of the check itself counts as no."""
    try:
        return decode_check(True, trimmed=True, device_id=device_id)
    except Exception as err:  # noqa: BLE001 - whole files, as without trimming
        return False, f"the check of trimmed decoding raised {type(err).__name__}: {err}"


def resolve_trim(trim: bool, device: str, device_id: int | None, check=None) -> bool:
    """``trim`` as the loader uses it: on the GPU only after :func:`gpu_trims_exactly` (``check``
    replaces it in tests) has seen NVDEC decode a trimmed clip exactly; otherwise whole files,
    with a warning that says why. On the CPU the tests check DALI's CPU decoder."""
    if not trim or device != "gpu":
        return trim
    ok, detail = (check or gpu_trims_exactly)(int(device_id or 0))
    if not ok:
        logger.warning("data.dali_trim is off for this run: %s. DALI gets whole files, which it "
                       "decodes from their first frame (slower on long videos); please report "
                       "this with the output of `siasam-fast env`", detail)
    return ok
