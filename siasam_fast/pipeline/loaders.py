"""The loader factory: one call, a backend chosen by config ("auto", "pyav" or "dali").

Both backends yield the batch contract of :mod:`siasam_fast.pipeline.dataset`, so the model and
the training loop never know which one decoded the frames.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from siasam_fast.pipeline.dataset import build_loader

BACKENDS = ("auto", "pyav", "dali")
logger = logging.getLogger(__name__)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


# Codecs DALI's video decoder reads on the GPU (NVDEC); its CPU decoder reads VP8, VP9, MJPEG.
DALI_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mjpeg", "av1"})
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})


def resolve_backend(name: str, manifest: dict | None = None) -> str:
    """"auto" is DALI when a GPU and DALI are present and DALI decodes every codec in the manifest
    (TGIF's GIFs, say, it does not), else PyAV."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: valid backends are {', '.join(BACKENDS)}")
    codecs = {r.codec for r in (manifest or {}).values() if r.ok}
    if name == "auto":
        if not (torch.cuda.is_available() and dali_available()):
            return "pyav"
        unsupported = sorted(codecs - DALI_GPU_CODECS)
        if unsupported:
            logger.warning("data.backend=auto: DALI cannot decode %s; using pyav", unsupported)
            return "pyav"
        return "dali"
    if name == "dali" and not dali_available():
        raise ValueError("backend='dali' but nvidia-dali is not installed: pip install "
                         "'siasam-fast[gpu]' (CUDA 13) or 'siasam-fast[gpu-cu120]' (CUDA 12)")
    if name == "dali":
        valid = DALI_GPU_CODECS if torch.cuda.is_available() else DALI_CPU_CODECS
        unsupported = sorted(codecs - valid)
        if unsupported:
            where = "NVDEC" if torch.cuda.is_available() else "DALI's CPU decoder (no GPU here)"
            raise ValueError(f"backend='dali': {where} cannot decode {', '.join(unsupported)} "
                             f"(it reads {', '.join(sorted(valid))}); use backend=pyav or auto")
    return name


def build_video_loader(examples, manifest, sampling_cfg, split, batch_size, backend="auto",
                       **kwargs):
    """A loader for ``split`` on this rank; keyword arguments as :func:`build_loader`."""
    backend = resolve_backend(backend, manifest)
    if backend == "dali":
        from siasam_fast.pipeline.dali import build_dali_loader

        return build_dali_loader(examples, manifest, sampling_cfg, split, batch_size, **kwargs)
    kwargs.pop("device", None)  # DALI-only arguments
    kwargs.pop("decode_group", None)
    kwargs.pop("trim", None)
    return build_loader(examples, manifest, sampling_cfg, split, batch_size, backend="pyav",
                        **kwargs)
