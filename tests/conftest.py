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


@pytest.fixture(autouse=True)
def _torch_threads_as_found():
    """A test that changes torch's thread count (a benchmark's main() sets one thread on CPU)
    must not change the numbers of the tests after it: a run of the whole suite computes as a
    run of one file does."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def two_videos(tmp_path):
    """A folder of two tiny videos (H.264 and MJPEG) and its manifest: (folder, manifest path)."""
    from videos import video_path, write_index_video

    from siasam_fast.pipeline.manifest import build_manifest

    folder = tmp_path / "two"
    write_index_video(video_path(folder, "a", "h264"), 10, "h264", size=16)
    write_index_video(video_path(folder, "b", "mjpeg"), 5, "mjpeg", size=16)
    out = tmp_path / "two.jsonl"
    build_manifest(folder, out, workers=1, progress=False)
    return folder, out
