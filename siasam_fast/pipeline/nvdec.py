"""What NVDEC (the GPU's video decoder, which DALI's ``device="mixed"`` decoder drives) can decode,
known before a file is opened: from the manifest's codec, pixel format and frame size, and the
GPU's compute capability.

DALI asks the driver (``cuvidGetDecoderCaps``) only when it meets a video, and refuses a codec,
chroma format or bit depth this GPU's NVDEC lacks ("Codec configuration not supported on this
GPU") and a frame under or over its size limits ("Video is too small in at least one
dimension"). The loader then leaves the file out as if it were damaged, each epoch. Known here,
``data.backend=auto`` takes PyAV for such a set and ``data.backend=dali`` refuses it, naming the
files.

The facts are NVIDIA's: the NVDEC application note of the Video Codec SDK 13.0 (which profiles each
architecture decodes) and the NVDECODE programming guide's capability table (the smallest and
largest frame per codec; the smallest H.264 frame, 48x16, as NVIDIA's driver reports it on an
RTX 3050). NVDEC also decodes JPEG, but DALI's GPU video decoder does not hand MJPEG to it
(``FramesDecoderGpu::SelectVideoStream`` in NVIDIA/DALI's frames_decoder_gpu.cc lists H.264,
HEVC, VP8, VP9, AV1 and MPEG-4 Part 2, MJPEG commented out as a TODO), so MJPEG is not in the
table. The GPU's own answer stays final: a format this table allows but the driver refuses is
still left out by the loader, with DALI's message.
"""

from __future__ import annotations

import functools

# The architectures of the application note's table, by compute capability.
VOLTA, TURING, GA100, GA10X, ADA, HOPPER, BLACKWELL = (
    "volta", "turing", "ga100", "ga10x", "ada", "hopper", "blackwell")


def architecture(cc: tuple[int, int]) -> str:
    """The NVDEC generation of a GPU of compute capability ``cc`` (Pascal and older count as
    Volta: DALI's wheels start at sm_70 for this package)."""
    major, minor = cc
    if major >= 10:
        return BLACKWELL  # sm_100, sm_103, sm_110, sm_120, sm_121
    if major == 9:
        return HOPPER
    if major == 8:
        return ADA if minor >= 9 else GA10X if minor >= 6 else GA100
    if (major, minor) >= (7, 5):
        return TURING
    return VOLTA


_FROM_TURING = frozenset({TURING, GA100, GA10X, ADA, HOPPER, BLACKWELL})
_AV1 = frozenset({GA10X, ADA, BLACKWELL})  # "AV1 Main Profile decoding": not Turing/GA100/Hopper
_ALL = frozenset({VOLTA}) | _FROM_TURING

# (codec, chroma, bit depth) -> the architectures whose NVDEC decodes it. Chroma "420", "422",
# "444" or "400" (monochrome).
_PROFILES: dict[tuple[str, str, int], frozenset[str]] = {
    # H.264 Baseline / Main / High: 8-bit 4:2:0 everywhere; High10 and High422 on Blackwell only;
    # 4:4:4 (High 4:4:4 Predictive) and monochrome nowhere.
    ("h264", "420", 8): _ALL,
    ("h264", "420", 10): frozenset({BLACKWELL}),
    ("h264", "422", 8): frozenset({BLACKWELL}),
    ("h264", "422", 10): frozenset({BLACKWELL}),
    # HEVC Main / Main 10 / Main 12 4:2:0 everywhere; 4:4:4 from Turing; Main 4:2:2 10/12 on
    # Blackwell only.
    **{("hevc", "420", b): _ALL for b in (8, 10, 12)},
    **{("hevc", "444", b): _FROM_TURING for b in (8, 10, 12)},
    **{("hevc", "422", b): frozenset({BLACKWELL}) for b in (8, 10, 12)},
    # VP9 profiles 0 and 2 (4:2:0, 8 / 10 / 12-bit); profiles 1 and 3 (4:2:2, 4:4:4) nowhere.
    **{("vp9", "420", b): _ALL for b in (8, 10, 12)},
    ("vp8", "420", 8): _ALL,
    # AV1 Main profile: 4:2:0 and monochrome, 8 and 10-bit.
    **{("av1", c, b): _AV1 for c in ("420", "400") for b in (8, 10)},
    # No MJPEG: NVDEC decodes JPEG, DALI's GPU video decoder does not (module docstring).
}

# codec -> (min width, min height, max width, max height, alignment of the coded size). NVDEC
# compares the coded size (H.264 and VP8 in 16 px macroblocks, the others in 8 px units).
_SIZES = {
    "h264": (48, 16, 4096, 4096, 16),
    "vp8": (48, 16, 4096, 4096, 16),
    "hevc": (144, 144, 8192, 8192, 8),
    "vp9": (128, 128, 8192, 8192, 8),
    "av1": (128, 128, 8192, 8192, 8),
}
_BLACKWELL_H264_MAX = 8192  # "H.264 8192x8192 Decoding support": Blackwell only

CODECS = frozenset(codec for codec, _, _ in _PROFILES)


