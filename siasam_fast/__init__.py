"""siasam-fast: SiaSamRea (Siamese Sampling and Reasoning for VideoQA, NeurIPS 2021), fast on GPUs."""

from siasam_fast.sampling import (
    ClipIndices,
    SamplingConfig,
    sample_eval_clips,
    sample_siamese_clips,
)

__version__ = "0.1.0"

__all__ = [
    "ClipIndices",
    "SamplingConfig",
    "sample_eval_clips",
    "sample_siamese_clips",
]
