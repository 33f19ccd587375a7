"""siasam-fast: SiaSamRea (Siamese Sampling and Reasoning for VideoQA, NeurIPS 2021), fast on GPUs.

The public surface: a config, a model, a loss, a loader factory and a train entry point. Every
name is imported on first use (torch included), so ``import siasam_fast`` and
``siasam-fast --help`` are quick.
"""

__version__ = "0.1.0"

_LAZY = {
    "ClipIndices": ("siasam_fast.sampling", "ClipIndices"),
    "SamplingConfig": ("siasam_fast.sampling", "SamplingConfig"),
    "sample_eval_clips": ("siasam_fast.sampling", "sample_eval_clips"),
    "sample_siamese_clips": ("siasam_fast.sampling", "sample_siamese_clips"),
    "SiameseReasoning": ("siasam_fast.siamese", "SiameseReasoning"),
    "siamese_count_loss": ("siasam_fast.siamese", "siamese_count_loss"),
    "siamese_knowledge": ("siasam_fast.siamese", "siamese_knowledge"),
    "siamese_loss": ("siasam_fast.siamese", "siamese_loss"),
    "siamese_soft_label": ("siasam_fast.siamese", "siamese_soft_label"),
    "Config": ("siasam_fast.config", "Config"),
    "load_config": ("siasam_fast.config", "load_config"),
    "SiaSamReaModel": ("siasam_fast.model", "SiaSamReaModel"),
    "build_video_loader": ("siasam_fast.pipeline.loaders", "build_video_loader"),
    "train": ("siasam_fast.training", "main"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'siasam_fast' has no attribute {name!r}")


__all__ = [
    "ClipIndices",
    "Config",
    "SamplingConfig",
    "SiaSamReaModel",
    "SiameseReasoning",
    "build_video_loader",
    "load_config",
    "sample_eval_clips",
    "sample_siamese_clips",
    "siamese_count_loss",
    "siamese_knowledge",
    "siamese_loss",
    "siamese_soft_label",
    "train",
]
