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
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:  # no `nvidia` package at all (torch not from PyPI's CUDA wheels, no DALI)
        return False


# The oldest GPU that DALI's CUDA 13 wheels hold code for: CUDA 13 cannot target Volta, and
# nvidia-dali-cuda130 2.4.0's fat binaries start at sm_75 (nvidia-dali-cuda120 2.4.0 has sm_70).
DALI_CUDA13_MIN_CAPABILITY = (7, 5)


def dali_gpu_problem() -> str | None:
    """Why the installed DALI wheel cannot run on this GPU (None if it can, or without a GPU):
    a CUDA 13 wheel on a V100 (sm_70) has no kernels for it, whatever CUDA the driver supports."""
    if not torch.cuda.is_available():
        return None
    from siasam_fast.envcheck import _wheel_cuda_major, dali_wheel

    wheel = dali_wheel()
    if not wheel or (_wheel_cuda_major(wheel) or 0) < 13:
        return None
    try:
        cc = tuple(torch.cuda.get_device_capability())
    except (AssertionError, RuntimeError):  # no usable device after all: nothing to say
        return None
    if cc < DALI_CUDA13_MIN_CAPABILITY:
        return (f"{wheel} has no code for {torch.cuda.get_device_name()} (sm_{cc[0]}{cc[1]}): "
                "DALI's CUDA 13 wheels start at sm_75; install nvidia-dali-cuda120 instead "
                "(pip install 'siasam-fast[gpu-cu120]'; it runs on CUDA 12 and 13 drivers)")
    return None


# Codecs DALI's video decoder reads on the GPU (NVDEC); its CPU decoder reads VP8, VP9, MJPEG.
DALI_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mjpeg", "av1"})
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})


def nvdec_decodes_av1(cc: tuple[int, int]) -> bool:
    """Whether the NVDEC of a GPU of compute capability ``cc`` decodes AV1. NVIDIA's NVDEC
    application note (Video Codec SDK 12.2, 13.0): GA10x (sm_86, sm_87), Ada (sm_89) and Blackwell
    (sm_100 on) do; Volta, Turing, GA100 (A100, A30: sm_80) and Hopper (H100, H200: sm_90) do
    not, and DALI would fail on every AV1 file there (each left out as if damaged)."""
    major, minor = cc
    return (major == 8 and minor >= 6) or major >= 10


def dali_gpu_codecs() -> frozenset[str]:
    """The codecs NVDEC decodes on this machine's GPU (:data:`DALI_GPU_CODECS`, less AV1 where
    :func:`nvdec_decodes_av1` says so)."""
    try:
        cc = tuple(torch.cuda.get_device_capability())
    except (AssertionError, RuntimeError):  # no usable device: the full set, as before
        return DALI_GPU_CODECS
    return DALI_GPU_CODECS if nvdec_decodes_av1(cc) else DALI_GPU_CODECS - {"av1"}


def _gpu_name() -> str:
    try:
        return torch.cuda.get_device_name()
    except (AssertionError, RuntimeError):
        return "this GPU"


def resolve_backend(name: str, manifest: dict | None = None) -> str:
    """"auto" is DALI when a GPU and DALI are present and DALI decodes every codec in the manifest
    (TGIF's GIFs, say, it does not), else PyAV."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: valid backends are {', '.join(BACKENDS)}")
    codecs = {r.codec for r in (manifest or {}).values() if r.ok}
    if name == "auto":
        if not (torch.cuda.is_available() and dali_available()):
            return "pyav"
        problem = dali_gpu_problem()
        if problem:
            logger.warning("data.backend=auto: %s; using pyav", problem)
            return "pyav"
        unsupported = sorted(codecs - dali_gpu_codecs())
        if unsupported:
            logger.warning("data.backend=auto: DALI cannot decode %s on %s; using pyav",
                           unsupported, _gpu_name())
            return "pyav"
        return "dali"
    if name == "dali" and not dali_available():
        raise ValueError("backend='dali' but nvidia-dali is not installed: pip install "
                         "'siasam-fast[gpu]' (CUDA 13) or 'siasam-fast[gpu-cu120]' (CUDA 12)")
    if name == "dali":
        problem = dali_gpu_problem()
        if problem:
            raise ValueError(f"backend='dali': {problem}")
        valid = dali_gpu_codecs() if torch.cuda.is_available() else DALI_CPU_CODECS
        unsupported = sorted(codecs - valid)
        if unsupported:
            where = (f"NVDEC of {_gpu_name()}" if torch.cuda.is_available()
                     else "DALI's CPU decoder (no GPU here)")
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
