"""The loader factory: one call, a backend chosen by config ("auto", "pyav" or "dali").

Both backends yield the batch contract of :mod:`siasam_fast.pipeline.dataset`, so the model and
the training loop never know which one decoded the frames.
"""

from __future__ import annotations

import importlib.util

import torch

from siasam_fast.pipeline.dataset import build_loader

BACKENDS = ("auto", "pyav", "dali")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(name: str) -> str:
    """"auto" is DALI when a GPU and DALI are present, else PyAV."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: valid backends are {', '.join(BACKENDS)}")
    if name == "auto":
        return "dali" if torch.cuda.is_available() and dali_available() else "pyav"
    if name == "dali" and not dali_available():
        raise ValueError("backend='dali' but nvidia-dali is not installed: pip install "
                         "'siasam-fast[gpu]' (CUDA 13) or 'siasam-fast[gpu-cu120]' (CUDA 12)")
    return name


def build_video_loader(examples, manifest, sampling_cfg, split, batch_size, backend="auto",
                       **kwargs):
    """A loader for ``split`` on this rank; keyword arguments as :func:`build_loader`."""
    backend = resolve_backend(backend)
    if backend == "dali":
        from siasam_fast.pipeline.dali import build_dali_loader

        return build_dali_loader(examples, manifest, sampling_cfg, split, batch_size, **kwargs)
    kwargs.pop("device", None)  # a DALI-only argument
    return build_loader(examples, manifest, sampling_cfg, split, batch_size, backend="pyav",
                        **kwargs)