@functools.cache
def pixel_format(pix_fmt: str) -> tuple[str, int] | None:
    """(chroma, bit depth) of an FFmpeg pixel format name ("yuv420p10le": ("420", 10)); chroma
    "rgb" for RGB formats, "411" / "440" / "410" for subsamplings no NVDEC decodes ("other" for
    any stranger one); None for a name FFmpeg does not know (or "": not recorded)."""
    if not pix_fmt:
        return None
    import av

    try:
        fmt = av.VideoFormat(pix_fmt)
    except (ValueError, TypeError):
        return None
    if not fmt.components:  # a hardware surface ("cuda", "vaapi"): nothing to tell
        return None
    bits = fmt.components[0].bits
    if fmt.is_rgb:
        return "rgb", bits
    if len(fmt.components) < 3:
        return "400", bits
    sub = (fmt.chroma_width(64), fmt.chroma_height(64))
    return {(32, 32): "420", (32, 64): "422", (64, 64): "444", (16, 64): "411", (64, 32): "440",
            (16, 16): "410"}.get(sub, "other"), bits


# DALI's GPU decoder creates its NVDEC decoders without choosing an output surface (the create
# info is zeroed: NV12, 8-bit 4:2:0; frames_decoder_gpu.cc) and converts NV12 to RGB. NVDEC offers
# no NV12 surface for 4:4:4 streams (NVIDIA/DALI#6079, open: "NVDEC doesn't support HEVC yuv444p
# decode", on an RTX 6000 Ada) nor, by its surface formats, for 4:2:2 ones; whether it gives NV12
# for 10 / 12-bit streams is not confirmed here. Until gpu_check_dali.py section 6b shows more on
# a card, what NVDEC decodes reaches DALI only as 8-bit 4:2:0 (or when the record does not say).
DALI_SHAPES = frozenset({("420", 8)})


def _shape(pix_fmt: str, fmt: tuple[str, int]) -> str:
    chroma, bits = fmt
    shape = ("RGB" if chroma == "rgb" else f"{bits}-bit, chroma subsampled otherwise"
             if chroma == "other" else f"{bits}-bit {chroma[0]}:{chroma[1]}:{chroma[2]}")
    return f"{shape} ({pix_fmt})"


def problem(record, cc: tuple[int, int]) -> str | None:
    """Why NVDEC of a GPU of compute capability ``cc`` cannot decode the manifest ``record``
    (None if it can, or if the record does not say: older manifests have no pixel format, and
    then only the codec and the size are checked)."""
    codec = getattr(record, "codec", "")
    arch = architecture(cc)
    if codec not in CODECS:
        return f"codec {codec or 'unknown'}"
    if not any(arch in archs for (c, _, _), archs in _PROFILES.items() if c == codec):
        return f"codec {codec}"
    pix_fmt = getattr(record, "pix_fmt", "")
    fmt = pixel_format(pix_fmt)
    if fmt is not None and arch not in _PROFILES.get((codec, *fmt), ()):
        return f"{codec} {_shape(pix_fmt, fmt)}"
    if fmt is not None and fmt not in DALI_SHAPES:
        return (f"{codec} {_shape(pix_fmt, fmt)}: NVDEC decodes it, but DALI takes 8-bit 4:2:0 "
                "(NV12) frames from it only")
    width, height = int(getattr(record, "width", 0) or 0), int(getattr(record, "height", 0) or 0)
    if width and height and codec in _SIZES:
        min_w, min_h, max_w, max_h, align = _SIZES[codec]
        if codec == "h264" and arch == BLACKWELL:
            max_w = max_h = _BLACKWELL_H264_MAX
        coded_w, coded_h = -(-width // align) * align, -(-height // align) * align
        size = f"{codec} {width}x{height}"
        if coded_w < min_w or coded_h < min_h:
            return f"{size}: under NVDEC's smallest {codec} frame, {min_w}x{min_h}"
        if coded_w > max_w or coded_h > max_h:
            return f"{size}: over NVDEC's largest {codec} frame, {max_w}x{max_h}"
    return None


def decodes_av1(cc: tuple[int, int]) -> bool:
    """Whether the NVDEC of a GPU of compute capability ``cc`` decodes AV1 (GA10x, Ada, Blackwell;
    not Volta, Turing, GA100 (A100, A30) or Hopper (H100, H200))."""
    return architecture(cc) in _AV1


def summary(cc: tuple[int, int]) -> str:
    """What DALI decodes on the NVDEC of a GPU of compute capability ``cc``, in one line
    (``env``): the codecs and frame sizes, 8-bit 4:2:0 (:data:`DALI_SHAPES`)."""
    arch = architecture(cc)
    parts, missing = [], []
    for codec in ("h264", "hevc", "vp9", "vp8", "av1", "mjpeg"):  # mjpeg: always "no"
        if not any(arch in archs for (c, chroma, bits), archs in _PROFILES.items()
                   if c == codec and (chroma, bits) in DALI_SHAPES):
            missing.append(codec)
            continue
        min_w, min_h, max_w, _, _ = _SIZES[codec]
        if codec == "h264" and arch == BLACKWELL:
            max_w = _BLACKWELL_H264_MAX
        parts.append(f"{codec} ({min_w}x{min_h} to {max_w} px)")
    return (f"{arch}: 8-bit 4:2:0 " + ", ".join(parts)
            + (f"; no {', '.join(missing)}" if missing else ""))
