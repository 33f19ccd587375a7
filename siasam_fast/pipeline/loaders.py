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
    """Why the installed DALI cannot run on this GPU (None if it can, or without a GPU or DALI):
    it does not import; its wheel needs a newer CUDA than the driver's (a cuda130 wheel on a
    CUDA 12 driver); or a CUDA 13 wheel on a V100 (sm_70), which it has no kernels for, whatever
    CUDA the driver supports."""
    if not torch.cuda.is_available() or not dali_available():
        return None
    from siasam_fast.envcheck import _first_line, _wheel_cuda_major, cuda_driver_version, dali_wheel

    wheel = dali_wheel()
    try:
        import nvidia.dali  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or a library's OSError
        return (f"{wheel or 'nvidia-dali'} is installed but does not import ({_first_line(err)})"
                "; reinstall it (README, Install on a GPU machine)")
    wheel_cuda, driver = _wheel_cuda_major(wheel or ""), cuda_driver_version()
    if wheel_cuda and driver and driver[0] < wheel_cuda:
        return (f"{wheel} needs a CUDA {wheel_cuda} driver; this driver supports CUDA "
                f"{driver[0]}.{driver[1]}: install nvidia-dali-cuda{driver[0]}0 instead")
    if not wheel or (wheel_cuda or 0) < 13:
        return None
    cc = _gpu_capability()
    if cc is None:  # no usable device after all: nothing to say
        return None
    if cc < DALI_CUDA13_MIN_CAPABILITY:
        return (f"{wheel} has no code for {torch.cuda.get_device_name()} (sm_{cc[0]}{cc[1]}): "
                "DALI's CUDA 13 wheels start at sm_75; install nvidia-dali-cuda120 instead "
                "(pip install 'siasam-fast[gpu-cu120]'; it runs on CUDA 12 and 13 drivers)")
    return None


# Codecs DALI's CPU video decoder reads (no GPU: the graph runs with device="cpu").
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})


def _gpu_capability() -> tuple[int, int] | None:
    try:
        return tuple(torch.cuda.get_device_capability())
    except (AssertionError, RuntimeError):  # no usable device after all
        return None


def _gpu_name() -> str:
    try:
        return torch.cuda.get_device_name()
    except (AssertionError, RuntimeError):
        return "this GPU"


def nvdec_problems(manifest: dict | None) -> dict[str, list[str]]:
    """The manifest's usable videos that this GPU's NVDEC cannot decode, by reason
    (:func:`siasam_fast.pipeline.nvdec.problem`: codec, pixel format, frame size); without the
    GPU's compute capability, the codecs no NVDEC decodes."""
    from siasam_fast.pipeline import nvdec

    cc = _gpu_capability()
    problems: dict[str, list[str]] = {}
    for vid, record in (manifest or {}).items():
        if record.ok:
            if cc is not None:
                reason = nvdec.problem(record, cc)
            else:
                reason = None if record.codec in nvdec.CODECS else f"codec {record.codec}"
            if reason:
                problems.setdefault(reason, []).append(str(getattr(record, "relpath", "") or vid))
    return problems


# What makes a set NVDEC can read (README: "Backends (`data.backend`)")
NVDEC_ADVICE = ("`siasam-fast transcode SRC DST --gop 16` re-encodes a set as 8-bit 4:2:0 H.264, "
                "which every NVDEC decodes (--height H for frames over 4096 px; frames under "
                "48x16 stay with pyav)")


def nvdec_refusal(manifest: dict | None, shown: int = 3) -> str | None:
    """What this GPU's NVDEC cannot decode in ``manifest`` (:func:`nvdec_problems`), in one line:
    how many videos, and a few files per reason; None if it decodes them all."""
    problems = nvdec_problems(manifest)
    if not problems:
        return None
    parts = []
    for reason, files in sorted(problems.items(), key=lambda kv: -len(kv[1])):
        more = f", ... ({len(files)} videos)" if len(files) > shown else ""
        parts.append(f"{reason}: {', '.join(files[:shown])}{more}")
    n = sum(map(len, problems.values()))
    return (f"the NVDEC of {_gpu_name()} cannot decode {n} video{'' if n == 1 else 's'} of the "
            f"manifest ({'; '.join(parts)})")


def resolve_backend(name: str, manifest: dict | None = None) -> str:
    """"auto" is DALI when a GPU and DALI are present and NVDEC decodes every usable video in the
    manifest (its codec, pixel format and frame size: :mod:`siasam_fast.pipeline.nvdec`; TGIF's
    GIFs, say, it does not), else PyAV. "dali" refuses such a manifest, naming the videos."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: valid backends are {', '.join(BACKENDS)}")
    if name == "auto":
        if not (torch.cuda.is_available() and dali_available()):
            return "pyav"
        problem = dali_gpu_problem()
        if problem:
            logger.warning("data.backend=auto: %s; using pyav", problem)
            return "pyav"
        refusal = nvdec_refusal(manifest)
        if refusal:
            logger.warning("data.backend=auto: %s; using pyav. %s", refusal, NVDEC_ADVICE)
            return "pyav"
        return "dali"
    if name == "dali" and not dali_available():
        raise ValueError("backend='dali' but nvidia-dali is not installed: pip install "
                         "'siasam-fast[gpu]' (CUDA 13) or 'siasam-fast[gpu-cu120]' (CUDA 12)")
    if name == "dali":
        problem = dali_gpu_problem()
        if problem:
            raise ValueError(f"backend='dali': {problem}")
        if torch.cuda.is_available():
            refusal = nvdec_refusal(manifest)
            if refusal:
                raise ValueError(f"backend='dali': {refusal}; use backend=pyav or auto, or "
                                 f"{NVDEC_ADVICE}")
        else:
            codecs = {r.codec for r in (manifest or {}).values() if r.ok}
            unsupported = sorted(codecs - DALI_CPU_CODECS)
            if unsupported:
                raise ValueError(
                    f"backend='dali': DALI's CPU decoder (no GPU here) cannot decode "
                    f"{', '.join(unsupported)} (it reads {', '.join(sorted(DALI_CPU_CODECS))}); "
                    "use backend=pyav or auto")
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
