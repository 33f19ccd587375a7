"""Test-suite set-up: CPU runs use the Triton interpreter and DeepSpeed's CPU accelerator."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit decorates a kernel (i.e. before the kernels import).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Tests must never download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
